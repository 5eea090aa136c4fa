"""Segmentation scores from a confusion matrix (rows = ground truth, columns = prediction).

The matrix is a plain int64 tensor, so it can be summed across DDP ranks with one
all-reduce and the same code scores offline folders.
"""

from __future__ import annotations

import torch

from segdist.data.classes import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, num_classes] counts; pixels whose target is IGNORE_INDEX are skipped."""
    keep = target != IGNORE_INDEX
    if keep.any() and int(target[keep].max()) >= num_classes:
        raise ValueError(f"label value {int(target[keep].max())} is outside 0..{num_classes - 1}")
    index = target[keep].to(torch.int64) * num_classes + pred[keep].to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy.

    A class that appears neither in the ground truth nor in the predictions has no IoU
    (NaN) and is left out of the mean, as in mmsegmentation and the official evaluators.
    """
    conf = confusion.to(torch.float64)
    true_positive = conf.diag()
    gt_pixels = conf.sum(dim=1)
    pred_pixels = conf.sum(dim=0)
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
