"""Build a segmentation model from a ModelConfig; optimizer groups; size and FLOPs.

    model = build_model(model_cfg, num_classes)
    logits = model(images)              # [N,3,H,W] -> [N,num_classes,H,W]
    logits = model(images, edges)       # when model.needs_edges (edge input variants)
    groups = param_groups(model, lr=..., head_lr_mult=10, weight_decay=5e-4)
    info = describe_model(model, num_classes, input_size=321)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segdist.errors import SegdistError
from segdist.models.fpn import FPNDecoder
from segdist.models.heads import ASPPHead, NakedHead
from segdist.models.resnet import ResNet, convert_sync_batchnorm, load_torchvision_weights
from segdist.models.sobel import EdgeInput, FixedSobel, LearnableSobel, StageExtras, learnable_sobel
from segdist.models.variant import EDGE_STAGES, STAGES, Variant, parse_variant


class SegModel(nn.Module):
    """Backbone (`self.backbone`, torchvision names) + optional per-stage extra modules +
    decoder/head + optional logit module, then bilinear upsampling to the input size.

    Everything outside `self.backbone` is "head" for the learning-rate multiplier.
    """

    def __init__(
        self,
        backbone: ResNet,
        head: nn.Module,
        variant: Variant,
        num_classes: int,
        *,
        multi_level: bool = False,
        stage_extras: dict[str, nn.Module] | None = None,
        logit_module: nn.Module | None = None,
        needs_edges: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.extras = nn.ModuleDict(stage_extras or {})
        self.logit_module = logit_module
        self.variant = variant
        self.num_classes = num_classes
        self.multi_level = multi_level  # head takes [res2..res5] and the input size
        self.needs_edges = needs_edges
        self.output_stride = backbone.output_stride

    def _extra(self, stage: str, x: torch.Tensor, edges: torch.Tensor | None) -> torch.Tensor:
        module = self.extras[stage] if stage in self.extras else None
        return x if module is None else module(x, edges)

    def forward(self, images: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_edges and edges is None:
            raise ValueError(f"variant {self.variant.name!r} needs an edge map: call model(images, edges)")
        size = images.shape[-2:]
        b = self.backbone
        x = self._extra("stem", b.stem(images), edges)
        feats = []
        for stage, layer in zip(STAGES[1:], (b.layer1, b.layer2, b.layer3, b.layer4), strict=True):
            x = self._extra(stage, layer(x), edges)
            feats.append(x)
        logits = self.head(feats, size) if self.multi_level else self.head(x)
        if self.logit_module is not None:
            logits = self.logit_module(logits)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def build_model(model_cfg, num_classes: int) -> SegModel:
    """A model for `model_cfg` (segdist.config.ModelConfig: variant, depth, width,
    output_stride, norm, pretrained) and `num_classes`.

    The variant (segdist.models.variant) picks the decoder and the extra modules; its
    training and label tokens (lrN, scaleN, trimap, ...) do not change the model.
    FPN and GCN decoders always use the plain ResNet (output stride 32), whatever
    `output_stride` says; `model.output_stride` tells which one was built.
    BatchNorm in the decoders and extra modules is plain BatchNorm2d (SyncBatchNorm with
    norm="sync", which also works on CPU/gloo workers: resnet.SyncBatchNorm2d);
    norm="frozen" freezes only the backbone's (ImageNet) BN.
    """
    variant = parse_variant(model_cfg.variant)
    if num_classes < 1:
        raise SegdistError(f"num_classes must be at least 1, got {num_classes}")
    output_stride = 32 if variant.multi_level else model_cfg.output_stride
    backbone = ResNet(model_cfg.depth, model_cfg.width, output_stride, model_cfg.norm)
    if model_cfg.pretrained:
        load_torchvision_weights(backbone, model_cfg.pretrained)

    def make_learnable(channels: int) -> nn.Module:
        return learnable_sobel(
            channels, variant.learnable_sobel, variant.sobel_order, variant.sobel_relu, variant.sobel_init
        )

    extras: dict[str, nn.Module] = {}
    for stage, channels in zip(STAGES, (model_cfg.width, *backbone.channels), strict=True):
        parts: dict[str, nn.Module] = {}
        if variant.edge_input is not None and stage in EDGE_STAGES:
            parts["edge"] = EdgeInput(variant.edge_input, channels)
        if stage in variant.fixed_sobel_at:
            parts["sobel"] = FixedSobel(channels)
        if stage in variant.learnable_sobel_at:
            parts["learnable"] = make_learnable(channels)
        if parts:
            extras[stage] = StageExtras(**parts)

    if variant.multi_level:
        lateral_extra = make_learnable if "laterals" in variant.learnable_sobel_at else None
        head: nn.Module = FPNDecoder(backbone.channels, num_classes, variant.decoder, lateral_extra)
    elif variant.decoder == "aspp":
        head = ASPPHead(backbone.channels[-1], num_classes)
    else:
        head = NakedHead(backbone.channels[-1], num_classes)
    logit_module = None
    if variant.spk:
        masks = ("v", "h") if variant.spk == 2 else ("v", "h", "d1", "d2")
        logit_module = LearnableSobel(
            num_classes, channelwise=True, order=1, relu=False, init=variant.sobel_init, masks=masks
        )
    model = SegModel(
        backbone,
        head,
        variant,
        num_classes,
        multi_level=variant.multi_level,
        stage_extras=extras,
        logit_module=logit_module,
        needs_edges=variant.needs_edges,
    )
    if model_cfg.norm == "sync":
        model = convert_sync_batchnorm(model)
    return model


# ------------------------------------------------------------------ optimizer groups

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 5e-4) -> list[dict]:
    """SGD parameter groups, DeepLab style. Every trainable parameter is in exactly one:

    | name          | what                                         | lr            | weight decay |
    |---------------|----------------------------------------------|---------------|--------------|
    | backbone      | backbone conv weights                        | lr            | wd           |
    | backbone_norm | backbone BN affine (and any backbone bias)   | lr            | 0            |
    | head_weight   | head/decoder/extra-module weights (dim > 1)  | lr * m        | wd           |
    | head_bias     | head/decoder/extra-module conv biases        | lr * 2m       | 0            |
    | head_norm     | head BN affine, per-channel scales (dim <= 1)| lr * m        | 0            |

    Each group also has "lr_mult" (its lr / base lr) so a schedule can set
    group["lr"] = base_lr * group["lr_mult"] * factor. Empty groups are left out.
    Frozen parameters (requires_grad=False, e.g. frozen BN) are in no group.
    A DDP-wrapped model works too (the `module.` prefix is looked through).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    specs = {
        "backbone": (1.0, weight_decay),
        "backbone_norm": (1.0, 0.0),
        "head_weight": (head_lr_mult, weight_decay),
        "head_bias": (2.0 * head_lr_mult, 0.0),
        "head_norm": (head_lr_mult, 0.0),
    }
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in specs}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        in_backbone = module_name == "backbone" or module_name.startswith("backbone.")
        is_norm = isinstance(module, _NORM_TYPES)
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if in_backbone:
                group = "backbone" if (param.dim() > 1 and not is_norm) else "backbone_norm"
            elif is_norm:
                group = "head_norm"
            elif pname == "bias" or pname.endswith("_bias"):
                group = "head_bias"
            elif param.dim() > 1:
                group = "head_weight"
            else:
                group = "head_norm"  # per-channel scales of the edge/Sobel modules
            buckets[group].append(param)
    groups = []
    for name, (mult, wd) in specs.items():
        if buckets[name]:
            groups.append({"name": name, "params": buckets[name], "lr": lr * mult, "lr_mult": mult, "weight_decay": wd})
    return groups


# ------------------------------------------------------------------ size and FLOPs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: nn.Module, num_classes: int | None = None, input_size: int = 321) -> dict[str, Any]:
    """{"params", "size_mb", "gflops"} of a model.

    params: every parameter (trainable or frozen; buffers such as BN running statistics
    are not counted). size_mb: params * 4 bytes / 2**20, i.e. fp32 MiB (the log's
    "MB"). gflops: FLOPs of one forward of a 1x3xSxS input counted by
    torch.utils.flop_counter.FlopCounterMode (a multiply-add counts as 2 FLOPs), on a
    meta-device copy, so nothing is computed and the model is not touched.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    params = count_params(model)
    meta = copy.deepcopy(model).to("meta").eval()
    images = torch.zeros(1, 3, input_size, input_size, device="meta")
    inputs = (images,)
    if getattr(meta, "needs_edges", False):
        inputs = (images, torch.zeros(1, 1, input_size, input_size, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(*inputs)
    return {
        "params": params,
        "size_mb": round(params * 4 / 2**20, 2),
        "gflops": round(counter.get_total_flops() / 1e9, 3),
    }
