"""Paired (image, label) transforms. Every random choice comes from an explicit
`numpy.random.Generator`; nothing touches a global RNG.

Training (`TrainTransform`): random resize by a scale drawn from `scale_range` (with optional
aspect jitter), image bilinear / label NEAREST; pad to the crop size (image with the mean,
i.e. 0 after normalisation; label with 255) and random crop; horizontal flip. The resize is
done only for the region that ends up in the crop (PIL's `resize(box=...)`), which gives the
same pixels as resizing the whole image and then cropping, at a cost proportional to the
crop rather than the image.

Label modes: "hard" (class indices), "trimap" (pixels whose 3x3 neighbourhood holds another
value become 255) and "edgemix" (soft targets: the mean one-hot label over a (2r+1)^2
window, void pixels contributing nothing; void pixels get an all-zero target).

Optional edge channel (the `edge` variants): a Canny map (thresholds 100/200 on the grey
image, 0/1, then a 5x5 Gaussian blur) of the augmented image, appended as a 4th input
channel (0 in the padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from segdist.data.classes import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

LABEL_MODES = ("hard", "trimap", "edgemix")

_MEAN255 = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
_INV_STD255 = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)


# uint8 value -> normalised float32, one table per channel: a gather is ~3x faster than
# (x - mean) / std in float arithmetic and gives the same numbers.
_NORM_LUT = np.ascontiguousarray(((np.arange(256, dtype=np.float32)[:, None] - _MEAN255) * _INV_STD255).T)


def normalize(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] normalised with IMAGENET_MEAN/STD (into `out`)."""
    if out is None:
        out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        if out[c].flags.c_contiguous:
            np.take(_NORM_LUT[c], rgb[..., c], out=out[c])
        else:
            out[c] = _NORM_LUT[c][rgb[..., c]]
    return out


def as_size(crop_size: int | tuple[int, int]) -> tuple[int, int]:
    """An int or (height, width) -> (height, width)."""
    if isinstance(crop_size, int):
        return crop_size, crop_size
    h, w = crop_size
    return int(h), int(w)


@dataclass(frozen=True)
class CropParams:
    scaled_h: int  # size of the (virtually) resized image
    scaled_w: int
    top: int  # crop window origin in the resized image (may be negative: padding)
    left: int
    flip: bool


def sample_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    crop: tuple[int, int],
    scale_range: tuple[float, float],
    aspect_jitter: float = 0.0,
    flip: bool = True,
) -> CropParams:
    """Draw scale (and aspect), crop position and flip for one sample."""
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    if aspect_jitter > 0:
        aspect = float(rng.uniform(1.0 - aspect_jitter, 1.0 + aspect_jitter))
        sx, sy = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    else:
        sx = sy = scale
    sh, sw = max(1, round(height * sy)), max(1, round(width * sx))
    ch, cw = crop
    # larger than the crop: a random window inside; smaller: the image at a random place in
    # the padded crop (padding around it).
    top = int(rng.integers(0, sh - ch + 1)) if sh >= ch else -int(rng.integers(0, ch - sh + 1))
    left = int(rng.integers(0, sw - cw + 1)) if sw >= cw else -int(rng.integers(0, cw - sw + 1))
    do_flip = bool(rng.random() < 0.5) if flip else False
    return CropParams(sh, sw, top, left, do_flip)


def resize_crop(
    image: Image.Image, label: np.ndarray, p: CropParams, crop: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Resize (image bilinear, label nearest) and cut the crop window, without padding.

    Returns the valid part of the crop (uint8 RGB [h, w, 3], uint8 label [h, w]) and where it
    goes in the crop: (y0, x0, y1, x1).
    """
    height, width = label.shape
    ch, cw = crop
    vy0, vy1 = max(p.top, 0), min(p.top + ch, p.scaled_h)
    vx0, vx1 = max(p.left, 0), min(p.left + cw, p.scaled_w)
    ry, rx = p.scaled_h / height, p.scaled_w / width
    box = (vx0 / rx, vy0 / ry, vx1 / rx, vy1 / ry)
    size = (vx1 - vx0, vy1 - vy0)
    if size == (width, height) and p.scaled_h == height and p.scaled_w == width:
        rgb = np.asarray(image)
        lab = label
    else:
        rgb = np.asarray(image.resize(size, Image.BILINEAR, box=box))
        # nearest neighbour by index arithmetic: exactly PIL's NEAREST on the whole image,
        # then cropped (PIL's box variant can differ by one column on float ties)
        ys = np.minimum(((np.arange(vy0, vy1) + 0.5) * (height / p.scaled_h)).astype(np.int64), height - 1)
        xs = np.minimum(((np.arange(vx0, vx1) + 0.5) * (width / p.scaled_w)).astype(np.int64), width - 1)
        lab = label[ys[:, None], xs[None, :]]
    return rgb, lab, (vy0 - p.top, vx0 - p.left, vy1 - p.top, vx1 - p.left)


def trimap(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds another value (void included) -> 255."""
    out = label.copy()
    border = ndimage.maximum_filter(label, size=3, mode="nearest") != ndimage.minimum_filter(
        label, size=3, mode="nearest"
    )
    out[border] = IGNORE_INDEX
    return out


def edgemix(label: np.ndarray, num_classes: int, radius: int = 1) -> np.ndarray:
    """Soft targets float32 [C, H, W]: mean one-hot over a (2r+1)^2 window.

    Void pixels contribute nothing to their neighbours and get an all-zero target; the
    other targets sum to 1.
    """
    size = 2 * radius + 1
    onehot = np.zeros((num_classes,) + label.shape, dtype=np.float32)
    valid = label != IGNORE_INDEX
    ys, xs = np.nonzero(valid)
    onehot[label[ys, xs], ys, xs] = 1.0
    counts = ndimage.uniform_filter(onehot, size=(1, size, size), mode="constant")
    total = counts.sum(axis=0, keepdims=True)
    soft = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    soft[:, ~valid] = 0.0
    return soft


def canny_edges(rgb: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """A Canny edge map of uint8 RGB [H, W, 3] -> float32 [H, W] in [0, 1].

    Follows cv2.Canny(grey, low, high) (3x3 Sobel, L1 magnitude, non-maximum suppression,
    hysteresis with 8-connectivity), then /255 and a 5x5 Gaussian blur (sigma 1.1, as
    cv2.GaussianBlur(.., (5, 5), 0)). A numpy/scipy re-implementation: close to OpenCV's,
    not bit-identical.
    """
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.round(grey)
    gx = ndimage.sobel(grey, axis=1, mode="reflect")
    gy = ndimage.sobel(grey, axis=0, mode="reflect")
    mag = np.abs(gx) + np.abs(gy)
    # quantise the gradient direction to 0, 45, 90, 135 degrees
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    padded = np.pad(mag, 1, mode="constant")
    h, w = mag.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    keep = np.zeros_like(mag, dtype=bool)
    for lo, hi, (dy, dx) in (
        (0.0, 22.5, (0, 1)),
        (157.5, 180.1, (0, 1)),
        (22.5, 67.5, (1, 1)),
        (67.5, 112.5, (1, 0)),
        (112.5, 157.5, (1, -1)),
    ):
        sel = (angle >= lo) & (angle < hi)
        keep |= sel & (mag > shifted(dy, dx)) & (mag >= shifted(-dy, -dx))
    strong = keep & (mag > high)
    weak = keep & (mag > low)
    regions, n = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    if n:
        has_strong = np.zeros(n + 1, dtype=bool)
        has_strong[regions[strong]] = True
        has_strong[0] = False
        edges = has_strong[regions].astype(np.float32)
    else:
        edges = np.zeros_like(mag, dtype=np.float32)
    return ndimage.gaussian_filter(edges, sigma=1.1, truncate=2.0 / 1.1, mode="reflect")


class TrainTransform:
    """Decoded (PIL RGB image, uint8 label) + rng -> (float32 [3|4, h, w], target).

    target: uint8 [h, w] for "hard"/"trimap" (255 = ignore), float32 [C, h, w] for "edgemix".
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 1.5),
        *,
        aspect_jitter: float = 0.0,
        flip: bool = True,
        label_mode: str = "hard",
        num_classes: int | None = None,
        edgemix_radius: int = 1,
        edges: bool = False,
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if label_mode == "edgemix" and not num_classes:
            raise ValueError("label_mode='edgemix' needs num_classes")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0 <= aspect_jitter < 1:
            raise ValueError(f"aspect_jitter must be in [0, 1), got {aspect_jitter}")
        self.crop = as_size(crop_size)
        self.scale_range = (float(lo), float(hi))
        self.aspect_jitter = float(aspect_jitter)
        self.flip = flip
        self.label_mode = label_mode
        self.num_classes = num_classes
        self.edgemix_radius = edgemix_radius
        self.edges = edges

    @property
    def channels(self) -> int:
        return 4 if self.edges else 3

    def target_shape(self) -> tuple[int, ...]:
        ch, cw = self.crop
        return (self.num_classes, ch, cw) if self.label_mode == "edgemix" else (ch, cw)

    def target_dtype(self):
        return np.float32 if self.label_mode == "edgemix" else np.uint8

    def __call__(
        self,
        image: Image.Image,
        label: np.ndarray,
        rng: np.random.Generator,
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """Returns (image float32 [3|4, h, w], target); with `out` = (image, target) arrays
        of those shapes (target may be any integer dtype in hard/trimap mode), writes into
        them instead of allocating (the loader passes slices of its batch arrays)."""
        height, width = label.shape
        p = sample_crop_params(rng, height, width, self.crop, self.scale_range, self.aspect_jitter, self.flip)
        rgb, lab, (y0, x0, y1, x1) = resize_crop(image, label, p, self.crop)
        ch, cw = self.crop
        if out is None:
            img_out = np.empty((self.channels, ch, cw), dtype=np.float32)
            target = np.empty(self.target_shape(), dtype=self.target_dtype())
        else:
            img_out, target = out
        if self.label_mode == "trimap":
            lab = trimap(lab)
        soft = edgemix(lab, self.num_classes, self.edgemix_radius) if self.label_mode == "edgemix" else None
        edges = canny_edges(rgb) if self.edges else None
        if p.flip:  # flip the valid part and mirror where it goes
            rgb, lab = rgb[:, ::-1], lab[:, ::-1]
            soft = soft[:, :, ::-1] if soft is not None else None
            edges = edges[:, ::-1] if edges is not None else None
            x0, x1 = cw - x1, cw - x0
        if (y0, x0, y1, x1) != (0, 0, ch, cw):  # padding: image mean (= 0), label 255
            img_out.fill(0.0)
            target.fill(0 if soft is not None else IGNORE_INDEX)
        normalize(rgb, out=img_out[:3, y0:y1, x0:x1])
        if edges is not None:
            img_out[3, y0:y1, x0:x1] = edges
        if soft is not None:
            target[:, y0:y1, x0:x1] = soft
        else:
            target[y0:y1, x0:x1] = lab
        return img_out, target


class EvalTransform:
    """Whole image, no augmentation: (float32 [3|4, H, W], uint8 label [H, W])."""

    def __init__(self, *, edges: bool = False) -> None:
        self.edges = edges

    def __call__(self, image: Image.Image, label: np.ndarray):
        rgb = np.asarray(image)
        img = normalize(rgb)
        if self.edges:
            img = np.concatenate([img, canny_edges(rgb)[None]], axis=0)
        return img, label
