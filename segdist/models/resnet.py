"""ResNet-18/34/50/101/152 backbones, torchvision-compatible names, with the stride placement,
dilations and framework numerics of a recipe (segdist.recipe.ModelRecipe).

The module and parameter names are exactly torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, ...) so an ImageNet state dict saved by torchvision loads as is
(segdist.models.pretrained); there is no `fc` (segmentation does not use it).

`width` is the number of stem channels: 64 is the real network; smaller widths scale every
stage proportionally (stage planes width, 2w, 4w, 8w) for tiny test models.
Per stage res3, res4, res5 (layer2..layer4): a stride (1 or 2), a dilation of its 3x3 convs
(every block of the stage, the first included) and where a strided bottleneck puts its
stride: on the 3x3 conv2 (torchvision, "ResNet v1.5") or on the 1x1 conv1 (the original
Caffe ResNet and the 2017 DeepLab code's `stride_first`). The shortcut's 1x1 conv carries the
stride either way. DeepLab's own placements for output stride 8/16/32 are STRIDES.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segdist.errors import SegdistError
from segdist.models import tf1
from segdist.models.init import init_conv

NORMS = ("batch", "sync", "frozen")
STRIDE_PLACES = ("1x1", "3x3")  # where a strided bottleneck strides: its 1x1 conv1 or its 3x3 conv2
LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# output stride -> (strides, dilations) of res3, res4, res5: DeepLab's placement (every block of a
# dilated stage uses the stage's dilation)
STRIDES = {8: ((2, 1, 1), (1, 2, 4)), 16: ((2, 2, 1), (1, 1, 2)), 32: ((2, 2, 2), (1, 1, 1))}


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never learns.

    A subclass of BatchNorm2d so that the state-dict keys stay torchvision's; the affine
    parameters have requires_grad=False and the statistics are never updated, whatever
    `model.train()` says.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """nn.SyncBatchNorm that also synchronises CPU tensors (gloo DDP workers).

    PyTorch's SyncBatchNorm raises on CPU input once a process group exists; here the
    per-channel sum, sum of squares and count are all-reduced with the differentiable
    torch.distributed.nn.functional.all_reduce instead. On GPU, or without a process
    group, or in eval mode, it is exactly nn.SyncBatchNorm. Same state-dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and x.device.type == "cpu" and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = all_reduce(local, group=self.process_group or dist.group.WORLD)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm, with SyncBatchNorm2d (CPU-capable)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm2d
    return module


def norm_layer(kind: str):
    """The BatchNorm class for a norm kind. `sync` builds plain BatchNorm2d here; the
    factory converts the whole model with nn.SyncBatchNorm.convert_sync_batchnorm."""
    if kind not in NORMS:
        raise SegdistError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    return FrozenBatchNorm2d if kind == "frozen" else nn.BatchNorm2d


def _bn_zero_gamma(bn: nn.BatchNorm2d) -> None:
    if bn.weight is not None and bn.weight.requires_grad:
        nn.init.zeros_(bn.weight)


class BasicBlock(nn.Module):
    expansion = 1
    last_bn = "bn2"  # the BN that ends the residual branch (gamma 0 under tensorpack init)

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm=nn.BatchNorm2d,
                 stride_on="3x3", framework="pytorch"):
        super().__init__()
        self.conv1 = tf1.conv2d(framework, inplanes, planes, 3, stride, dilation)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = tf1.conv2d(framework, planes, planes, 3, 1, dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's bottleneck; the stride on the 3x3 conv2 (stride_on "3x3", v1.5) or on the
    1x1 conv1 ("1x1")."""

    expansion = 4
    last_bn = "bn3"

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm=nn.BatchNorm2d,
                 stride_on="3x3", framework="pytorch"):
        super().__init__()
        first = stride if stride_on == "1x1" else 1
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=first, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = tf1.conv2d(framework, planes, planes, 3, stride // first, dilation)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The feature extractor: stem (conv1, bn1, relu, maxpool) and layer1..layer4
    (= res2..res5 in DeepLab's naming). `channels` lists the output channels of
    layer1..layer4; `output_stride` is the stride of layer4's output.

    strides / dilations / stride_on: of res3, res4, res5 (default: STRIDES[output_stride],
    stride on the 3x3). framework: tf1 (TF "SAME" padding of the strided stem conv, pool and
    strided 3x3 convs) | pytorch (segdist.models.tf1). init: tensorpack (variance scaling,
    fan_out, as the original's backbone argscope; gamma 0 on each block's last BN) | pytorch
    (Kaiming normal, fan_out); ImageNet weights replace either."""

    def __init__(self, depth: int = 101, width: int = 64, output_stride: int = 8, norm: str = "batch", *,
                 strides=None, dilations=None, stride_on=("3x3", "3x3", "3x3"), framework: str = "pytorch",
                 init: str = "pytorch"):
        super().__init__()
        if depth not in LAYOUTS:
            raise SegdistError(f"unknown ResNet depth {depth}; valid: {', '.join(map(str, LAYOUTS))}")
        if output_stride not in STRIDES:
            raise SegdistError(f"output stride must be 8, 16 or 32, got {output_stride}")
        if width < 1:
            raise SegdistError(f"ResNet width must be positive, got {width}")
        if strides is None or dilations is None:
            strides, dilations = STRIDES[output_stride]
        if 4 * math.prod(strides) != output_stride:
            raise SegdistError(f"strides {tuple(strides)} give output stride {4 * math.prod(strides)}, not {output_stride}")
        kind, blocks = LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        norm_cls = norm_layer(norm)
        self.depth, self.width, self.output_stride = depth, width, output_stride
        self.conv1 = tf1.conv2d(framework, 3, width, 7, stride=2)
        self.bn1 = norm_cls(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = tf1.max_pool(framework)
        self._inplanes = width
        common = dict(norm_cls=norm_cls, framework=framework)
        self.layer1 = self._make_layer(block, width, blocks[0], 1, 1, "3x3", **common)
        self.layer2 = self._make_layer(block, width * 2, blocks[1], strides[0], dilations[0], stride_on[0], **common)
        self.layer3 = self._make_layer(block, width * 4, blocks[2], strides[1], dilations[1], stride_on[1], **common)
        self.layer4 = self._make_layer(block, width * 8, blocks[3], strides[2], dilations[2], stride_on[2], **common)
        self.channels = tuple(width * m * block.expansion for m in (1, 2, 4, 8))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv(m, init, mode="fan_out")
        if init == "tensorpack":
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    _bn_zero_gamma(getattr(m, m.last_bn))

    def _make_layer(self, block, planes, count, stride, dilation, stride_on, norm_cls, framework):
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_cls(planes * block.expansion),
            )
        kw = dict(norm=norm_cls, stride_on=stride_on, framework=framework)
        layers = [block(self._inplanes, planes, stride, dilation, downsample, **kw)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes, 1, dilation, None, **kw) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[res2, res3, res4, res5] features."""
        x = self.stem(x)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats
