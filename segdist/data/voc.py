"""The PASCAL VOC 2012 layout reader (also reads the generated synthetic set).

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png          palette PNG, index = class, 255 = void border
    ROOT/ImageSets/Segmentation/<split>.txt  one id per line

`VocSource` is a picklable description of one split (so the shard builder can load samples
in worker processes); `iter_voc` streams its samples in list order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segdist.data.sample import Sample, check_key, check_label, decode_label_png, image_size
from segdist.errors import SegdistError


def read_list_file(path: Path, what: str = "list file") -> list[str]:
    """Ids, one per line (blank lines and surrounding space ignored); SegdistError if missing."""
    if not path.is_file():
        raise SegdistError(f"{path}: {what} not found")
    keys = []
    seen = set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        key = line.strip().split()[0] if line.strip() else ""
        if not key:
            continue
        check_key(key, f"{path}:{lineno}")
        if key in seen:
            raise SegdistError(f"{path}:{lineno}: id {key!r} listed twice")
        seen.add(key)
        keys.append(key)
    return keys


def read_bytes(path: Path, what: str, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SegdistError(f"{path}: {what} of sample {key!r} not found") from None
    except OSError as err:
        raise SegdistError(f"{path}: cannot read {what} of sample {key!r} ({err.strerror})") from None


def check_sizes(image_bytes: bytes, label: np.ndarray, image_path: Path, label_path: Path, key: str) -> None:
    width, height = image_size(image_bytes, f"{image_path} (sample {key!r})")
    if (height, width) != label.shape:
        raise SegdistError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image {image_path.name} is "
            f"{width}x{height} (sample {key!r})"
        )


@dataclass(frozen=True)
class VocSource:
    """One split of a VOC-layout folder."""

    root: str
    split: str
    classes: tuple[str, ...]
    label_dir: str = "SegmentationClass"
    list_file: str | None = None  # default ROOT/ImageSets/Segmentation/<split>.txt

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        root = Path(self.root)
        if not root.is_dir():
            raise SegdistError(f"{root}: VOC folder not found")

    @property
    def list_path(self) -> Path:
        if self.list_file is not None:
            return Path(self.list_file)
        return Path(self.root) / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    def keys(self) -> list[str]:
        keys = read_list_file(self.list_path, f"VOC {self.split!r} list")
        if not keys:
            raise SegdistError(f"{self.list_path}: list file is empty")
        return keys

    def image_path(self, key: str) -> Path:
        return Path(self.root) / "JPEGImages" / f"{key}.jpg"

    def label_path(self, key: str) -> Path:
        return Path(self.root) / self.label_dir / f"{key}.png"

    def files(self, key: str) -> list[Path]:
        """The files load(key) reads: [image, label]."""
        return [self.image_path(key), self.label_path(key)]

    def load(self, key: str) -> Sample:
        image_path, label_path = self.image_path(key), self.label_path(key)
        image_bytes = read_bytes(image_path, "image", key)
        label = decode_label_png(read_bytes(label_path, "label", key), f"{label_path} (sample {key!r})")
        check_label(label, len(self.classes), f"{label_path} (sample {key!r})")
        check_sizes(image_bytes, label, image_path, label_path, key)
        return Sample(key=key, image_bytes=image_bytes, label=label, image_ext="jpg", source=str(image_path))


def iter_voc(root: str | os.PathLike, split: str, *, classes: Sequence[str]) -> Iterator[Sample]:
    """Stream the samples of ROOT/ImageSets/Segmentation/<split>.txt in list order.

    image_bytes are the original JPEG bytes; label is the palette PNG read as indices.
    Missing folder/list/file, a label value outside {0..C-1, 255} or an image/label size
    mismatch raise SegdistError naming the file and the sample key.
    """
    source = VocSource(str(root), split, tuple(classes))
    for key in source.keys():
        yield source.load(key)
