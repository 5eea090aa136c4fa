"""Cityscapes (fine annotations) mapped to the 19 train ids.

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Sample key = <city>_<seq>_<frame>. Labels: labelIds mapped through the official
cityscapesscripts table (segdist.data.classes.CITYSCAPES_LABELS); every id without a train
id becomes 255. Images are stored as their original PNG bytes (KEY.image.png in a shard)
unless the build downscales them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segdist.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_LABELS, cityscapes_train_id_lut
from segdist.data.sample import Sample, check_key, check_label, decode_label_png
from segdist.data.voc import check_sizes, read_bytes
from segdist.errors import SegdistError

_LUT = np.array(cityscapes_train_id_lut(), dtype=np.uint8)
_MAX_LABEL_ID = max(label_id for _, label_id, _ in CITYSCAPES_LABELS)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """uint8 labelIds -> uint8 train ids (0..18, 255 elsewhere)."""
    return _LUT[label_ids]


@dataclass(frozen=True)
class CityscapesSource:
    root: str
    split: str
    classes: tuple[str, ...] = CITYSCAPES_CLASSES

    def _image_dir(self) -> Path:
        return Path(self.root) / "leftImg8bit" / self.split

    def keys(self) -> list[str]:
        image_dir = self._image_dir()
        if not image_dir.is_dir():
            raise SegdistError(f"{image_dir}: Cityscapes image folder not found")
        keys = []
        for path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            key = path.name[: -len(IMAGE_SUFFIX)]
            check_key(key, str(path))
            if not key.startswith(path.parent.name + "_"):
                raise SegdistError(f"{path}: file name does not start with its city {path.parent.name!r}")
            keys.append(key)
        if not keys:
            raise SegdistError(f"{image_dir}: no *{IMAGE_SUFFIX} images")
        return keys

    def paths(self, key: str) -> tuple[Path, Path]:
        city = key.split("_", 1)[0]
        image = self._image_dir() / city / f"{key}{IMAGE_SUFFIX}"
        label = Path(self.root) / "gtFine" / self.split / city / f"{key}{LABEL_SUFFIX}"
        return image, label

    def files(self, key: str) -> list[Path]:
        """The files load(key) reads: [leftImg8bit image, gtFine labelIds]."""
        return list(self.paths(key))

    def load(self, key: str) -> Sample:
        image_path, label_path = self.paths(key)
        image_bytes = read_bytes(image_path, "image", key)
        where = f"{label_path} (sample {key!r})"
        label_ids = decode_label_png(read_bytes(label_path, "label", key), where)
        if label_ids.size and int(label_ids.max()) > _MAX_LABEL_ID:
            bad = sorted(int(v) for v in np.unique(label_ids[label_ids > _MAX_LABEL_ID])[:5])
            raise SegdistError(
                f"{where}: labelIds {bad} are not in the Cityscapes table (0..{_MAX_LABEL_ID})"
            )
        label = to_train_ids(label_ids)
        check_label(label, len(self.classes), where)
        check_sizes(image_bytes, label, image_path, label_path, key)
        return Sample(key, image_bytes, label, "png", str(image_path))
