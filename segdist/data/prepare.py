"""Make sure the quick start's shards exist: generate the synthetic VOC folder and build
both splits, unless a complete build of that folder, as it is now, is already there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.sample import DATASET_JSON
from segdist.data.shard_writer import build_from_source, shards_up_to_date
from segdist.data.synthetic import write_synthetic_voc
from segdist.data.voc import VocSource

STAMP = "synthetic.json"  # in the generated folder: the arguments it was generated with


def shards_complete(shard_dir: str | os.PathLike, dataset: str | None = None) -> bool:
    """True if SHARD_DIR holds a finished build (dataset.json present, readable, all shards there)."""
    path = Path(shard_dir) / DATASET_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if dataset is not None and meta.get("dataset") != dataset:
        return False
    return bool(meta.get("shards")) and all((Path(shard_dir) / n).is_file() for n in meta["shards"])


def synthetic_complete(root: str | os.PathLike, stamp: dict | None = None) -> bool:
    """True if ROOT holds both list files and, given `stamp`, was generated with those
    arguments. A folder without STAMP (written by `synth` or an older segdist) cannot be
    told apart and counts as complete; it is never deleted."""
    lists = Path(root) / "ImageSets" / "Segmentation"
    if not ((lists / "train.txt").is_file() and (lists / "val.txt").is_file()):
        return False
    try:
        recorded = json.loads((Path(root) / STAMP).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return stamp is None or recorded == stamp


def _generate(root: Path, stamp: dict) -> None:
    """Write the set under a temporary name with its STAMP, then put it in ROOT's place."""
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_synthetic_voc(tmp, **stamp)
    (tmp / STAMP).write_text(json.dumps(stamp) + "\n")
    if root.exists():
        shutil.rmtree(root)  # an incomplete earlier attempt, or one made with other arguments
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


def prepare_synthetic(
    synthetic_root: str | os.PathLike,
    train_shards: str | os.PathLike,
    val_shards: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 150,
    workers: int | None = 1,
) -> None:
    """Generate the synthetic VOC folder (if missing, or stamped with other arguments) and
    build its train/val shards with the real VOC reader, dataset name "synthetic", unless
    they are a finished build of the folder's files as they are now (size and mtime of
    every file). Shards that are complete while the folder is gone are kept. Safe to call
    repeatedly; an interrupted call resumes. The folder is generated under a temporary name
    and renamed, so a half-written folder is never taken for a finished one.
    """
    root = Path(synthetic_root)
    outs = (("train", train_shards), ("val", val_shards))
    if not root.exists() and all(shards_complete(out, "synthetic") for _, out in outs):
        return  # nothing to compare the shards with
    stamp = {"seed": seed, "n_train": n_train, "n_val": n_val}
    if not synthetic_complete(root, stamp):
        _generate(root, stamp)
    for split, out in outs:
        source = VocSource(str(root), split, SYNTHETIC_CLASSES)
        build = {"dataset": "synthetic", "classes": SYNTHETIC_CLASSES, "shard_size": 64, "prefix": split}
        if not shards_up_to_date(source, out, **build):
            build_from_source(source, out, workers=workers, **build)
