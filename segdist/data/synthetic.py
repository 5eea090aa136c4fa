"""A small generated data set in the PASCAL VOC layout, for the quick start and the tests.

Classes (SYNTHETIC_CLASSES): background, disc, bar, ring, cross, frame. Each object class has
its own hue band and its own texture (so class identity is readable from local colour and
texture statistics); the shapes have thin parts (bars, ring walls, frame sides, cross arms),
so boundaries matter. Backgrounds are textured but unsaturated. Like real VOC, a void border
(255) about two pixels wide runs along every boundary between two different labels.

Every image is a pure function of (seed, index): the files are byte-identical across runs.
"""

from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from segdist.data.classes import IGNORE_INDEX, SYNTHETIC_CLASSES
from segdist.data.sample import encode_label_png

# class index -> (hue centre in [0, 1), texture name)
_CLASS_STYLE = {
    1: (0.00, "smooth"),  # disc: red
    2: (0.33, "stripes"),  # bar: green
    3: (0.60, "checker"),  # ring: blue
    4: (0.14, "dots"),  # cross: orange/yellow
    5: (0.83, "diagonal"),  # frame: magenta
}


def _texture(name: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture in [-1, 1] over the whole image grid."""
    phase = rng.uniform(0, 2 * np.pi)
    if name == "smooth":
        return np.zeros_like(yy)
    if name == "stripes":
        period = rng.uniform(4.0, 6.0)
        return np.sign(np.sin(2 * np.pi * yy / period + phase))
    if name == "checker":
        period = rng.uniform(5.0, 7.0)
        return np.sign(np.sin(2 * np.pi * yy / period + phase) * np.sin(2 * np.pi * xx / period + phase))
    if name == "dots":
        period = rng.uniform(4.0, 6.0)
        s = np.sin(2 * np.pi * yy / period + phase) * np.sin(2 * np.pi * xx / period)
        return np.where(s > 0.5, 1.0, -0.4)
    if name == "diagonal":
        period = rng.uniform(5.0, 7.0)
        return np.sign(np.sin(2 * np.pi * (xx + yy) / period + phase))
    raise ValueError(name)


def _rotated(yy, xx, cy, cx, angle):
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return u, v


def _shape_mask(cls: int, yy, xx, h, w, rng: np.random.Generator) -> np.ndarray:
    f = min(h, w) / 112.0  # shape sizes are for ~112 px images; scale for other sizes
    cy, cx = rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)
    angle = rng.uniform(0, np.pi)
    if cls == 1:  # disc
        r = f * rng.uniform(12, 26)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if cls == 2:  # bar: long and thin
        length, thick = f * rng.uniform(50, 100), f * rng.uniform(10, 15)
        u, v = _rotated(yy, xx, cy, cx, angle)
        return (np.abs(u) <= length / 2) & (np.abs(v) <= thick / 2)
    if cls == 3:  # ring: thin wall
        r_out = f * rng.uniform(18, 32)
        r_in = r_out - f * rng.uniform(8, 12)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 <= r_out * r_out) & (d2 >= r_in * r_in)
    if cls == 4:  # cross: two thin perpendicular arms
        arm, thick = f * rng.uniform(20, 38), f * rng.uniform(8, 12)
        u, v = _rotated(yy, xx, cy, cx, angle)
        return ((np.abs(u) <= arm) & (np.abs(v) <= thick / 2)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= thick / 2)
        )
    if cls == 5:  # frame: square outline with thin sides
        half, thick = f * rng.uniform(20, 36), f * rng.uniform(8, 12)
        u, v = _rotated(yy, xx, cy, cx, angle)
        m = np.maximum(np.abs(u), np.abs(v))
        return (m <= half) & (m >= half - thick)
    raise ValueError(cls)


def _background(h: int, w: int, yy, xx, rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(70, 185)
    tint = rng.uniform(-12, 12, size=3)
    # low-frequency blotches: a coarse random grid upsampled bilinearly
    grid = rng.uniform(-1, 1, size=(rng.integers(3, 7), rng.integers(3, 7))).astype(np.float32)
    blotch = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR))
    # a faint grey texture (stripes at a random angle) so the background is not flat either
    u, _ = _rotated(yy, xx, 0, 0, rng.uniform(0, np.pi))
    stripes = np.sin(2 * np.pi * u / rng.uniform(6, 14))
    lum = grey + 30 * blotch + 8 * stripes
    return lum[..., None] + tint[None, None, :]


def make_synthetic_sample(seed: int, index: int, min_size: int = 96, max_size: int = 128):
    """One (RGB uint8 [H,W,3], label uint8 [H,W]) pair, a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = _background(h, w, yy, xx, rng)
    label = np.zeros((h, w), dtype=np.uint8)
    n_objects = int(rng.integers(3, 7))
    for _ in range(n_objects):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(cls, yy, xx, h, w, rng)
        hue_centre, texture = _CLASS_STYLE[cls]
        hue = (hue_centre + rng.uniform(-0.035, 0.035)) % 1.0
        base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))) * 255
        tex = _texture(texture, yy, xx, rng)
        obj = base[None, None, :] * (1.0 + 0.12 * tex[..., None])
        rgb[mask] = obj[mask]
        label[mask] = cls
    rgb = rgb + rng.normal(0, 6, size=rgb.shape)
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    # void border along every label change, about 2 px wide (one pixel on each side)
    border = ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)
    label[border] = IGNORE_INDEX
    return image, label


def write_synthetic_voc(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 150,
    min_size: int = 96,
    max_size: int = 128,
) -> None:
    """Write the generated set in the VOC layout under OUT_DIR (deterministic from seed).

    JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG, 255 = void border) and
    ImageSets/Segmentation/{train,val}.txt; ids 000000.. (train first, then val). The list
    files are written last, so a folder with both lists is complete.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError("n_train and n_val must be positive")
    if not 8 <= min_size <= max_size:
        raise ValueError("need 8 <= min_size <= max_size")
    out = Path(out_dir)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    keys = [f"{i:06d}" for i in range(n_train + n_val)]
    for index, key in enumerate(keys):
        image, label = make_synthetic_sample(seed, index, min_size, max_size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        (out / "JPEGImages" / f"{key}.jpg").write_bytes(buf.getvalue())
        (out / "SegmentationClass" / f"{key}.png").write_bytes(encode_label_png(label))
    lists = out / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("".join(k + "\n" for k in keys[:n_train]))
    (lists / "val.txt").write_text("".join(k + "\n" for k in keys[n_train:]))
