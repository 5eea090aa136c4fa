"""DenseCRF post-processing (Kraehenbuehl & Koltun) over MSF probabilities, with pydensecrf.

    params = CrfParams(bi_w=4, bi_xy_std=67, bi_rgb_std=3, pos_w=3, pos_xy_std=1)
    q = dense_crf(probs, rgb, params)        # probs float [C, H, W], rgb uint8 [H, W, 3]
    labels = q.argmax(0)

Energy: unary -log p (p clipped at 1e-5), a Gaussian (smoothness) term with weight
`pos_w` and spatial std `pos_xy_std`, AND a bilateral (appearance) term with weight `bi_w`,
spatial std `bi_xy_std` and colour std `bi_rgb_std` (both Potts). The original code base
never added the bilateral term (its known bug 2); here both are always added. A weight of
0 makes a term vanish; with both weights 0 the result is the argmax of the unary.

Images run in parallel over a process pool (`CrfPool`, spawn context: safe inside Ray
and DDP workers). This module does not import torch, so pool workers start fast.

The CRF stage runs over *saved probabilities* (DeepLab's and kazuto1011's convention), so
its parameters can be searched without re-running the network:

    folder/meta.json          {"format": 1, "classes": [...], "scales": ..., ...}
    folder/<key>.probs.npy    float16 [C, H, W] MSF probabilities
    folder/<key>.image.png    the RGB image (what the bilateral term sees)
    folder/<key>.label.png    the ground truth, uint8 class indices (255 = ignore)

written by `python -m segdist.evaluate --checkpoint ... --save-probs FOLDER` (or
`segdist.evaluation.loop.save_probabilities`), scored by `score_saved`, and searched as a Ray Tune
study by `crf_grid_trial` with the study file format of `load_crf_grid`
(tune_spaces/crf_grid.yaml).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segdist.data.classes import IGNORE_INDEX
from segdist.epoch_report import EpochReport
from segdist.errors import SegdistError

PROBS_FORMAT = 1
META_FILE = "meta.json"
PROBS_SUFFIX = ".probs.npy"
IMAGE_SUFFIX = ".image.png"
LABEL_SUFFIX = ".label.png"
UNARY_CLIP = 1e-5


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CrfParams:
    """DeepLab's defaults (also kazuto1011/deeplab-pytorch's)."""

    iter_max: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "CRF parameters") -> CrfParams:
        """Validated; unknown keys and bad values are one SegdistError line."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise SegdistError(f"{where}: unknown CRF parameter {unknown[0]!r}; valid: {', '.join(names)}")
        out = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SegdistError(f"{where}: {key} must be a number, got {value!r}")
            if key == "iter_max":
                if int(value) != value or value < 1:
                    raise SegdistError(f"{where}: iter_max must be an integer >= 1, got {value!r}")
                out[key] = int(value)
            else:
                if value < 0 or (key.endswith("_std") and value == 0):
                    raise SegdistError(f"{where}: {key} must be {'> 0' if key.endswith('_std') else '>= 0'}, got {value!r}")
                out[key] = float(value)
        return cls(**out)


# ----------------------------------------------------------------------------- one image


def dense_crf(probs: np.ndarray, rgb: np.ndarray, params: CrfParams) -> np.ndarray:
    """Mean-field DenseCRF inference: probs [C, H, W] (any float), rgb uint8 [H, W, 3] ->
    marginals Q float32 [C, H, W]."""
    import pydensecrf.densecrf as dcrf

    num_classes, height, width = probs.shape
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [{height}, {width}, 3], got {rgb.dtype} {list(rgb.shape)}")
    unary = -np.log(np.clip(probs.astype(np.float32), UNARY_CLIP, 1.0)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    # Potts compatibility = the weight; weight 0 adds nothing to the energy.
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    rgb = np.require(rgb, dtype=np.uint8, requirements=["C", "W"])  # pydensecrf needs a writable buffer
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=rgb, compat=params.bi_w)
    q = crf.inference(params.iter_max)
    return np.asarray(q, dtype=np.float32).reshape(num_classes, height, width)


def crf_labels(probs: np.ndarray, rgb: np.ndarray, params: CrfParams) -> np.ndarray:
    """uint8 [H, W]: argmax of the CRF marginals."""
    return dense_crf(probs, rgb, params).argmax(0).astype(np.uint8)


def confusion_numpy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """The same matrix as segdist.metrics.confusion_matrix, in numpy (no torch in pool workers)."""
    keep = target != IGNORE_INDEX
    gt = target[keep].astype(np.int64)
    if gt.size and gt.max() >= num_classes:
        raise ValueError(f"label value {int(gt.max())} is outside 0..{num_classes - 1}")
    index = gt * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------- process pool


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _labels_job(probs: np.ndarray, rgb: np.ndarray, params: CrfParams) -> np.ndarray:
    return crf_labels(probs, rgb, params)


class CrfPool:
    """Runs CRF jobs in `workers` processes (0 or 1: in this process, no pool).

        with CrfPool(2) as pool:
            future = pool.labels(probs, rgb, params)   # concurrent.futures.Future
            labels = future.result()
    """

    def __init__(self, workers: int = 1):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = int(workers)
        self._pool = None
        if self.workers > 1:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )

    def submit(self, fn: Callable, *args) -> cf.Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # surfaced by .result(), as a pool would
            future.set_exception(err)
        return future

    def labels(self, probs: np.ndarray, rgb: np.ndarray, params: CrfParams) -> cf.Future:
        return self.submit(_labels_job, probs, rgb, params)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> CrfPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- saved probabilities


def write_meta(folder: str | os.PathLike, meta: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{META_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": PROBS_FORMAT, **meta}, indent=1))
    os.replace(tmp, folder / META_FILE)


def write_sample(folder: str | os.PathLike, key: str, probs: np.ndarray, rgb: np.ndarray, label: np.ndarray) -> None:
    """One sample: probabilities as float16 .npy, the RGB image and the label as PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{key}{PROBS_SUFFIX}", probs.astype(np.float16, copy=False))
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(folder / f"{key}{IMAGE_SUFFIX}")
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(folder / f"{key}{LABEL_SUFFIX}")


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not Path(folder).is_dir():
        raise SegdistError(f"{folder}: saved-probabilities folder not found")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SegdistError(
            f"{path}: missing; write the folder with `python -m segdist.evaluate --checkpoint CKPT "
            "--shards DIR --save-probs FOLDER`"
        ) from None
    except ValueError as err:
        raise SegdistError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != PROBS_FORMAT or "classes" not in meta:
        raise SegdistError(f"{path}: not a segdist saved-probabilities folder (format {meta.get('format')!r})")
    return meta


def saved_keys(folder: str | os.PathLike) -> list[str]:
    """Sorted keys of the complete samples in the folder; SegdistError if one is incomplete."""
    folder = Path(folder)
    keys = sorted(p.name[: -len(PROBS_SUFFIX)] for p in folder.glob(f"*{PROBS_SUFFIX}"))
    if not keys:
        raise SegdistError(f"{folder}: no *{PROBS_SUFFIX} files")
    for key in keys:
        for suffix in (IMAGE_SUFFIX, LABEL_SUFFIX):
            if not (folder / f"{key}{suffix}").is_file():
                raise SegdistError(f"{folder / (key + suffix)}: missing (incomplete saved sample {key!r})")
    return keys


def load_sample(folder: str | os.PathLike, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs float16 [C, H, W], rgb uint8 [H, W, 3], label uint8 [H, W])."""
    folder = Path(folder)
    where = folder / f"{key}{PROBS_SUFFIX}"
    try:
        probs = np.load(where)
        with Image.open(folder / f"{key}{IMAGE_SUFFIX}") as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(folder / f"{key}{LABEL_SUFFIX}") as im:
            label = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise SegdistError(f"{where}: cannot read saved sample {key!r} ({err})") from None
    if probs.ndim != 3 or probs.shape[1:] != label.shape or rgb.shape[:2] != label.shape:
        raise SegdistError(
            f"{where}: probabilities {list(probs.shape)}, image {list(rgb.shape)} and label "
            f"{list(label.shape)} of {key!r} do not match"
        )
    return probs, rgb, label


def _score_file_job(folder: str, key: str, params: CrfParams | None, num_classes: int) -> np.ndarray:
    probs, rgb, label = load_sample(folder, key)
    if probs.shape[0] != num_classes:
        raise SegdistError(f"{folder}/{key}{PROBS_SUFFIX}: {probs.shape[0]} classes, meta.json says {num_classes}")
    pred = probs.argmax(0) if params is None else crf_labels(probs, rgb, params)
    return confusion_numpy(pred, label, num_classes)


def score_saved(
    folder: str | os.PathLike,
    params: CrfParams | None,
    *,
    workers: int = 1,
    limit: int = 0,
) -> np.ndarray:
    """The confusion matrix (int64 [C, C]) of CRF labels (argmax of the saved probabilities
    when params is None) over the saved folder (its first `limit` keys when > 0)."""
    meta = read_meta(folder)
    num_classes = len(meta["classes"])
    keys = saved_keys(folder)
    if limit > 0:
        keys = keys[:limit]
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    with CrfPool(workers) as pool:
        futures = [pool.submit(_score_file_job, str(folder), key, params, num_classes) for key in keys]
        for future in futures:
            total += future.result()
    return total


# ----------------------------------------------------------------------------- the CRF grid study

GRID_KIND = "crf_grid"
GRID_KEYS = ("kind", "name", "probabilities", "crf", "search", "workers", "limit", "max_concurrent_trials")


@dataclass(frozen=True)
class CrfGrid:
    """A parsed tune_spaces/crf_grid.yaml (see `load_crf_grid`)."""

    name: str
    path: str
    probabilities: str  # absolute folder path
    base: CrfParams
    search: dict[str, tuple[float, ...]]  # CRF parameter -> values; the grid is their product
    workers: int  # CRF processes (= CPUs) per trial
    limit: int  # 0 = every saved image
    max_concurrent_trials: int

    def combinations(self) -> list[CrfParams]:
        keys = list(self.search)
        return [
            dataclasses.replace(self.base, **dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(self.search[k] for k in keys))
        ]


def is_crf_grid(raw: Any) -> bool:
    """True for a parsed YAML mapping that is a CRF grid study (`kind: crf_grid`)."""
    return isinstance(raw, dict) and raw.get("kind") == GRID_KIND


def load_crf_grid(path: str | os.PathLike) -> CrfGrid:
    """Read and validate a CRF grid study file:

        kind: crf_grid                    # required: not a training study
        name: crf_grid_voc                # default: the file name
        probabilities: runs/probs/voc_val # folder from `segdist.evaluate --save-probs`
                                          # (relative paths: to the current directory)
        crf: {iter_max: 10, pos_w: 3, pos_xy_std: 1}   # fixed values (default: DeepLab's)
        search:                           # grid: every combination is one trial
          bi_w: [4]
          bi_xy_std: [67]
          bi_rgb_std: [3, 10]
        workers: 2                        # CRF processes = CPUs per trial (default 1)
        limit: 0                          # score only the first N images (0 = all)
        max_concurrent_trials: 1
    """
    from segdist.config import read_study_file

    return parse_crf_grid(read_study_file(path), str(path))


def parse_crf_grid(raw: Any, where: str) -> CrfGrid:
    if not is_crf_grid(raw):
        raise SegdistError(f"{where}: not a CRF grid study (needs `kind: {GRID_KIND}`)")
    unknown = [k for k in raw if k not in GRID_KEYS]
    if unknown:
        raise SegdistError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(GRID_KEYS)}")
    if not raw.get("probabilities") or not isinstance(raw["probabilities"], str):
        raise SegdistError(f"{where}: `probabilities` must name a saved-probabilities folder")
    base = CrfParams.from_dict(raw.get("crf") or {}, f"{where}: crf")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise SegdistError(f"{where}: `search` must map CRF parameters to lists of values")
    search = {}
    for key, values in search_raw.items():
        if not isinstance(values, list) or not values:
            raise SegdistError(f"{where}: search.{key} must be a non-empty list of values")
        checked = [getattr(CrfParams.from_dict({key: v}, f"{where}: search"), key) for v in values]
        search[key] = tuple(checked)
    ints = {}
    for key, default, low in (("workers", 1, 1), ("limit", 0, 0), ("max_concurrent_trials", 1, 1)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SegdistError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
        ints[key] = value
    from segdist.config import study_name

    return CrfGrid(
        name=study_name(raw, where),
        path=where,
        probabilities=str(Path(raw["probabilities"]).expanduser().resolve()),
        base=base,
        search=search,
        **ints,
    )


def crf_grid_param_space(grid: CrfGrid) -> dict[str, Any]:
    """Tune's param_space: fixed values plus one `tune.grid_search` per searched parameter.
    Each trial's config is a flat dict that `crf_grid_trial` understands."""
    from ray import tune

    space: dict[str, Any] = {
        "probabilities": grid.probabilities,
        "workers": grid.workers,
        "limit": grid.limit,
        **dataclasses.asdict(grid.base),
    }
    for key, values in grid.search.items():
        space[key] = tune.grid_search(list(values))
    return space


def crf_grid_metrics(config: dict[str, Any]) -> dict[str, float]:
    """Score one CRF parameter set over a saved-probabilities folder: {"val_miou",
    "val_pixel_acc", "val_mean_acc" (fractions), "val_iou_<class>", "num_images"}.

    config: {"probabilities": folder, "workers": n, "limit": n, + CrfParams fields}
    (what `crf_grid_param_space` produces).
    """
    import torch

    from segdist.metrics import scores  # torch: only in the trial process, not in pool workers

    params = CrfParams.from_dict({k: v for k, v in config.items() if k in CrfParams.__dataclass_fields__})
    folder = config["probabilities"]
    meta = read_meta(folder)
    limit = int(config.get("limit", 0))
    num_images = len(saved_keys(folder))
    num_images = min(limit, num_images) if limit > 0 else num_images
    confusion = score_saved(folder, params, workers=int(config.get("workers", 1)), limit=limit)
    result = scores(torch.from_numpy(confusion))
    metrics: dict[str, float] = {
        "val_miou": result["miou"],
        "val_pixel_acc": result["pixel_acc"],
        "val_mean_acc": result["mean_acc"],
        **{f"val_iou_{name}": iou for name, iou in zip(meta["classes"], result["per_class_iou"], strict=True)},
        "num_images": num_images,
    }
    return metrics


def crf_grid_trial(config: dict[str, Any], report: Callable[[dict], None] | None = None) -> None:
    """Ray Tune function trainable: crf_grid_metrics(config) reported once, with
    ray.tune.report, as an EpochReport of epoch 0 (the CRF parameters are the trial's config).
    It returns nothing: Tune would take a returned dict for a second result. `report` replaces
    ray.tune.report (tests): it gets the Tune result (EpochReport.result())."""
    if report is None:
        import ray.tune

        report = ray.tune.report
    report(EpochReport(0, crf_grid_metrics(config)).result())


def run_crf_grid(grid: CrfGrid, *, storage_path: str | None = None, callbacks: Iterable = ()):
    """Run the grid as a Ray Tune study (Ray must be initialised); returns the ResultGrid.
    Checks the folder first so a wrong path is one line, not a failed trial per point."""
    from ray import tune

    read_meta(grid.probabilities)
    saved_keys(grid.probabilities)
    trainable = tune.with_resources(crf_grid_trial, {"cpu": grid.workers})
    tuner = tune.Tuner(
        trainable,
        param_space=crf_grid_param_space(grid),
        tune_config=tune.TuneConfig(
            metric="val_miou", mode="max", max_concurrent_trials=grid.max_concurrent_trials
        ),
        run_config=tune.RunConfig(name=grid.name, storage_path=storage_path, callbacks=list(callbacks)),
    )
    return tuner.fit()
