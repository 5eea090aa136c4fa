"""Pictures of an evaluation: the confusion matrix and image | ground truth | prediction
overlays, as matplotlib figures or PNG bytes (Agg backend, no display needed). Training
saves them beside its checkpoint; the MLflow callback logs them (segdist.mlflow_callback).

    png = confusion_matrix_png(confusion, classes)
    png = overlays_png(examples, classes)          # examples: [(key, rgb, gt, pred), ...]
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # a no-op when a backend is already chosen elsewhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from segdist.data.classes import IGNORE_INDEX, voc_palette  # noqa: E402

# (key, rgb uint8 [H, W, 3], ground truth uint8 [H, W], prediction uint8 [H, W])
Example = tuple[str, np.ndarray, np.ndarray, np.ndarray]

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colorize(label: np.ndarray) -> np.ndarray:
    """Class indices -> RGB with the VOC colour map (255 = ignore: its cream colour)."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def overlay(rgb: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The label's colours blended over the image; ignore pixels show the plain image."""
    rgb = np.asarray(rgb, dtype=np.float32)
    colours = colorize(label).astype(np.float32)
    mixed = (1 - alpha) * rgb + alpha * colours
    keep = (np.asarray(label) == IGNORE_INDEX)[..., None]
    return np.where(keep, rgb, mixed).round().astype(np.uint8)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_figure(confusion, classes: Sequence[str], normalize: bool = True) -> Figure:
    """Rows = ground truth, columns = prediction; normalised per row (recall) by default."""
    conf = np.asarray(confusion.cpu() if hasattr(confusion, "cpu") else confusion, dtype=np.float64)
    conf = conf[:, : conf.shape[0]]
    n = conf.shape[0]
    if normalize:
        rows = conf.sum(axis=1, keepdims=True)
        conf = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    size = max(4.0, 0.35 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(conf, cmap="viridis", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes)[:n], rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=list(classes)[:n], fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else " (pixels)"))
    if n <= 25 and normalize:
        for i in range(n):
            for j in range(n):
                if conf[i, j] >= 0.005:
                    ax.text(j, i, f"{conf[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="black" if conf[i, j] > 0.5 else "white")
    return fig


def confusion_matrix_png(confusion, classes: Sequence[str], normalize: bool = True) -> bytes:
    return figure_png(confusion_matrix_figure(confusion, classes, normalize))


def overlays_figure(examples: Sequence[Example], classes: Sequence[str]) -> Figure:
    """One row per example: image | ground truth overlay | prediction overlay, and a legend
    of the classes present."""
    if not examples:
        raise ValueError("no examples to draw")
    rows = len(examples)
    height, width = examples[0][2].shape
    panel_w = 3.2
    panel_h = max(1.5, panel_w * height / max(width, 1))
    fig, axes = plt.subplots(rows, 3, figsize=(3 * panel_w, rows * panel_h + 0.8), squeeze=False)
    present: set[int] = set()
    for row, (key, rgb, gt, pred) in enumerate(examples):
        for col, (title, picture) in enumerate(
            (("image", rgb), ("ground truth", overlay(rgb, gt)), ("prediction", overlay(rgb, pred)))
        ):
            ax = axes[row][col]
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(str(key), fontsize=7)
        present.update(int(v) for v in np.unique(gt) if v != IGNORE_INDEX)
        present.update(int(v) for v in np.unique(pred) if v != IGNORE_INDEX)
    handles = [
        Patch(color=_PALETTE[c] / 255.0, label=classes[c] if c < len(classes) else str(c)) for c in sorted(present)
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def overlays_png(examples: Sequence[Example], classes: Sequence[str]) -> bytes:
    return figure_png(overlays_figure(examples, classes))
