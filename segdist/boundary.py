"""Boundary statistics: scores on pixels near ground-truth boundaries and on the rest.

A pixel is a *boundary* pixel for kernel K if any ground-truth value in its KxK window
(ignore included) differs from its own; all other pixels are *inner*. The window is clipped
to the image: nothing outside the image takes part, so image borders never create fake
boundaries (the original padded with a value that did). Pixels whose ground truth is
IGNORE_INDEX are, as always, not scored (they can still make their neighbours boundary).

Two confusion matrices per K (boundary, inner); they add up to the full matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from segdist.errors import SegdistError
from segdist.metrics import confusion_matrix, scores

DEFAULT_KERNELS = (11, 15, 19)


def check_kernels(kernels) -> tuple[int, ...]:
    out = []
    for k in kernels:
        if isinstance(k, bool) or int(k) != k or k < 3 or k % 2 == 0:
            raise SegdistError(f"boundary kernel sizes must be odd integers >= 3, got {k!r}")
        out.append(int(k))
    if len(set(out)) != len(out):
        raise SegdistError(f"boundary kernel sizes repeat a value: {list(kernels)}")
    return tuple(out)


def _max_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """KxK maximum over the window clipped to the image ([N, 1, H, W] float).

    max_pool2d pads with -inf, so out-of-image positions never win: the clipped window.
    Separable (rows, then columns): 2K comparisons per pixel instead of K^2.
    """
    r = kernel // 2
    x = F.max_pool2d(x, kernel_size=(1, kernel), stride=1, padding=(0, r))
    return F.max_pool2d(x, kernel_size=(kernel, 1), stride=1, padding=(r, 0))


def boundary_mask(target: torch.Tensor, kernel: int) -> torch.Tensor:
    """bool, same shape as `target` ([H, W] or [N, H, W]): True at boundary pixels."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd, got {kernel}")
    shape = target.shape
    x = target.reshape(-1, 1, *shape[-2:]).to(torch.float32)  # labels <= 255 are exact
    high = _max_filter(x, kernel)
    low = -_max_filter(-x, kernel)
    # the window holds the pixel itself: "some value differs from mine" == max != min
    return (high != low).reshape(shape)


def boundary_confusions(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    kernels=DEFAULT_KERNELS,
    matrix: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = confusion_matrix,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{K: (boundary confusion, inner confusion)} for one prediction or a batch: pred and
    target of one shape ([H, W] or [N, H, W]), the boundary taken from `target`. `matrix`
    counts each part: segdist.metrics.confusion_matrix ([C, C]) or confusion_matrix_with_void
    ([C, C+1]); its ValueErrors pass through."""
    out = {}
    for k in kernels:
        mask = boundary_mask(target, k)
        out[int(k)] = (
            matrix(pred[mask], target[mask], num_classes),
            matrix(pred[~mask], target[~mask], num_classes),
        )
    return out


def boundary_scores(confusions: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """{"11": {"boundary": scores, "inner": scores}, ...} (string keys: JSON)."""
    return {
        str(k): {"boundary": scores(b.cpu()), "inner": scores(i.cpu())}
        for k, (b, i) in sorted(confusions.items())
    }
