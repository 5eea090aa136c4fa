"""A training batch as train_loader ships it, and its conversion on the training device.

The loader's workers write every augmented crop straight into a uint8 [B, h, w, 4] array
(R, G, B and the edge map x255, see TrainTransform) and labels into uint8 [B, h, w]. Why
uint8 and this layout: OpenCV warps 4-channel images ~4x faster than 3-channel ones, each
crop lands in its batch slot without a copy, and a batch is a quarter of float32's bytes
through the workers' shared memory, pinned memory and the host-to-device copy. The float
conversion and normalisation run on the device (`model_inputs`): the same float32
(x - 255 mean) * 1/(255 std) as the CPU `normalize` of validation images, so the numbers do
not depend on where they are computed. NHWC memory is channels_last for free.
"""

from __future__ import annotations

import functools

import torch

from segdist.data.transforms import _INV_STD255, _MEAN255


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied to each device once: a copy from pageable memory every step would make the host
    # wait for the device every step.
    mean = torch.from_numpy(_MEAN255).view(1, 3, 1, 1).to(device)
    return mean, torch.from_numpy(_INV_STD255).view(1, 3, 1, 1).to(device)


def model_inputs(
    images: torch.Tensor, device: torch.device, *, channels_last: bool = False, edges: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 [B, h, w, 4] -> (float32 [B, 3, h, w] normalised, float32 [B, 1, h, w] edge map
    in [0, 1] or None), on `device` in the requested memory format."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 4:
        raise ValueError(f"expected a uint8 [B, h, w, 4] training batch, got {images.dtype} {tuple(images.shape)}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    nchw = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # a view: NHWC memory
    mean, inv_std = _statistics(torch.device(device))
    rgb = ((nchw[:, :3].float() - mean) * inv_std).contiguous(memory_format=memory_format)
    if not edges:
        return rgb, None
    edge_map = (nchw[:, 3:4].float() / 255.0).contiguous(memory_format=memory_format)
    return rgb, edge_map


def model_targets(targets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 class indices -> int64 (what cross_entropy takes); soft float32 targets as they are."""
    targets = targets.to(device, non_blocking=True)
    return targets.long() if targets.dtype == torch.uint8 else targets
