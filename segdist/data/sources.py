"""Pick the reader for a dataset name: one place that maps `--dataset` to a Source."""

from __future__ import annotations

from segdist.data.classes import DATASET_CLASSES
from segdist.errors import SegdistError

DATASETS = ("voc", "sbd", "cityscapes", "synthetic")


def make_source(dataset: str, root: str, split: str, *, sbd_root: str | None = None):
    """A picklable source with keys(), load(key) and files(key) (the files a sample is read
    from; segdist.data.shard_writer.Source) for DATASET at ROOT, split SPLIT.

    voc / synthetic: ROOT = a VOC-layout folder; split = any ImageSets/Segmentation list
      (train, val, ...); split train_aug = VOC train_aug (see segdist.data.sbd).
    sbd: split train / val = SBD's own lists, ROOT = the SBD folder; split train_aug =
      ROOT is VOC2012, labels from --sbd-root (SBD) or ROOT/SegmentationClassAug.
    cityscapes: ROOT holds leftImg8bit/ and gtFine/; split train / val / test.
    """
    if dataset not in DATASETS:
        raise SegdistError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    classes = DATASET_CLASSES[dataset]
    if sbd_root is not None and split != "train_aug":
        raise SegdistError(f"--sbd-root is only used with --split train_aug (got --split {split})")
    if dataset in ("voc", "sbd") and split == "train_aug":
        from segdist.data.sbd import TrainAugSource

        return TrainAugSource(root, sbd_root, classes)
    if dataset in ("voc", "synthetic"):
        from segdist.data.voc import VocSource

        return VocSource(root, split, classes)
    if dataset == "sbd":
        from segdist.data.sbd import SbdSource

        return SbdSource(root, split, classes)
    from segdist.data.cityscapes import CityscapesSource

    return CityscapesSource(root, split, classes)
