"""Segmentation scores from a confusion matrix (rows = ground truth, columns = prediction).

The matrix is a plain int64 tensor, so it can be summed across DDP ranks with one
all-reduce and the same code scores offline folders.

A matrix may carry one extra *void-prediction column* ([C, C+1]): pixels whose prediction
is no class at all (a Cityscapes prediction PNG holding an ignored labelId). As in the
official Cityscapes evaluator they count as false negatives of their ground-truth class
and as false positives of none.
"""

from __future__ import annotations

import math

import torch

from segdist.data.classes import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts; pixels whose target is IGNORE_INDEX are skipped.

    Ground truth and prediction values must lie in 0..num_classes-1 (ValueError otherwise);
    use `confusion_matrix_with_void` for predictions that may be "no class".
    """
    keep = target != IGNORE_INDEX
    gt = target[keep].to(torch.int64)
    pr = pred[keep].to(torch.int64)
    if gt.numel():
        # one host sync for both range checks
        lo_hi = torch.stack([gt.max(), pr.max(), pr.min()]).tolist()
        if lo_hi[0] >= num_classes:
            raise ValueError(f"label value {lo_hi[0]} is outside 0..{num_classes - 1}")
        if lo_hi[1] >= num_classes or lo_hi[2] < 0:
            bad = lo_hi[1] if lo_hi[1] >= num_classes else lo_hi[2]
            raise ValueError(f"prediction value {bad} is outside 0..{num_classes - 1}")
    index = gt * num_classes + pr
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix_with_void(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes + 1]: like `confusion_matrix`, but a prediction of
    IGNORE_INDEX ("no class") is counted in the last column instead of being an error."""
    keep = target != IGNORE_INDEX
    gt = target[keep].to(torch.int64)
    pr = pred[keep].to(torch.int64)
    if gt.numel():
        if int(gt.max()) >= num_classes:
            raise ValueError(f"label value {int(gt.max())} is outside 0..{num_classes - 1}")
        bad = (pr != IGNORE_INDEX) & ((pr < 0) | (pr >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"prediction value {int(pr[bad][0])} is outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    pr = torch.where(pr == IGNORE_INDEX, torch.full_like(pr, num_classes), pr)
    cols = num_classes + 1
    return torch.bincount(gt * cols + pr, minlength=num_classes * cols).reshape(num_classes, cols)


def scores(confusion: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy.

    `confusion` is [C, C] or [C, C+1] (last column: void predictions, see the module doc).
    A class that appears neither in the ground truth nor in the predictions has no IoU
    (NaN) and is left out of the mean, as in mmsegmentation and the official evaluators.
    """
    conf = confusion.to(torch.float64)
    num_classes = conf.shape[0]
    if conf.dim() != 2 or conf.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"confusion matrix must be [C, C] or [C, C+1], got {list(conf.shape)}")
    square = conf[:, :num_classes]
    true_positive = square.diag()
    gt_pixels = conf.sum(dim=1)  # void predictions are false negatives
    pred_pixels = square.sum(dim=0)  # ...and false positives of no class
    union = gt_pixels + pred_pixels - true_positive
    iou = true_positive / union  # 0/0 -> NaN for absent classes
    class_acc = true_positive / gt_pixels
    total = conf.sum()
    return {
        "miou": float(iou.nanmean()) if total else float("nan"),
        "per_class_iou": [float(v) for v in iou],
        "pixel_acc": float(true_positive.sum() / total) if total else float("nan"),
        "mean_acc": float(class_acc.nanmean()) if total else float("nan"),
    }


def json_safe(value):
    """NaN/inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
