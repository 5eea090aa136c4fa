"""The readable report of a summary (segdist.evaluation.results.summarize, score_folders)."""

from __future__ import annotations

import math
from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    """A readable report: headline numbers (and without_crf's), per-class IoU, and the
    boundary table when present; percentages with two decimals, NaN or None as n/a."""

    def pct(v) -> str:
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.2f}"

    lines = [
        f"images {summary['num_images']}   mIoU {pct(summary['miou'])}   pixel acc {pct(summary['pixel_acc'])}   "
        f"mean acc {pct(summary['mean_acc'])}"
    ]
    if "without_crf" in summary:
        w = summary["without_crf"]
        lines.append(f"without CRF:   mIoU {pct(w['miou'])}   pixel acc {pct(w['pixel_acc'])}   mean acc {pct(w['mean_acc'])}")
    lines.append("per-class IoU:")
    for name, iou in summary["per_class_iou"].items():
        lines.append(f"  {name:<16} {pct(iou)}")
    if "boundary" in summary:
        lines.append("boundary statistics (mIoU, pixel acc, mean acc):")
        for k, parts in summary["boundary"].items():
            b, i = parts["boundary"], parts["inner"]
            lines.append(
                f"  K={k:<3} boundary {pct(b['miou'])} {pct(b['pixel_acc'])} {pct(b['mean_acc'])}   "
                f"inner {pct(i['miou'])} {pct(i['pixel_acc'])} {pct(i['mean_acc'])}"
            )
    return "\n".join(lines)
