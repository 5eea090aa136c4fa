"""One labelled sample as the sources produce it, and the label checks every stage shares.

A `Sample` holds the image exactly as it is stored in the source (the original JPEG or PNG
bytes, never re-encoded unless the builder downscales) and the label as a uint8 HxW array of
class indices (IGNORE_INDEX = 255 for void). Sources (voc.py, sbd.py, cityscapes.py) turn
their own layouts into Samples; the shard writer and the streaming reader only see Samples.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from segdist.data.classes import IGNORE_INDEX, voc_palette
from segdist.errors import SegdistError


@dataclass
class Sample:
    key: str  # unique id inside its split; no dots or slashes (webdataset splits on them)
    image_bytes: bytes  # the encoded image as stored in the source
    label: np.ndarray  # uint8 [H, W], values in {0..C-1, 255}
    image_ext: str = "jpg"  # "jpg" or "png": how image_bytes is encoded
    source: str = ""  # where the sample came from (a file path), for messages

    @property
    def height(self) -> int:
        return int(self.label.shape[0])

    @property
    def width(self) -> int:
        return int(self.label.shape[1])


def invalid_label_lut(num_classes: int) -> np.ndarray:
    """A 256-entry boolean table: True for label values outside {0..C-1, 255}."""
    lut = np.ones(256, dtype=bool)
    lut[:num_classes] = False
    lut[IGNORE_INDEX] = False
    return lut


def check_label(label: np.ndarray, num_classes: int, where: str, lut: np.ndarray | None = None) -> None:
    """Raise SegdistError naming `where` if the label holds a value outside {0..C-1, 255}."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise SegdistError(
            f"{where}: label must be a single-channel 8-bit image, got {label.dtype} {label.shape}"
        )
    # fast path: with uint8 wrap-around, values in [C, 254] become [0, 254 - C], while
    # 0..C-1 become 256-C..255 and 255 becomes 255-C, so one subtraction and a min suffice.
    if label.size == 0 or int((label - np.uint8(num_classes)).min()) >= IGNORE_INDEX - num_classes:
        return
    if lut is None:
        lut = invalid_label_lut(num_classes)
    bad = lut[label]
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad])[:5])
        raise SegdistError(
            f"{where}: label value(s) {values} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
            f"({num_classes} classes)"
        )


def decode_label_png(data: bytes, where: str) -> np.ndarray:
    """PNG bytes (palette 'P' or grayscale 'L') -> uint8 [H, W] of indices."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise SegdistError(
                    f"{where}: label PNG has mode {im.mode}; expected a palette (P) or grayscale (L) image "
                    "of class indices"
                )
            return np.asarray(im, dtype=np.uint8)
    except SegdistError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise SegdistError(f"{where}: cannot decode label PNG ({err})") from None


def encode_label_png(label: np.ndarray) -> bytes:
    """uint8 [H, W] indices -> palette PNG bytes (VOC colour map), deterministic."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


DATASET_JSON = "dataset.json"  # a shard folder's index: shard_writer writes it, stream reads it
_IMREAD_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION

# Labels in shards: the raw uint8 [H, W] array as one zstd frame (a standard .zst: `zstd -d`
# gives the H*W bytes; H and W are the image's). It decodes in ~40 us at VOC sizes where a
# palette PNG takes ~240 us (zlib inflate), a quarter of a training sample's decode time, and is
# ~30% smaller. Level 9: the size levels off there, and encoding stays under a millisecond.
LABEL_ZSTD = pa.Codec("zstd", compression_level=9)


def encode_label_zst(label: np.ndarray) -> bytes:
    """uint8 [H, W] indices -> zstd frame of the raw bytes (row-major)."""
    return LABEL_ZSTD.compress(np.ascontiguousarray(label, dtype=np.uint8).tobytes(), asbytes=True)


def decode_label_zst(data: bytes, height: int, width: int, where: str) -> np.ndarray:
    """zstd frame -> uint8 [height, width]; SegdistError naming `where` if it is corrupt or does
    not hold exactly height*width pixels (the size of its image)."""
    try:
        raw = LABEL_ZSTD.decompress(data, decompressed_size=height * width)
    except (OSError, ValueError) as err:
        raise SegdistError(
            f"{where}: label (.label.zst) is corrupt or not {width}x{height} like its image ({err})"
        ) from None
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width)


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as err:
        raise SegdistError(f"{where}: cannot read image ({err})") from None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 RGB [H, W, 3]; SegdistError naming `where` if broken.

    OpenCV's decoders (libjpeg-turbo, libpng): the same pixels as PIL's, without PIL's
    Python-level header parsing (~40 us a sample). EXIF orientation is ignored, as PIL does:
    labels are drawn on the stored pixel grid. Truncated or corrupt files are refused.
    """
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_RGB)
    except cv2.error:  # e.g. no bytes at all
        image = None
    if image is None:
        raise SegdistError(f"{where}: cannot decode image (not a JPEG or PNG, or truncated/corrupt)")
    return image


def check_key(key: str, where: str) -> None:
    if not key or "." in key or "/" in key or "\\" in key:
        raise SegdistError(f"{where}: sample key {key!r} must be non-empty and hold no '.', '/' or '\\'")
