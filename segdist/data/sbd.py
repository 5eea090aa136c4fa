"""SBD (Hariharan et al.) and the VOC "train_aug" split.

SBD layout (ROOT = benchmark_RELEASE/dataset, or benchmark_RELEASE itself):

    ROOT/img/<id>.jpg
    ROOT/cls/<id>.mat        GTcls.Segmentation: uint8 class indices 0..20 (no void border)
    ROOT/train.txt, ROOT/val.txt

train_aug (10582 images on the real data) = SBD train + SBD val + VOC train, minus VOC val.
Two ways to get its labels:

  * with SBD: VOC2012 ROOT plus the SBD folder. A key in VOC's own segmentation train list
    takes VOC's fine annotation (SegmentationClass/, with its 255 borders); every other key
    takes SBD's cls/<id>.mat. Images come from VOC's JPEGImages/ (SBD's img/ if absent).
  * with SegmentationClassAug: VOC2012 ROOT holding SegmentationClassAug/<id>.png (the
    widely shared pre-converted labels of all 12031 images). Keys = those PNGs minus VOC val.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segdist.data.classes import VOC_CLASSES
from segdist.data.sample import Sample, check_label, decode_label_png
from segdist.data.voc import VocSource, check_sizes, read_bytes, read_list_file
from segdist.errors import SegdistError


def sbd_dataset_dir(root: str | Path) -> Path:
    """ROOT itself, or ROOT/dataset when ROOT is the benchmark_RELEASE folder."""
    root = Path(root)
    if not root.is_dir():
        raise SegdistError(f"{root}: SBD folder not found")
    if not (root / "cls").is_dir() and (root / "dataset" / "cls").is_dir():
        return root / "dataset"
    if not (root / "cls").is_dir():
        raise SegdistError(f"{root}: not an SBD folder (no cls/ or dataset/cls/)")
    return root


def read_sbd_mat(path: Path, key: str) -> np.ndarray:
    """cls/<id>.mat -> uint8 [H, W] class indices (SegdistError naming the file if unreadable)."""
    from scipy.io import loadmat

    where = f"{path} (sample {key!r})"
    if not path.is_file():
        raise SegdistError(f"{path}: label of sample {key!r} not found")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as err:
        raise SegdistError(f"{where}: cannot read GTcls.Segmentation ({type(err).__name__}: {err})") from None
    if seg.ndim != 2:
        raise SegdistError(f"{where}: GTcls.Segmentation has shape {seg.shape}, expected 2-D")
    if seg.dtype != np.uint8:
        if seg.size and (seg.min() < 0 or seg.max() > 255):
            raise SegdistError(f"{where}: label values {int(seg.min())}..{int(seg.max())} do not fit 0..255")
        seg = seg.astype(np.uint8)
    return seg


@dataclass(frozen=True)
class SbdSource:
    """SBD's own train or val split (images img/*.jpg, labels cls/*.mat)."""

    root: str
    split: str
    classes: tuple[str, ...] = VOC_CLASSES

    def keys(self) -> list[str]:
        base = sbd_dataset_dir(self.root)
        keys = read_list_file(base / f"{self.split}.txt", f"SBD {self.split!r} list")
        if not keys:
            raise SegdistError(f"{base / f'{self.split}.txt'}: list file is empty")
        return keys

    def paths(self, key: str) -> tuple[Path, Path]:
        """(img/<key>.jpg, cls/<key>.mat)."""
        base = sbd_dataset_dir(self.root)
        return base / "img" / f"{key}.jpg", base / "cls" / f"{key}.mat"

    def files(self, key: str) -> list[Path]:
        """The files load(key) reads: [image, label .mat]."""
        return list(self.paths(key))

    def load(self, key: str) -> Sample:
        image_path, label_path = self.paths(key)
        image_bytes = read_bytes(image_path, "image", key)
        label = read_sbd_mat(label_path, key)
        check_label(label, len(self.classes), f"{label_path} (sample {key!r})")
        check_sizes(image_bytes, label, image_path, label_path, key)
        return Sample(key, image_bytes, label, "jpg", str(image_path))


@dataclass(frozen=True)
class TrainAugSource:
    """VOC train_aug: (SBD train + SBD val + VOC train) - VOC val; see the module docstring."""

    voc_root: str
    sbd_root: str | None = None
    classes: tuple[str, ...] = VOC_CLASSES

    def _voc(self, split: str) -> VocSource:
        return VocSource(self.voc_root, split, self.classes)

    def keys(self) -> list[str]:
        voc_val = set(self._voc("val").keys())
        if self.sbd_root is not None:
            base = sbd_dataset_dir(self.sbd_root)
            keys = set(read_list_file(base / "train.txt", "SBD train list"))
            keys |= set(read_list_file(base / "val.txt", "SBD val list"))
            keys |= set(self._voc("train").keys())
        else:
            aug = Path(self.voc_root) / "SegmentationClassAug"
            if not aug.is_dir():
                raise SegdistError(
                    f"{aug}: not found; train_aug needs either that folder or the SBD folder (--sbd-root)"
                )
            keys = {p.stem for p in aug.glob("*.png")}
        keys = sorted(keys - voc_val)
        if not keys:
            raise SegdistError(f"{self.voc_root}: train_aug is empty")
        return keys

    def paths(self, key: str) -> tuple[Path, Path]:
        """(image, label) of one key: the image from VOC's JPEGImages/ (SBD's img/ if absent
        there); the label from SegmentationClassAug/<key>.png without SBD, else VOC's
        SegmentationClass/<key>.png for a key in VOC's train list and SBD's cls/<key>.mat for
        any other."""
        voc = Path(self.voc_root)
        image_path = voc / "JPEGImages" / f"{key}.jpg"
        if self.sbd_root is None:
            return image_path, voc / "SegmentationClassAug" / f"{key}.png"
        sbd = sbd_dataset_dir(self.sbd_root)
        if not image_path.is_file():
            image_path = sbd / "img" / f"{key}.jpg"
        if key in self._voc_train_keys():
            return image_path, voc / "SegmentationClass" / f"{key}.png"
        return image_path, sbd / "cls" / f"{key}.mat"

    def files(self, key: str) -> list[Path]:
        """The files load(key) reads: [image, label (.png or SBD .mat)], see paths()."""
        return list(self.paths(key))

    def load(self, key: str) -> Sample:
        image_path, label_path = self.paths(key)
        image_bytes = read_bytes(image_path, "image", key)
        if label_path.suffix == ".mat":
            label = read_sbd_mat(label_path, key)
        else:
            label = decode_label_png(read_bytes(label_path, "label", key), f"{label_path} (sample {key!r})")
        check_label(label, len(self.classes), f"{label_path} (sample {key!r})")
        check_sizes(image_bytes, label, image_path, label_path, key)
        return Sample(key, image_bytes, label, "jpg", str(image_path))

    def _voc_train_keys(self) -> frozenset[str]:
        cached = self.__dict__.get("_train_keys")
        if cached is None:
            cached = frozenset(self._voc("train").keys())
            object.__setattr__(self, "_train_keys", cached)
        return cached
