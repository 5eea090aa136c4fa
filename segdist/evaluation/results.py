"""The confusion matrices of an evaluation: summed per sample, over DDP ranks, and scored.

    acc = Accumulator(num_classes, device, kernels)
    acc.add(pred, label)                          # every sample
    result = all_reduce_result(acc.result())      # sum over DDP ranks (one all-reduce)
    summary = summarize(result, classes)          # {"miou", "per_class_iou", ..., "boundary"}
    metrics = flat_metrics(summary, prefix="val_")  # MLflow-friendly names
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from segdist.boundary import boundary_confusions, boundary_scores
from segdist.distributed import all_reduce_sum, rank_and_world_size
from segdist.metrics import confusion_matrix, confusion_matrix_with_void, scores


@dataclass
class EvalResult:
    """Confusion matrices (int64) of one rank, or of all ranks after all_reduce_result.

    confusion: [C, C] of the final predictions (after the CRF when it ran; [C, C+1] with a
    void-prediction column from score_folders); boundary: {K: (boundary, inner)} matrices of
    the final predictions, same shape; before_crf: [C, C] of the MSF argmax when the CRF
    ran, else None; num_images: images scored.
    """

    confusion: torch.Tensor
    boundary: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    before_crf: torch.Tensor | None = None
    num_images: int = 0

    def matrices(self) -> list[torch.Tensor]:
        out = [self.confusion]
        if self.before_crf is not None:
            out.append(self.before_crf)
        for k in sorted(self.boundary):
            out.extend(self.boundary[k])
        return out

    def flat(self) -> torch.Tensor:
        """Every matrix and the image count in one int64 vector (for one all-reduce)."""
        parts = [m.reshape(-1) for m in self.matrices()]
        count = torch.tensor([self.num_images], dtype=torch.int64, device=self.confusion.device)
        return torch.cat([*parts, count])

    def with_flat(self, flat: torch.Tensor) -> EvalResult:
        """The same layout filled from `flat` (e.g. after dist.all_reduce(flat))."""
        mats = []
        offset = 0
        for m in self.matrices():
            mats.append(flat[offset : offset + m.numel()].reshape(m.shape))
            offset += m.numel()
        it = iter(mats)
        confusion = next(it)
        before = next(it) if self.before_crf is not None else None
        boundary = {k: (next(it), next(it)) for k in sorted(self.boundary)}
        return EvalResult(confusion, boundary, before, int(flat[offset]))


class Accumulator:
    """Sums the confusion matrices of predictions one sample at a time: the whole image and,
    for each boundary kernel K, its boundary and inner pixels (segdist.boundary).

    void=False: predictions must be classes 0..C-1, matrices are [C, C]; void=True: a
    prediction of 255 is "no class", matrices are [C, C+1] (segdist.metrics).
    """

    def __init__(self, num_classes: int, device="cpu", kernels: Sequence[int] = (), void: bool = False):
        self.num_classes = num_classes
        self.kernels = tuple(kernels)
        self.matrix = confusion_matrix_with_void if void else confusion_matrix
        cols = num_classes + 1 if void else num_classes
        zeros = lambda: torch.zeros(num_classes, cols, dtype=torch.int64, device=device)  # noqa: E731
        self.confusion = zeros()
        self.boundary = {k: (zeros(), zeros()) for k in self.kernels}
        self.count = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer [H, W] on the accumulator's device (label 255: not scored).
        ValueError for values outside the classes (segdist.metrics)."""
        self.confusion += self.matrix(pred, label, self.num_classes)
        confusions = boundary_confusions(pred, label, self.num_classes, self.kernels, self.matrix)
        for k, (b, i) in confusions.items():
            self.boundary[k][0].add_(b)
            self.boundary[k][1].add_(i)
        self.count += 1

    def result(self) -> EvalResult:
        return EvalResult(self.confusion, self.boundary, None, self.count)


def all_reduce_result(result: EvalResult) -> EvalResult:
    """Sum the matrices over all DDP ranks with one all-reduce (no-op without a process
    group). Every rank must call it with the same scales/boundary/CRF settings."""
    if rank_and_world_size()[1] == 1:
        return result
    return result.with_flat(all_reduce_sum(result.flat()))


def _named(result: dict, classes: Sequence[str]) -> dict:
    out = dict(result)
    out["per_class_iou"] = dict(zip(classes, result["per_class_iou"], strict=True))
    return out


def summarize(result: EvalResult, classes: Sequence[str]) -> dict[str, Any]:
    """JSON-ready scores: miou, per_class_iou {class: iou}, pixel_acc, mean_acc,
    num_images, and when present boundary {"K": {"boundary": ..., "inner": ...}} (K in
    increasing order) and without_crf {...}. Absent classes have NaN IoU (None after
    json_safe)."""
    summary: dict[str, Any] = _named(scores(result.confusion.cpu()), classes)
    summary["num_images"] = result.num_images
    if result.boundary:
        summary["boundary"] = {
            k: {part: _named(s, classes) for part, s in v.items()} for k, v in boundary_scores(result.boundary).items()
        }
    if result.before_crf is not None:
        summary["without_crf"] = _named(scores(result.before_crf.cpu()), classes)
    return summary


def flat_metrics(summary: dict[str, Any], prefix: str = "val_") -> dict[str, float]:
    """MLflow metric names: val_miou, val_pixel_acc, val_mean_acc, val_iou_<class name>,
    val_boundary11_miou / _pixel_acc / _mean_acc, val_inner11_..., val_nocrf_miou, ...
    NaN values are left out (MLflow would store them, but they break plots)."""
    out: dict[str, float] = {}

    def add(name: str, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)

    for key in ("miou", "pixel_acc", "mean_acc"):
        add(f"{prefix}{key}", summary[key])
    for name, iou in summary["per_class_iou"].items():
        add(f"{prefix}iou_{name}", iou)  # the names train.py logs (spaces kept: MLflow allows them)
    for k, parts in summary.get("boundary", {}).items():
        for part, s in parts.items():
            for key in ("miou", "pixel_acc", "mean_acc"):
                add(f"{prefix}{part}{k}_{key}", s[key])
    if "without_crf" in summary:
        for key in ("miou", "pixel_acc", "mean_acc"):
            add(f"{prefix}nocrf_{key}", summary["without_crf"][key])
    return out
