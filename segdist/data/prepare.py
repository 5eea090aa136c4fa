"""Make sure the quick start's shards exist: generate the synthetic VOC folder and build
both splits, unless a complete build is already there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.shard_writer import DATASET_JSON, build_from_source
from segdist.data.synthetic import write_synthetic_voc
from segdist.data.voc import VocSource


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


def synthetic_complete(root: str | os.PathLike) -> bool:
    lists = Path(root) / "ImageSets" / "Segmentation"
    return (lists / "train.txt").is_file() and (lists / "val.txt").is_file()


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
    """Generate (if missing) the synthetic VOC folder and build its train/val shards (if not
    complete) with the real VOC reader, dataset name "synthetic". Safe to call repeatedly;
    an interrupted call resumes. The folder is generated under a temporary name and renamed,
    so a half-written folder is never taken for a finished one.
    """
    if shards_complete(train_shards, "synthetic") and shards_complete(val_shards, "synthetic"):
        return
    root = Path(synthetic_root)
    if not synthetic_complete(root):
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_voc(tmp, seed=seed, n_train=n_train, n_val=n_val)
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    for split, out in (("train", train_shards), ("val", val_shards)):
        if not shards_complete(out, "synthetic"):
            source = VocSource(str(root), split, SYNTHETIC_CLASSES)
            build_from_source(
                source,
                out,
                dataset="synthetic",
                classes=SYNTHETIC_CLASSES,
                shard_size=64,
                prefix=split,
                workers=workers,
            )
