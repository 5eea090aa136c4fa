"""Evaluation: the one place where predictions are scored.

Library (called from train.py, tune.py and tracking):

    result = evaluate_distributed(model, loader, num_classes, device,
                                  scales=(1.0,), flip=False, boundary_kernels=())
    result = all_reduce_result(result)            # sum over DDP ranks (one all-reduce)
    summary = summarize(result, classes)          # {"miou", "per_class_iou", ..., "boundary"}
    metrics = flat_metrics(summary, prefix="val_")  # MLflow-friendly names

Whole-image evaluation is scales=(1.0,), flip=False, tile_size=None. MSF is
segdist.msf.MultiScaleInference, the CRF stage segdist.crf, boundary statistics
segdist.boundary, pictures segdist.visualize.

Command line (`python -m segdist.evaluate --help`):

    # a checkpoint over validation shards (model rebuilt from the checkpoint's config)
    python -m segdist.evaluate --checkpoint CKPT --shards DIR_OR_URL \\
        [--scales 0.5,0.75,1,1.25,1.5] [--flip] [--crf] [--boundary 11,15,19] [--json]
    # folders of label PNGs in the dataset's official format
    python -m segdist.evaluate --pred-dir P --gt-dir G --dataset voc|cityscapes [--json]
        [--pred-ids auto|label|train]   # Cityscapes: labelIds (default) or trainIds
    # seconds per image: whole image, MSF, CRF
    python -m segdist.evaluate --benchmark
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from segdist.boundary import DEFAULT_KERNELS, boundary_mask, boundary_scores, check_kernels
from segdist.data.cityscapes import to_train_ids
from segdist.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_MAX_LABEL_ID,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    cityscapes_label_id_lut,
    voc_palette,
)
from segdist.errors import SegdistError, exit_on_user_error
from segdist.metrics import confusion_matrix, confusion_matrix_with_void, json_safe, scores
from segdist.msf import MultiScaleInference

DEFAULT_MSF_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)

# ----------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Confusion matrices of one rank (or, after all_reduce_result, of all ranks).

    confusion: final predictions (after the CRF when it ran); before_crf: the MSF argmax
    when the CRF ran, else None; boundary: {K: (boundary, inner)} of the final predictions;
    examples: up to `examples` (key, rgb, gt, pred) of this rank, for pictures (not reduced).
    """

    confusion: torch.Tensor
    boundary: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    before_crf: torch.Tensor | None = None
    num_images: int = 0
    examples: list = field(default_factory=list)

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
        return EvalResult(confusion, boundary, before, int(flat[offset]), self.examples)


def all_reduce_result(result: EvalResult) -> EvalResult:
    """Sum the matrices over all DDP ranks with one all-reduce (no-op without a process
    group). Every rank must call it with the same scales/boundary/CRF settings."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return result
    flat = result.flat()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return result.with_flat(flat)


def _named(result: dict, classes: Sequence[str]) -> dict:
    out = dict(result)
    out["per_class_iou"] = dict(zip(classes, result["per_class_iou"], strict=True))
    return out


def summarize(result: EvalResult, classes: Sequence[str]) -> dict[str, Any]:
    """JSON-ready scores: miou, per_class_iou {class: iou}, pixel_acc, mean_acc,
    num_images, and when present boundary {"K": {"boundary": ..., "inner": ...}} and
    without_crf {...}. Absent classes have NaN IoU (None after json_safe)."""
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


# ----------------------------------------------------------------------------- the loop

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3|4, H, W] image (segdist.data.transforms.normalize) -> uint8 RGB
    [H, W, 3]; exact for images that came from uint8."""
    rgb = image[:3].detach().float().cpu() * _STD + _MEAN
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


class _Accumulator:
    def __init__(self, num_classes: int, device, kernels: tuple[int, ...], examples: int, on_prediction=None):
        self.num_classes = num_classes
        self.on_prediction = on_prediction
        self.device = device
        self.kernels = kernels
        zeros = lambda: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # noqa: E731
        self.confusion = zeros()
        self.boundary = {k: (zeros(), zeros()) for k in kernels}
        self.max_examples = examples
        self.examples: list = []
        self.count = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor, key: str, rgb: np.ndarray | None) -> None:
        """pred, label: [H, W] on self.device."""
        self.confusion += confusion_matrix(pred, label, self.num_classes)
        for k in self.kernels:
            mask = boundary_mask(label, k)
            b, i = self.boundary[k]
            b += confusion_matrix(pred[mask], label[mask], self.num_classes)
            i += confusion_matrix(pred[~mask], label[~mask], self.num_classes)
        if self.on_prediction is not None:
            self.on_prediction(key, pred.cpu().numpy().astype(np.uint8))
        if len(self.examples) < self.max_examples and rgb is not None:
            self.examples.append(
                (key, rgb, label.cpu().numpy().astype(np.uint8), pred.cpu().numpy().astype(np.uint8))
            )
        self.count += 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.inference_mode()
def evaluate_distributed(
    model: torch.nn.Module,
    loader: Iterable,
    num_classes: int,
    device,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    boundary_kernels: Sequence[int] = (),
    tile_size: int | tuple[int, int] | None = None,
    tile_batch: int = 4,
    crf=None,
    crf_workers: int = 1,
    save_dir: str | os.PathLike | None = None,
    examples: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    limit: int = 0,
    on_prediction=None,
) -> EvalResult:
    """This rank's confusion matrices over its share of `loader` (no collectives: call
    all_reduce_result, or all-reduce `result.flat()` yourself).

    loader: yields (images [N, 3|4, H, W] normalised, labels [N, H, W]) or (..., keys),
    e.g. segdist.data.stream.val_loader. A DDP wrapper is looked through.
    scales / flip / tile_size / tile_batch / amp_dtype / channels_last: segdist.msf.
    MultiScaleInference (defaults: one whole-image pass in the model's dtype). boundary_kernels: K values for boundary/inner matrices.
    crf: a segdist.crf.CrfParams to run DenseCRF on the MSF probabilities in `crf_workers`
    processes (result.confusion is then after the CRF, result.before_crf before it).
    save_dir: write every sample's probabilities, image and label there (segdist.crf's
    saved-probabilities layout; the loader must give keys; meta.json is written by
    `save_probabilities`). examples: keep this many (key, rgb, gt, pred) for pictures.
    limit: stop after this many images on this rank (0 = all; for quick looks only).
    on_prediction: called as on_prediction(key, pred uint8 [H, W]) with every final
    prediction (e.g. to write PNGs with write_prediction_png).
    """
    from segdist.crf import CrfPool, write_sample

    kernels = check_kernels(boundary_kernels)
    device = torch.device(device)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient sync; the bare model has needs_edges
    model.eval()
    msf = MultiScaleInference(
        model, scales, flip, tile_size=tile_size, tile_batch=tile_batch, amp_dtype=amp_dtype, channels_last=channels_last
    )
    acc = _Accumulator(num_classes, device, kernels, examples, on_prediction)
    before_crf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if crf is not None else None
    rank = _rank()
    pending: collections.deque = collections.deque()
    seen = 0
    with CrfPool(crf_workers if crf is not None else 0) as pool:

        def drain(keep: int) -> None:
            while len(pending) > keep:
                future, label, key, rgb = pending.popleft()
                pred = torch.from_numpy(future.result()).to(device=device, dtype=torch.int64)
                acc.add(pred, label, key, rgb)

        for item in loader:
            images, labels = item[0], item[1]
            keys = item[2] if len(item) > 2 else None
            if isinstance(keys, str):
                keys = [keys]
            if save_dir is not None and keys is None:
                raise ValueError("save_dir needs a loader that gives sample keys (val_loader(..., with_keys=True))")
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            probs = msf(images)
            for n in range(images.shape[0]):
                key = keys[n] if keys is not None else f"rank{rank}_{seen}"
                label = labels[n].to(torch.int64)
                need_rgb = crf is not None or save_dir is not None or len(acc.examples) < examples
                rgb = denormalize(images[n]) if need_rgb else None
                pred = probs[n].argmax(0)
                if save_dir is not None:
                    write_sample(save_dir, key, probs[n].cpu().numpy(), rgb, labels[n].cpu().numpy().astype(np.uint8))
                if crf is None:
                    acc.add(pred, label, key, rgb)
                else:
                    before_crf += confusion_matrix(pred, label, num_classes)
                    p16 = probs[n].to(torch.float16).cpu().numpy()
                    pending.append((pool.labels(p16, rgb, crf), label, key, rgb))
                    drain(keep=2 * max(1, crf_workers))
                seen += 1
            del probs
            if limit and seen >= limit:
                break
        drain(keep=0)
    return EvalResult(acc.confusion, acc.boundary, before_crf, acc.count, acc.examples)


def save_probabilities(
    model: torch.nn.Module,
    loader: Iterable,
    folder: str | os.PathLike,
    classes: Sequence[str],
    device,
    *,
    scales: Sequence[float] = DEFAULT_MSF_SCALES,
    flip: bool = True,
    tile_size: int | tuple[int, int] | None = None,
    tile_batch: int = 4,
    meta: dict[str, Any] | None = None,
    **kwargs,
) -> EvalResult:
    """Run MSF over a split and write every sample's float16 probabilities, RGB image and
    label to `folder` (the input of the CRF grid, segdist.crf), plus meta.json (rank 0).
    The loader must give keys (val_loader(..., with_keys=True)). Also returns the scores of
    the MSF argmax, so nothing is computed twice."""
    from segdist.crf import write_meta

    if _rank() == 0:
        write_meta(
            folder,
            {
                "classes": list(classes),
                "scales": list(scales),
                "flip": bool(flip),
                "tile_size": tile_size,
                **(meta or {}),
            },
        )
    return evaluate_distributed(
        model, loader, len(classes), device, scales=scales, flip=flip, tile_size=tile_size,
        tile_batch=tile_batch, save_dir=folder, **kwargs,
    )


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict train.fit saves; SegdistError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SegdistError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SegdistError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not {"model", "trial", "classes"} <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise SegdistError(f"{path}: not a segdist checkpoint (needs keys model, trial, classes; has {have})")
    return state


def model_from_checkpoint(state: dict[str, Any], where: str):
    """(model with the checkpoint's weights, TrialConfig, classes) — the model rebuilt from
    the checkpoint's own recipe and class list."""
    from segdist.config import trial_from_dict
    from segdist.models import build_model

    try:
        trial = trial_from_dict(state["trial"])
    except (KeyError, TypeError, ValueError, SegdistError) as err:
        raise SegdistError(f"{where}: cannot rebuild the trial's recipe ({type(err).__name__}: {err}); "
                           "was it written by an older segdist?") from None
    classes = list(state["classes"])
    try:
        # the weights come from the checkpoint: never load the ImageNet file it started from
        model = build_model(trial.recipe.model, len(classes), load_pretrained=False)
    except SegdistError as err:
        raise SegdistError(f"{where}: {err}") from None
    weights = state["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            details.append(
                f"{len(shapes)} of another shape (e.g. {k}: {list(weights[k].shape)} vs {list(own[k].shape)})"
            )
        raise SegdistError(
            f"{where}: weights do not fit variant {trial.recipe.model.variant!r} (depth {trial.recipe.model.depth}, "
            f"width {trial.recipe.model.width}) with {len(classes)} classes: " + ", ".join(details)
        )
    model.load_state_dict(weights)
    return model, trial, classes


def check_classes_match(ckpt_classes: Sequence[str], info, ckpt_where: str) -> None:
    if list(ckpt_classes) != list(info.classes):
        what = (
            f"{len(ckpt_classes)} classes" if len(ckpt_classes) != len(info.classes) else "other class names"
        )
        raise SegdistError(
            f"{ckpt_where}: checkpoint has {what} ({', '.join(ckpt_classes[:3])}, ...) but shards {info.root} "
            f"({info.dataset}) have {len(info.classes)} ({', '.join(info.classes[:3])}, ...)"
        )


# ----------------------------------------------------------------------------- folders of PNGs

CITYSCAPES_PRED_IDS = ("auto", "label", "train")
_CITYSCAPES_TRAIN_IDS = len(CITYSCAPES_CLASSES)  # trainIds 0..18 (255: no class)


def _read_index_png(path: Path, what: str, rgb_ok: bool = False) -> np.ndarray:
    """An 8-bit one-channel PNG (mode P or L) as uint8 [H, W] values (palette PNGs: their
    indices). rgb_ok: also return RGB/RGBA PNGs, as uint8 [H, W, 3|4]. SegdistError for
    anything else (16-bit, colour when not rgb_ok, unreadable)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L") or (rgb_ok and im.mode in ("RGB", "RGBA")):
                return np.asarray(im, dtype=np.uint8)
            kind = {"I;16": "a 16-bit", "I": "a 32-bit", "1": "a 1-bit", "RGB": "a colour", "RGBA": "a colour"}
            raise SegdistError(f"{path}: {what} PNG is {kind.get(im.mode, 'an unsupported')} image (mode "
                               f"{im.mode}); expected one 8-bit channel of label values (mode P or L)")
    except SegdistError:
        raise
    except Exception as err:
        raise SegdistError(f"{path}: cannot read {what} PNG ({err})") from None


def _voc_colours_to_indices(rgb: np.ndarray, path: Path) -> np.ndarray:
    """uint8 [H, W, 3|4] drawn in the VOC colour map -> class indices 0..20. Exact colours
    only: any other colour, or a transparent pixel, is a SegdistError naming the file."""
    if rgb.shape[2] == 4 and (rgb[..., 3] != 255).any():
        raise SegdistError(f"{path}: colour prediction has transparent pixels; expected opaque VOC class colours")
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    palette = np.array(voc_palette(), dtype=np.int32).reshape(256, 3)[: len(VOC_CLASSES)]
    index_of = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(palette)}
    unknown = [int(c) for c in colours if int(c) not in index_of]
    if unknown:
        c = unknown[0]
        raise SegdistError(
            f"{path}: colour ({c >> 16}, {c >> 8 & 255}, {c & 255}) is not one of the {len(VOC_CLASSES)} VOC class "
            f"colours ({len(unknown)} unknown colour(s)); save class indices 0..{len(VOC_CLASSES) - 1} or exact "
            "VOC colours"
        )
    return np.array([index_of[int(c)] for c in colours], dtype=np.uint8)[inverse.reshape(packed.shape)]


def _voc_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) class indices of one VOC pair, checked."""
    c = len(VOC_CLASSES)
    pred = _read_index_png(pred_path, "prediction", rgb_ok=True)
    if pred.ndim == 3:
        pred = _voc_colours_to_indices(pred, pred_path)
    gt = _read_index_png(gt_path, "ground-truth")
    _check_same_size(pred, gt, pred_path, gt_path)
    bad_gt = (gt >= c) & (gt != IGNORE_INDEX)
    if bad_gt.any():
        raise SegdistError(f"{gt_path}: ground-truth value {int(gt[bad_gt][0])} outside 0..{c - 1} and 255")
    if pred.size and int(pred.max()) >= c:
        raise SegdistError(f"{pred_path}: prediction value {int(pred.max())} outside the VOC classes 0..{c - 1}")
    return pred, gt


def _cityscapes_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prediction as stored, ground truth in trainIds) of one Cityscapes pair; the ground
    truth must hold labelIds."""
    pred = _read_index_png(pred_path, "prediction")
    gt = _read_index_png(gt_path, "ground-truth")
    _check_same_size(pred, gt, pred_path, gt_path)
    if gt.size and int(gt.max()) > CITYSCAPES_MAX_LABEL_ID:
        raise SegdistError(f"{gt_path}: ground-truth value {int(gt.max())} is not a Cityscapes labelId "
                           f"(0..{CITYSCAPES_MAX_LABEL_ID}); expected gtFine labelIds")
    return pred, to_train_ids(gt)


def _cityscapes_prediction(pred: np.ndarray, path: Path, pred_ids: str) -> np.ndarray:
    """A stored Cityscapes prediction -> trainIds (255: no class). pred_ids "train": it holds
    trainIds (0..18, 255); "label" or "auto": labelIds (0..33)."""
    if pred_ids == "train":
        bad = (pred >= _CITYSCAPES_TRAIN_IDS) & (pred != IGNORE_INDEX)
        if bad.any():
            raise SegdistError(f"{path}: prediction value {int(pred[bad][0])} is not a Cityscapes trainId "
                               f"(0..{_CITYSCAPES_TRAIN_IDS - 1}, 255) as --pred-ids train says")
        return pred
    if pred.size and int(pred.max()) > CITYSCAPES_MAX_LABEL_ID:
        hint = " (trainIds? pass --pred-ids train)" if _looks_like_train_ids(pred) else ""
        raise SegdistError(f"{path}: prediction value {int(pred.max())} is not a Cityscapes labelId "
                           f"(0..{CITYSCAPES_MAX_LABEL_ID}){hint}; predictions must hold labelIds, not colours")
    return to_train_ids(pred)


def _looks_like_train_ids(pred: np.ndarray) -> bool:
    """Only trainId values (0..18, or 255 for no class) in a Cityscapes prediction."""
    return not ((pred >= _CITYSCAPES_TRAIN_IDS) & (pred != IGNORE_INDEX)).any()


def _check_same_size(pred: np.ndarray, gt: np.ndarray, pred_path: Path, gt_path: Path) -> None:
    if pred.shape[:2] != gt.shape[:2]:
        (ph, pw), (gh, gw) = pred.shape[:2], gt.shape[:2]
        raise SegdistError(f"{pred_path}: prediction is {pw}x{ph} but ground truth {gt_path} is {gw}x{gh}")


def _train_ids_error(pred_dir: Path, count: int) -> SegdistError:
    return SegdistError(
        f"{pred_dir}: the predictions look like Cityscapes trainIds (values 0..18 only, in {count} file{'s' * (count != 1)}; "
        "labelIds of real scenes hold ids above 18 such as sky 23 or car 26); pass --pred-ids train to score "
        "them as trainIds (or convert them to labelIds, e.g. with cityscapesScripts' trainId->id table), or "
        "--pred-ids label to score them as labelIds anyway"
    )


def _read_ids(path: Path) -> list[str]:
    try:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise SegdistError(f"{path}: cannot read the image list ({err.strerror or err})") from None
    if not ids:
        raise SegdistError(f"{path}: the image list is empty")
    return ids


def _pairs_voc(pred_dir: Path, gt_dir: Path, ids: list[str] | None) -> list[tuple[Path, Path]]:
    if ids is None:
        gts = sorted(p for p in gt_dir.rglob("*.png") if p.is_file())
    else:
        gts = [gt_dir / f"{i}.png" for i in ids]
        absent = [p for p in gts if not p.is_file()]
        if absent:
            raise SegdistError(f"{gt_dir}: {len(absent)} listed ground-truth files missing (e.g. {absent[0].name})")
    if not gts:
        raise SegdistError(f"{gt_dir}: no ground-truth .png files")
    pairs, missing = [], []
    for gt in gts:
        pred = pred_dir / gt.relative_to(gt_dir)
        (pairs.append((pred, gt)) if pred.is_file() else missing.append(pred))
    if missing:
        raise SegdistError(
            f"{pred_dir}: {len(missing)} of {len(gts)} predictions missing (e.g. {missing[0]} for "
            f"{gt_dir / missing[0].relative_to(pred_dir)})"
        )
    return pairs


def _pairs_cityscapes(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """The official matching: for gtFine <city>_<seq>_<frame>_gtFine_labelIds.png, the one
    file <city>_<seq>_<frame>*.png anywhere under the prediction folder."""
    gts = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    if not gts:
        raise SegdistError(f"{gt_dir}: no *_gtFine_labelIds.png files")
    walk = [(Path(root), files) for root, _dirs, files in os.walk(pred_dir)]
    pairs, missing = [], []
    for gt in gts:
        parts = gt.name.split("_")
        pattern = "_".join(parts[:3]) + "*.png"
        found = [root / f for root, files in walk for f in fnmatch.filter(files, pattern)]
        if len(found) > 1:
            raise SegdistError(f"{pred_dir}: several predictions for {gt.name}: {found[0].name}, {found[1].name}")
        (pairs.append((found[0], gt)) if found else missing.append(pattern))
    if missing:
        raise SegdistError(
            f"{pred_dir}: {len(missing)} of {len(gts)} predictions missing (no file matching {missing[0]})"
        )
    return pairs


def score_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    dataset: str,
    *,
    boundary_kernels: Sequence[int] = (),
    id_list: str | os.PathLike | None = None,
    pred_ids: str | None = None,
) -> dict[str, Any]:
    """Score a folder of predicted label PNGs against ground truth, in the dataset's
    official format:

    voc: GT_DIR holds <name>.png (SegmentationClass: class indices 0..20, 255 void), at
      any depth; PRED_DIR the same relative paths with indices 0..20 (mode P or L), or
      drawn in the VOC colour map (mode RGB/RGBA, exact class colours, mapped back to
      indices). With `id_list` (e.g. ImageSets/Segmentation/val.txt) only the listed
      names are scored.
    cityscapes: GT_DIR holds gtFine/<split>/<city>/*_gtFine_labelIds.png (labelIds); PRED_DIR
      one <city>_<seq>_<frame>*.png per GT file, anywhere below it. `pred_ids` says what
      the predictions hold: "label" labelIds (as the official benchmark requires), "train"
      trainIds 0..18 (255: no class), "auto"/None labelIds, but a folder whose values are
      all in 0..18 (trainIds, as an argmax gives) is refused. Both are scored in the 19
      trainIds; a predicted labelId that is no evaluated class (or trainId 255) counts as
      a miss (FN) of the GT class and as a false positive of none, as in cityscapesscripts.

    Returns summarize()-style JSON (miou, per_class_iou, pixel_acc, mean_acc, num_images,
    boundary). Missing files, size mismatches, 16-bit or colour PNGs where indices are
    needed and values outside the format: SegdistError (one line naming the file).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise SegdistError(f"{folder}: {what} folder not found")
    kernels = check_kernels(boundary_kernels)
    if dataset not in ("voc", "cityscapes"):
        raise SegdistError(f"--dataset must be voc or cityscapes, got {dataset!r}")
    if id_list is not None and dataset != "voc":
        raise SegdistError("--list is for --dataset voc (Cityscapes scores every gtFine file below --gt-dir)")
    if pred_ids is not None and pred_ids not in CITYSCAPES_PRED_IDS:
        raise SegdistError(f"--pred-ids must be one of {', '.join(CITYSCAPES_PRED_IDS)}, got {pred_ids!r}")
    if pred_ids is not None and dataset != "cityscapes":
        raise SegdistError("--pred-ids is for --dataset cityscapes (VOC predictions hold class indices or VOC colours)")
    if dataset == "voc":
        classes = list(VOC_CLASSES)
        pairs = _pairs_voc(pred_dir, gt_dir, _read_ids(Path(id_list)) if id_list is not None else None)
    else:
        classes, pairs = list(CITYSCAPES_CLASSES), _pairs_cityscapes(pred_dir, gt_dir)
    c = len(classes)
    zeros = lambda: torch.zeros(c, c + 1, dtype=torch.int64)  # noqa: E731
    confusion = zeros()
    boundary = {k: (zeros(), zeros()) for k in kernels}
    all_train_ids = True
    for pred_path, gt_path in pairs:
        if dataset == "voc":
            pred, gt = _voc_pair(pred_path, gt_path)
        else:
            pred, gt = _cityscapes_pair(pred_path, gt_path)
            all_train_ids = all_train_ids and int(pred.max(initial=0)) < _CITYSCAPES_TRAIN_IDS
            pred = _cityscapes_prediction(pred, pred_path, pred_ids or "auto")
        gt_t, pred_t = torch.from_numpy(gt.astype(np.int64)), torch.from_numpy(pred.astype(np.int64))
        confusion += confusion_matrix_with_void(pred_t, gt_t, c)
        for k in kernels:
            mask = boundary_mask(gt_t, k)
            b, i = boundary[k]
            b += confusion_matrix_with_void(pred_t[mask], gt_t[mask], c)
            i += confusion_matrix_with_void(pred_t[~mask], gt_t[~mask], c)
    if dataset == "cityscapes" and pred_ids in (None, "auto") and all_train_ids:
        raise _train_ids_error(pred_dir, len(pairs))
    summary: dict[str, Any] = _named(scores(confusion), classes)
    summary["num_images"] = len(pairs)
    if kernels:
        summary["boundary"] = {
            str(k): {"boundary": _named(scores(b), classes), "inner": _named(scores(i), classes)}
            for k, (b, i) in boundary.items()
        }
    return summary


def write_prediction_png(folder: str | os.PathLike, key: str, pred: np.ndarray, dataset: str) -> Path:
    """Save a predicted train-id map in the dataset's official format: Cityscapes labelIds
    (grayscale) or VOC class indices (palette PNG). Returns the path (<folder>/<key>.png)."""
    path = Path(folder) / f"{key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    pred = np.asarray(pred, dtype=np.uint8)
    if dataset == "cityscapes":
        Image.fromarray(np.array(cityscapes_label_id_lut(), dtype=np.uint8)[pred], mode="L").save(path)
    else:
        im = Image.fromarray(pred, mode="L").convert("P")
        im.putpalette(voc_palette())
        im.save(path)
    return path


# ----------------------------------------------------------------------------- output


def format_summary(summary: dict[str, Any]) -> str:
    """A readable report: headline numbers, per-class IoU, boundary table."""

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


# ----------------------------------------------------------------------------- benchmark


def benchmark(
    *,
    size: tuple[int, int] = (375, 500),
    images: int = 2,
    depth: int = 101,
    width: int = 64,
    variant: str = "naked",
    num_classes: int = 21,
    output_stride: int = 8,
    scales: Sequence[float] = DEFAULT_MSF_SCALES,
    tile_size: int = 321,
    crf_workers: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per image for whole-image inference, MSF (scales + flip, sliding tiles) and
    DenseCRF (DeepLab defaults) on random images with a randomly initialised model."""
    from segdist.crf import CrfParams, CrfPool
    from segdist.models import build_model
    from segdist.resolve import resolve_recipe

    torch.manual_seed(seed)
    device_t = torch.device(device)
    recipe = resolve_recipe({"model.variant": variant, "model.depth": depth, "model.width": width,
                             "model.output_stride": output_stride}, "deeplab", "benchmark")
    model = build_model(recipe.model, num_classes)
    model = model.to(device_t).eval()
    height, width = size
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.randn(1, 3, height, width, generator=gen) for _ in range(images)]

    def sync() -> None:
        if device_t.type == "cuda":
            torch.cuda.synchronize()

    def timed(msf: MultiScaleInference) -> tuple[list[float], list]:
        times, outs = [], []
        with torch.inference_mode():
            msf(batch[0][:, :, :64, :64].to(device_t))  # warm-up (allocator, kernels)
            msf.tiles_run = 0
            for x in batch:
                sync()
                start = time.perf_counter()
                outs.append(msf(x.to(device_t)).cpu())
                sync()
                times.append(time.perf_counter() - start)
        return times, outs

    def stats(times: list[float]) -> dict[str, Any]:
        return {
            "median": round(float(np.median(times)), 3),
            "min": round(min(times), 3),
            "all": [round(t, 3) for t in times],
        }

    whole_times, _ = timed(MultiScaleInference(model))
    msf = MultiScaleInference(model, scales, flip=True, tile_size=tile_size)
    msf_times, probs = timed(msf)
    rng = np.random.default_rng(seed)
    rgbs = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in batch]
    params = CrfParams()
    crf_times = []
    with CrfPool(crf_workers) as pool:
        pool.labels(probs[0][0].numpy()[:, :32, :32], rgbs[0][:32, :32].copy(), params).result()  # start workers
        if crf_workers <= 1:
            for p, rgb in zip(probs, rgbs, strict=True):
                start = time.perf_counter()
                pool.labels(p[0].to(torch.float16).numpy(), rgb, params).result()
                crf_times.append(time.perf_counter() - start)
        else:  # throughput of the pool: wall time / images
            start = time.perf_counter()
            futures = [pool.labels(p[0].to(torch.float16).numpy(), rgb, params) for p, rgb in zip(probs, rgbs, strict=True)]
            for f in futures:
                f.result()
            crf_times = [(time.perf_counter() - start) / len(batch)] * len(batch)
    return {
        "image_size": f"{width}x{height}",
        "images": images,
        "model": f"{variant} ResNet-{depth} OS{output_stride}, {num_classes} classes, random weights",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "whole_image_s_per_image": stats(whole_times),
        "msf_s_per_image": stats(msf_times),
        "msf": {"scales": list(scales), "flip": True, "tile_size": tile_size,
                "tile_passes_per_image": msf.tiles_run / len(batch)},
        "crf_s_per_image": stats(crf_times),
        "crf": {**dataclasses.asdict(params), "workers": crf_workers},
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------- CLI


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after '=', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.evaluate",
        description="Score a checkpoint over validation shards (whole image or multi-scale + flip "
        "sliding window, optional DenseCRF and boundary statistics), or score folders of predicted "
        "label PNGs against ground truth in the dataset's official format.",
        epilog="Examples:\n"
        "  python -m segdist.evaluate --checkpoint ckpt.pt --shards shards/voc/val --scales 0.5,0.75,1,1.25,1.5 "
        "--flip --boundary --json\n"
        "  python -m segdist.evaluate --pred-dir results --gt-dir cityscapes/gtFine/val --dataset cityscapes --json\n"
        "  python -m segdist.evaluate --benchmark",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_argument_group("what to score (one of)")
    mode.add_argument("--checkpoint", help="checkpoint.pt written by training (model rebuilt from its config)")
    mode.add_argument("--pred-dir", help="folder of predicted label PNGs (VOC indices or VOC colours / Cityscapes "
                      "labelIds, or trainIds with --pred-ids train)")
    mode.add_argument("--benchmark", action="store_true",
                      help="print seconds per image for whole-image inference, MSF (0.5..1.5 + flip, "
                      "sliding tiles of --tile, default 321) and DenseCRF (--crf-workers, default 1) on "
                      "--limit (default 2) random 500x375 images with a random-weight naked ResNet-101 "
                      "(output stride 8, 21 classes), then exit")
    ck = parser.add_argument_group("checkpoint scoring")
    ck.add_argument("--shards", help="validation shard folder or URL (with dataset.json)")
    ck.add_argument("--scales", type=_float_list, default=None,
                    help="comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5 (default: the checkpoint's recipe, "
                    "eval.scales)")
    ck.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                    help="also average the left-right mirrored prediction (default: the recipe's eval.flip)")
    ck.add_argument("--tile", type=int, default=None,
                    help="sliding-window tile size in pixels (1/3 overlap); 0 = whole image per scale "
                    "(default: the recipe's eval.tile)")
    ck.add_argument("--tile-batch", type=int, default=4, help="tiles per forward pass (default 4)")
    ck.add_argument("--crf", action="store_true", help="DenseCRF on the MSF probabilities")
    ck.add_argument("--crf-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="CRF parameter (iter_max, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std); "
                    "repeatable; defaults: DeepLab's 10, 3, 1, 4, 67, 3")
    ck.add_argument("--crf-workers", type=int, default=None,
                    help="CRF processes (default: CPUs - 1; --benchmark: 1)")
    ck.add_argument("--save-probs", metavar="DIR",
                    help="also write float16 probabilities + image + label per sample (input of the CRF grid)")
    ck.add_argument("--save-pred", metavar="DIR",
                    help="also write predicted label PNGs in the official format (<key>.png)")
    ck.add_argument("--pictures", metavar="DIR", help="also write confusion_matrix.png and overlays.png")
    ck.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ck.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (GPU)")
    ck.add_argument("--loader-workers", type=int, default=1, help="shard reading processes (default 1)")
    ck.add_argument("--limit", type=int, default=0, help="score only the first N images (quick look)")
    fo = parser.add_argument_group("folder scoring")
    fo.add_argument("--gt-dir", help="ground-truth folder (VOC SegmentationClass / Cityscapes gtFine/val)")
    fo.add_argument("--dataset", choices=("voc", "cityscapes"), help="format of both folders")
    fo.add_argument("--list", dest="id_list", metavar="FILE",
                    help="VOC: score only the names in this list (e.g. ImageSets/Segmentation/val.txt); "
                    "default: every PNG below --gt-dir")
    fo.add_argument("--pred-ids", choices=CITYSCAPES_PRED_IDS, default=None,
                    help="Cityscapes: what the predictions hold: label = labelIds (the official format), "
                    "train = trainIds 0..18 (255: no class), as an argmax gives; auto (default) = labelIds, "
                    "but a folder with values 0..18 only is refused as trainIds")
    common = parser.add_argument_group("output")
    common.add_argument("--boundary", type=_int_list, nargs="?", const=DEFAULT_KERNELS, default=None,
                        metavar="K,K,...", help="boundary/inner statistics for these odd kernel sizes "
                        "(--boundary alone: 11,15,19; default: none, or the checkpoint recipe's "
                        "eval.boundary_kernels)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SegdistError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegdistError("--device cuda: no CUDA device available")
    return device


def _run_checkpoint(args) -> dict[str, Any]:
    from segdist.crf import CrfParams
    from segdist.data.stream import read_dataset_info, val_loader

    if not args.shards:
        raise SegdistError("--checkpoint needs --shards (the validation shards to score on)")
    if args.tile is not None and args.tile < 0:
        raise SegdistError(f"--tile must be >= 0, got {args.tile}")
    if args.crf_workers is None:
        args.crf_workers = max(1, (os.cpu_count() or 1) - 1)
    if args.tile_batch < 1 or args.crf_workers < 0 or args.limit < 0:
        raise SegdistError("--tile-batch must be >= 1, --crf-workers and --limit >= 0")
    crf = CrfParams.from_dict(dict(args.crf_param), "--crf-param") if args.crf else None
    if args.crf_param and not args.crf:
        raise SegdistError("--crf-param given without --crf")
    device = _pick_device(args.device)
    info = read_dataset_info(args.shards)
    state = load_checkpoint(args.checkpoint)
    model, trial, classes = model_from_checkpoint(state, args.checkpoint)
    check_classes_match(classes, info, args.checkpoint)
    own = trial.recipe.eval  # what the flags do not say, the checkpoint's recipe does
    scales = own.scales if args.scales is None else args.scales
    flip = own.flip if args.flip is None else args.flip
    tile = own.tile if args.tile is None else (args.tile, args.tile) if args.tile else None
    kernels = check_kernels(own.boundary_kernels if args.boundary is None else args.boundary)
    model = model.to(device).eval()
    loader = val_loader(
        info, rank=0, world_size=1, loader_workers=args.loader_workers,
        edges=bool(getattr(model, "needs_edges", False)), with_keys=True,
    )
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    on_prediction = None
    if args.save_pred:
        def on_prediction(key: str, pred: np.ndarray) -> None:
            write_prediction_png(args.save_pred, key, pred, info.dataset)

    common = dict(
        scales=scales, flip=flip, boundary_kernels=kernels, tile_size=tile,
        tile_batch=args.tile_batch, crf=crf, crf_workers=args.crf_workers,
        examples=4 if args.pictures else 0, amp_dtype=amp, limit=args.limit, on_prediction=on_prediction,
    )
    started = time.perf_counter()
    if args.save_probs:
        meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "shards": str(args.shards), "dataset": info.dataset}
        result = save_probabilities(model, loader, args.save_probs, classes, device, meta=meta, **common)
    else:
        result = evaluate_distributed(model, loader, len(classes), device, **common)
    elapsed = time.perf_counter() - started
    summary = summarize(result, classes)
    summary.update(
        {
            "checkpoint": str(args.checkpoint),
            "shards": str(args.shards),
            "dataset": info.dataset,
            "variant": trial.recipe.model.variant,
            "scales": list(scales),
            "flip": bool(flip),
            "tile_size": list(tile) if tile else None,
            "crf": dataclasses.asdict(crf) if crf is not None else None,
            "seconds_per_image": round(elapsed / max(result.num_images, 1), 4),
        }
    )
    if args.pictures:
        from segdist.visualize import confusion_matrix_png, overlays_png

        out = Path(args.pictures)
        out.mkdir(parents=True, exist_ok=True)
        (out / "confusion_matrix.png").write_bytes(confusion_matrix_png(result.confusion, classes))
        if result.examples:
            (out / "overlays.png").write_bytes(overlays_png(result.examples, classes))
    return summary


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [name for name, on in (("--checkpoint", args.checkpoint), ("--pred-dir", args.pred_dir),
                                    ("--benchmark", args.benchmark)) if on]
    if len(chosen) != 1:
        parser.error("give exactly one of --checkpoint, --pred-dir, --benchmark")
    if args.benchmark:
        result = benchmark(
            crf_workers=args.crf_workers or 1,
            tile_size=args.tile or 321,
            images=args.limit or 2,
            device=str(_pick_device(args.device)),
        )
        print(json.dumps(result, indent=1))
        return 0
    if args.pred_dir:
        if not args.gt_dir or not args.dataset:
            raise SegdistError("--pred-dir needs --gt-dir and --dataset voc|cityscapes")
        summary = score_folders(
            args.pred_dir, args.gt_dir, args.dataset, boundary_kernels=args.boundary or (), id_list=args.id_list,
            pred_ids=args.pred_ids,
        )
    else:
        summary = _run_checkpoint(args)
    if args.json:
        print(json.dumps(json_safe(summary), indent=1))
    else:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
