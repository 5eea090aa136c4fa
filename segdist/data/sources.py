"""Pick the reader for a dataset name: one place that maps `--dataset` to a Source."""

from __future__ import annotations

from segdist.data.classes import DATASET_CLASSES
from segdist.data.voc import VocSource
from segdist.errors import SegdistError

DATASETS = ("voc", "sbd", "cityscapes", "synthetic")


def make_source(dataset: str, root: str, split: str):
    """A picklable source with keys() and load(key) for DATASET at ROOT, split SPLIT."""
    if dataset not in DATASETS:
        raise SegdistError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    classes = DATASET_CLASSES[dataset]
    if dataset in ("voc", "synthetic"):
        return VocSource(root, split, classes)
    raise SegdistError(f"--dataset {dataset}: not implemented yet")
