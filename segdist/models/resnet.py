"""ResNet-18/34/50/101/152 backbones with DeepLab dilation, torchvision-compatible names.

The module and parameter names are exactly torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, ...) so an ImageNet state dict saved by torchvision loads as is;
there is no `fc` (segmentation does not use it) and `fc.*` keys in a file are ignored.

`width` is the number of stem channels: 64 is the real network; smaller widths scale every
stage proportionally (stage planes width, 2w, 4w, 8w) for tiny test models.
Output stride 8/16/32: the strides of layer3/layer4 are replaced by dilation 2/4
(DeepLab style: every block of a dilated stage uses the stage's dilation).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segdist.errors import SegdistError

NORMS = ("batch", "sync", "frozen")
LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# output stride -> (stride, dilation) of layer3 and layer4
_DILATION = {32: ((2, 1), (2, 1)), 16: ((2, 1), (1, 2)), 8: ((1, 2), (1, 4))}


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


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
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
    layer1..layer4; `output_stride` is the stride of layer4's output."""

    def __init__(self, depth: int = 101, width: int = 64, output_stride: int = 8, norm: str = "batch"):
        super().__init__()
        if depth not in LAYOUTS:
            raise SegdistError(f"unknown ResNet depth {depth}; valid: {', '.join(map(str, LAYOUTS))}")
        if output_stride not in _DILATION:
            raise SegdistError(f"output stride must be 8, 16 or 32, got {output_stride}")
        if width < 1:
            raise SegdistError(f"ResNet width must be positive, got {width}")
        kind, blocks = LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        norm_cls = norm_layer(norm)
        self.depth, self.width, self.output_stride = depth, width, output_stride
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_cls(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        (s3, d3), (s4, d4) = _DILATION[output_stride]
        self._inplanes = width
        self.layer1 = self._make_layer(block, width, blocks[0], 1, 1, norm_cls)
        self.layer2 = self._make_layer(block, width * 2, blocks[1], 2, 1, norm_cls)
        self.layer3 = self._make_layer(block, width * 4, blocks[2], s3, d3, norm_cls)
        self.layer4 = self._make_layer(block, width * 8, blocks[3], s4, d4, norm_cls)
        self.channels = tuple(width * m * block.expansion for m in (1, 2, 4, 8))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, count, stride, dilation, norm_cls):
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_cls(planes * block.expansion),
            )
        layers = [block(self._inplanes, planes, stride, dilation, downsample, norm_cls)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes, 1, dilation, None, norm_cls) for _ in range(1, count)]
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


def load_torchvision_weights(backbone: ResNet, path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict (ImageNet weights) into `backbone`.

    `fc.*` is ignored and `num_batches_tracked` may be absent (older torchvision files);
    any other missing or unexpected key, or a shape mismatch, is a SegdistError naming
    the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise SegdistError(f"{path}: pretrained weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise SegdistError(f"{path}: not a loadable torch state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise SegdistError(f"{path}: expected a torchvision ResNet state dict (a mapping of tensor names)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    for key, value in state.items():
        if key not in own:
            raise SegdistError(
                f"{path}: unexpected key {key!r} for a ResNet-{backbone.depth} backbone "
                "(is it a torchvision ResNet of this depth?)"
            )
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SegdistError(
                f"{path}: key {key!r} has shape {shape}, the model expects {tuple(own[key].shape)} "
                f"(depth {backbone.depth}, width {backbone.width})"
            )
    for key in own:
        if key not in state and not key.endswith("num_batches_tracked"):
            raise SegdistError(f"{path}: missing key {key!r} for a ResNet-{backbone.depth} backbone")
    backbone.load_state_dict(state, strict=False)
