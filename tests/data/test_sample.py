import io

import numpy as np
import pytest
from PIL import Image

from segdist.data.sample import decode_image, decode_label_zst, encode_label_zst
from segdist.errors import SegdistError

from .conftest import jpeg_bytes


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_decode_image_gives_pils_rgb_pixels(mode, fmt):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8))
    data = _encoded(rgb.convert(mode), fmt)
    decoded = decode_image(data, "x")
    assert decoded.dtype == np.uint8 and decoded.shape == (21, 34, 3)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    tolerance = 1 if mode == "CMYK" else 0  # CMYK -> RGB rounds differently
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance


def test_decode_image_ignores_exif_orientation():
    # labels are drawn on the stored pixel grid; rotating the image would misalign them
    rgb = np.zeros((10, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encoded(Image.fromarray(rgb), "JPEG", exif=exif.tobytes())
    assert decode_image(data, "x").shape == (10, 30, 3)


@pytest.mark.parametrize("cut", [lambda d: d[: len(d) // 2], lambda d: d[:-2], lambda d: b"", lambda d: b"not an image"])
def test_decode_image_refuses_broken_bytes(cut):
    data = jpeg_bytes(np.full((16, 16, 3), 90, np.uint8))
    with pytest.raises(SegdistError, match=r"^shard-1\.tar \(sample 'k'\): cannot decode image"):
        decode_image(cut(data), "shard-1.tar (sample 'k')")


def test_label_zst_round_trip_and_size_check():
    label = np.random.default_rng(0).choice(np.array([0, 3, 255], np.uint8), size=(7, 9))
    data = encode_label_zst(label)
    assert np.array_equal(decode_label_zst(data, 7, 9, "x"), label)
    for height, width in ((9, 9), (6, 9)):
        with pytest.raises(SegdistError, match=rf"^x: label \(\.label\.zst\) is corrupt or not {width}x{height}"):
            decode_label_zst(data, height, width, "x")
