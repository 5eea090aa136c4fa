"""Folders of label PNGs in a dataset's official format: pairing predictions with ground
truth, reading and checking the PNGs, scoring them, and writing predictions.

    summary = score_folders("pred", "gtFine/val", "cityscapes", boundary_kernels=(11,))
    write_prediction_png("pred", key, pred, "voc")
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segdist.boundary import check_kernels
from segdist.data.cityscapes import to_train_ids
from segdist.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_MAX_LABEL_ID,
    IGNORE_INDEX,
    VOC_CLASSES,
    cityscapes_label_id_lut,
    voc_palette,
)
from segdist.errors import SegdistError
from segdist.evaluation.results import Accumulator, summarize

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

    Returns summarize()'s JSON (miou, per_class_iou, pixel_acc, mean_acc, num_images, and
    boundary with K in increasing order). Missing files, size mismatches, 16-bit or colour
    PNGs where indices are needed and values outside the format: SegdistError (one line
    naming the file).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    kernels = _check_options(pred_dir, gt_dir, dataset, boundary_kernels, id_list, pred_ids)
    if dataset == "voc":
        classes = list(VOC_CLASSES)
        pairs = _pairs_voc(pred_dir, gt_dir, _read_ids(Path(id_list)) if id_list is not None else None)
    else:
        classes, pairs = list(CITYSCAPES_CLASSES), _pairs_cityscapes(pred_dir, gt_dir)
    acc = Accumulator(len(classes), "cpu", kernels, void=True)
    all_train_ids = True
    for pred_path, gt_path in pairs:
        if dataset == "voc":
            pred, gt = _voc_pair(pred_path, gt_path)
        else:
            pred, gt = _cityscapes_pair(pred_path, gt_path)
            all_train_ids = all_train_ids and int(pred.max(initial=0)) < _CITYSCAPES_TRAIN_IDS
            pred = _cityscapes_prediction(pred, pred_path, pred_ids or "auto")
        acc.add(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    if dataset == "cityscapes" and pred_ids in (None, "auto") and all_train_ids:
        raise _train_ids_error(pred_dir, len(pairs))
    return summarize(acc.result(), classes)


def _check_options(pred_dir: Path, gt_dir: Path, dataset: str, boundary_kernels: Sequence[int],
                   id_list, pred_ids: str | None) -> tuple[int, ...]:
    """score_folders' arguments checked (SegdistError); returns the boundary kernels."""
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
    return kernels


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
