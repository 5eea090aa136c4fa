"""Build a segmentation model from a recipe's model part; its named parameter groups; size and FLOPs.

    model = build_model(recipe.model, num_classes)
    logits = model(images)              # [N,3,H,W] -> [N,num_classes,H,W]
    logits = model(images, edges)       # when model.needs_edges (edge input variants)
    groups = parameter_groups(model)    # {"backbone": {"kernel": [...], "norm": [...]}, "classifier": ...}
    info = describe_model(model, num_classes, input_size=321)
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segdist.errors import SegdistError
from segdist.models import tf1
from segdist.models.fpn import FPNDecoder
from segdist.models.heads import ASPPHead, BasicBlockHead, NakedHead
from segdist.models.resnet import FrozenBatchNorm2d, ResNet, convert_sync_batchnorm
from segdist.models.sobel import EdgeInput, FixedSobel, LearnableSobel, StageExtras, learnable_sobel
from segdist.models.variant import EDGE_STAGES, FPN_DECODERS, STAGES

if TYPE_CHECKING:
    from segdist.recipe import ModelRecipe


class SegModel(nn.Module):
    """Backbone (`self.backbone`, torchvision names) + optional per-stage extra modules
    (`self.extras`) + a classifier on res5 (`self.classifier`: naked, aspp, basic block) or a
    multi-level decoder (`self.decoder`) + optional logit module (SPK), then bilinear
    upsampling of the logits to the input size (segdist.models.tf1.resize_bilinear: TF's legacy
    mapping under framework tf1). Module names decide the parameter groups (parameter_groups).
    """

    def __init__(
        self,
        backbone: ResNet,
        classifier: nn.Module | None,
        decoder: nn.Module | None,
        *,
        stage_extras: dict[str, nn.Module] | None = None,
        logit_module: nn.Module | None = None,
        needs_edges: bool = False,
        framework: str = "pytorch",
    ):
        super().__init__()
        if (classifier is None) == (decoder is None):
            raise ValueError("give exactly one of classifier, decoder")
        self.backbone = backbone
        self.classifier = classifier
        self.decoder = decoder
        self.extras = nn.ModuleDict(stage_extras or {})
        self.logit_module = logit_module
        self.needs_edges = needs_edges
        self.framework = framework
        self.output_stride = backbone.output_stride
        self.pretrained_sha256: str | None = None  # of the ImageNet weights loaded, if any

    def _extra(self, stage: str, x: torch.Tensor, edges: torch.Tensor | None) -> torch.Tensor:
        module = self.extras[stage] if stage in self.extras else None
        return x if module is None else module(x, edges)

    def forward(self, images: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_edges and edges is None:
            raise ValueError("this model needs an edge map: call model(images, edges)")
        size = images.shape[-2:]
        b = self.backbone
        x = self._extra("stem", b.stem(images), edges)
        feats = []
        for stage, layer in zip(STAGES[1:], (b.layer1, b.layer2, b.layer3, b.layer4), strict=True):
            x = self._extra(stage, layer(x), edges)
            feats.append(x)
        logits = self.decoder(feats, size) if self.decoder is not None else self.classifier(x)
        if self.logit_module is not None:
            logits = self.logit_module(logits)
        return tf1.resize_bilinear(logits, size, self.framework)


def build_model(model, num_classes: int, *, load_pretrained: bool = True) -> SegModel:
    """A model for `model` (segdist.recipe.ModelRecipe) and `num_classes`. Nothing here parses
    the variant: the recipe says which decoder, modules, formulas, strides, numerics
    (framework) and initialisers. ImageNet weights (model.pretrained) are loaded into the
    backbone unless `load_pretrained` is False (checkpoints bring their own); their sha256 is
    `model.pretrained_sha256`. Decoder and module BatchNorms are plain BatchNorm2d
    (SyncBatchNorm with norm="sync", which also works on CPU/gloo workers); norm="frozen"
    freezes only the backbone's (ImageNet) BN. Raises SegdistError for a bad value or for
    weights that cannot be fetched or do not fit."""
    if num_classes < 1:
        raise SegdistError(f"num_classes must be at least 1, got {num_classes}")
    m = model
    backbone = ResNet(m.depth, m.width, m.output_stride, m.norm, strides=m.strides, dilations=m.dilations,
                      stride_on=m.stride_on, framework=m.framework, init=m.init)
    sha256 = None
    if m.pretrained and load_pretrained:
        from segdist.models.pretrained import load_pretrained as load

        sha256 = load(backbone, m.pretrained)

    def make_learnable(channels: int) -> nn.Module:
        return learnable_sobel(channels, m.learnable_sobel, m.learnable_sobel_form, m.sobel_relu, m.sobel_init, m.init)

    extras: dict[str, nn.Module] = {}
    for stage, channels in zip(STAGES, (m.width, *backbone.channels), strict=True):
        parts: dict[str, nn.Module] = {}
        if m.edge_input is not None and stage in EDGE_STAGES:
            parts["edge"] = EdgeInput(m.edge_input, channels, m.framework, m.init)
        if stage in m.fixed_sobel_at:
            parts["sobel"] = FixedSobel(channels, m.fixed_sobel_form)
        if stage in m.learnable_sobel_at:
            parts["learnable"] = make_learnable(channels)
        if parts:
            extras[stage] = StageExtras(**parts)

    classifier = decoder = None
    if m.decoder in FPN_DECODERS:
        lateral_extra = make_learnable if "laterals" in m.learnable_sobel_at else None
        decoder = FPNDecoder(backbone.channels, num_classes, m.decoder, lateral_extra, gcn_style=m.gcn_style,
                             framework=m.framework, init=m.init)
    elif m.decoder == "aspp":
        classifier = ASPPHead(backbone.channels[-1], num_classes, bias=m.classifier_bias, init=m.init)
    elif m.decoder == "plain":
        classifier = BasicBlockHead(backbone.channels[-1], num_classes, init=m.init)
    else:
        classifier = NakedHead(backbone.channels[-1], num_classes, bias=m.classifier_bias, init=m.init)
    logit_module = None
    if m.spk:
        masks = ("v", "h") if m.spk == 2 else ("v", "h", "d1", "d2")
        logit_module = LearnableSobel(num_classes, channelwise=True, form="1order", sobel_init=m.sobel_init,
                                      masks=masks, init=m.init)
    net = SegModel(backbone, classifier, decoder, stage_extras=extras, logit_module=logit_module,
                   needs_edges=m.edge_input is not None, framework=m.framework)
    net.pretrained_sha256 = sha256
    if m.norm == "sync":
        net = convert_sync_batchnorm(net)
    return net


# ------------------------------------------------------------------ parameter groups

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
ROLES = ("kernel", "scale", "bias", "norm")


def parameter_groups(model: nn.Module) -> dict[str, dict[str, list[nn.Parameter]]]:
    """Every trainable parameter, once, by named group and role:
    {group: {role: [params]}}, groups backbone | classifier | decoder | extras
    (segdist.recipe.Multipliers), roles kernel (conv/deconv weights), scale (per-channel
    scales), bias, norm (BatchNorm affine).

    The group is the model's top-level module (backbone, classifier, decoder; extras and the
    SPK logit_module are extras), unless a module on the way down says otherwise with a
    `param_group` attribute (the Sobel/edge modules and the GCN kernels are extras wherever
    they sit). Frozen parameters (frozen BN) are in none. A DDP wrapper is looked through."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    groups: dict[str, dict[str, list[nn.Parameter]]] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, group: str) -> None:
        group = getattr(module, "param_group", group)
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            role = "norm" if is_norm else "bias" if name == "bias" else "kernel" if param.dim() > 1 else "scale"
            groups.setdefault(group, {}).setdefault(role, []).append(param)
        for child in module.children():
            walk(child, group)

    for name, child in model.named_children():
        walk(child, {"logit_module": "extras"}.get(name, name))
    return groups


# ------------------------------------------------------------------ size and FLOPs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: nn.Module, num_classes: int | None = None, input_size: int | tuple[int, int] = 321) -> dict[str, Any]:
    """{"params", "size_mb", "gflops"} of a model.

    params: every parameter (trainable or frozen; buffers such as BN running statistics
    are not counted). size_mb: params * 4 bytes / 2**20, i.e. fp32 MiB (the log's
    "MB"). gflops: FLOPs of one forward of a 1x3xHxW input (input_size S or (H, W)) counted by
    torch.utils.flop_counter.FlopCounterMode (a multiply-add counts as 2 FLOPs), on a
    meta-device copy, so nothing is computed and the model is not touched.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    params = count_params(model)
    meta = copy.deepcopy(model).to("meta").eval()
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    images = torch.zeros(1, 3, h, w, device="meta")
    inputs = (images,)
    if getattr(meta, "needs_edges", False):
        inputs = (images, torch.zeros(1, 1, h, w, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(*inputs)
    return {
        "params": params,
        "size_mb": round(params * 4 / 2**20, 2),
        "gflops": round(counter.get_total_flops() / 1e9, 3),
    }


@functools.lru_cache(maxsize=64)
def describe_recipe(model: ModelRecipe, num_classes: int, input_size: tuple[int, int]) -> dict[str, Any]:
    """describe_model of the network `model` (a ModelRecipe) builds for `num_classes`, with its
    output_stride: {"params", "size_mb", "gflops", "output_stride"}. Built on the meta device:
    nothing is computed and no weights are read (seconds for a ResNet-101; cached)."""
    with torch.device("meta"):
        net = build_model(model, num_classes, load_pretrained=False)
    return {**describe_model(net, num_classes, input_size), "output_stride": net.output_stride}


@functools.lru_cache(maxsize=64)
def smallest_norm_input(model, crop: tuple[int, int]) -> tuple[str, int, int] | None:
    """The BatchNorm that normalises the smallest feature map when `model` (a ModelRecipe)
    trains on crop (height, width) pixels: (module name, height, width) of that map, or None
    when no BatchNorm learns from the batch (norm "frozen" freezes the backbone's only). The
    model is built and run on the meta device: nothing is computed, no weights are read."""
    with torch.device("meta"):
        net = build_model(model, 2, load_pretrained=False).eval()
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str, inputs: tuple) -> None:  # a pre-hook returning None leaves the input alone
        seen.setdefault(name, tuple(inputs[0].shape[-2:]))

    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, FrozenBatchNorm2d):
            module.register_forward_pre_hook(lambda _module, inputs, name=name: record(name, inputs))
    images = torch.zeros(1, 3, *crop, device="meta")
    with torch.no_grad():
        net(images, torch.zeros(1, 1, *crop, device="meta")) if net.needs_edges else net(images)
    if not seen:
        return None
    name, (h, w) = min(seen.items(), key=lambda item: item[1][0] * item[1][1])
    return name, int(h), int(w)
