"""Paired (image, label) transforms. Every random choice comes from an explicit
`numpy.random.Generator`; nothing touches a global RNG.

Training (`TrainTransform`): random resize by a scale drawn from `scale_range` (with optional
aspect jitter), image bilinear / label NEAREST; pad to the crop size (image with the mean
colour, label with 255) and random crop; horizontal flip. The resize is done only for the
region that ends up in the crop, which gives the same pixels as resizing the whole image and
then cropping, at a cost proportional to the crop rather than the image. Crops stay uint8
(R, G, B, edge) and are written straight into their batch slot; the float conversion and
normalisation happen on the training device (segdist.data.batch), where they are nearly free.

The image resize is OpenCV's bilinear (`cv2.warpAffine`, INTER_LINEAR, pixel centres at
+0.5, edges replicated: the interpolation of DeepLab's own cv2-based pipelines), about 4x
faster than PIL's. It agrees with PIL's BILINEAR to within 1 grey level when enlarging;
when shrinking it does not low-pass first (PIL's BILINEAR widens its kernel), like
cv2.resize(INTER_LINEAR). The label resize is exact index arithmetic (PIL's NEAREST), and
the crop geometry and every random draw are the same as PIL's would be.

Label modes: "hard" (class indices), "trimap" (pixels whose 3x3 neighbourhood holds another
value become 255) and "edgemix" (soft targets: the mean one-hot label over a (2r+1)^2
window, void pixels contributing nothing; void pixels get an all-zero target).

Optional edge channel (the `edge` variants): a Canny map (thresholds 100/200 on the grey
image, 0/1, then a 5x5 Gaussian blur) of the augmented image, stored x255 in the crop's
4th byte (0 in the padding) and divided by 255 on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2  # opencv-python-headless, single-threaded (see segdist/data/__init__.py)
import numpy as np
from scipy import ndimage

from segdist.data.classes import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

LABEL_MODES = ("hard", "trimap", "edgemix")
RESIZE_BACKEND = "opencv"  # recorded with every trial: the augmented pixels depend on it

_MEAN255 = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
_INV_STD255 = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)

# Training crops are uint8 [h, w, BATCH_CHANNELS]: R, G, B and the edge map (see TrainTransform)
BATCH_CHANNELS = 4
# image padding: the mean colour (as close as uint8 gets; ~0.005 after normalisation), edge 0
PAD_PIXEL = np.array([*np.rint(_MEAN255).astype(np.uint8), 0], dtype=np.uint8)


# uint8 value -> normalised float32, one table per channel: a gather is ~3x faster than
# (x - mean) / std in float arithmetic and gives the same numbers.
_NORM_LUT = np.ascontiguousarray(((np.arange(256, dtype=np.float32)[:, None] - _MEAN255) * _INV_STD255).T)


# the same tables as (256, 1) columns for cv2.LUT (which gives the same floats as the gather)
_NORM_LUT_CV = tuple(np.ascontiguousarray(_NORM_LUT[c].reshape(256, 1)) for c in range(3))


def normalize(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] normalised with IMAGENET_MEAN/STD (into `out`).

    `rgb` may carry a 4th channel (ignored). The numbers are the table's, whichever path runs.
    """
    if out is None:
        out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
    if rgb.size and min(out.strides) > 0 and min(rgb.strides) > 0:
        # split to contiguous planes, then one table lookup per plane written into `out`
        planes = cv2.split(rgb)
        for c in range(3):
            view = out[c]
            res = cv2.LUT(planes[c], _NORM_LUT_CV[c], dst=view)
            if res is not view:  # OpenCV could not write in place (unusual layout)
                view[...] = res.reshape(view.shape)
        return out
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


def _window(p: CropParams, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of the crop window inside the resized image: (vy0, vy1, vx0, vx1)."""
    ch, cw = crop
    return max(p.top, 0), min(p.top + ch, p.scaled_h), max(p.left, 0), min(p.left + cw, p.scaled_w)


def _nearest_index(v0: int, v1: int, size: int, scaled: int) -> np.ndarray:
    """Source rows (or columns) of PIL's NEAREST resize size -> scaled, for v0..v1-1."""
    idx = ((np.arange(v0, v1) + 0.5) * (size / scaled)).astype(np.intp)
    np.minimum(idx, size - 1, out=idx)
    return idx


def _pixels(rgb: np.ndarray) -> np.ndarray:
    """Decoded uint8 RGB [H, W, 3] -> uint8 [H, W, 4]: RGB + an unused byte, the layout OpenCV
    warps fastest (~4x faster than 3 channels, more than paying for this conversion)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)


def _taps_inside(v0: int, v1: int, step: float, size: int) -> bool:
    """Whether destination pixels v0..v1-1 (source = (v + 0.5) * step - 0.5) read only source
    pixels 0..size-1, with a 1/16-pixel margin for OpenCV's fixed-point coordinates."""
    return (v0 + 0.5) * step - 0.5 >= 1 / 16 and (v1 - 0.5) * step - 0.5 <= size - 1 - 1 / 16


def _resize_window(
    pixels: np.ndarray, p: CropParams, window: tuple[int, int, int, int], flip: bool, dst: np.ndarray | None = None
) -> np.ndarray:
    """Bilinear resize of the source pixels, only the window's part (mirrored with `flip`),
    into `dst` when given (a view into the batch: no copy afterwards); without `dst` and
    without a resize, a view of `pixels`.

    Destination pixel x of the window samples the source at (vx0 + x + 0.5) * W / scaled_w - 0.5,
    i.e. the pixel-centre mapping of resizing the whole image, then cropping.
    """
    height, width = pixels.shape[:2]
    vy0, vy1, vx0, vx1 = window
    if p.scaled_h == height and p.scaled_w == width:  # no resize: a plain cut
        cut = pixels[vy0:vy1, vx0:vx1]
        if flip:
            cut = cut[:, ::-1]
        if dst is None:
            return cut  # a view: `pixels` is always _pixels()'s fresh copy, never the decoded image
        dst[...] = cut
        return dst
    sy, sx = height / p.scaled_h, width / p.scaled_w
    if flip:  # window column x' shows column (w - 1 - x')
        row0 = [-sx, 0.0, (vx1 - 0.5) * sx - 0.5]
    else:
        row0 = [sx, 0.0, (vx0 + 0.5) * sx - 0.5]
    m = np.array([row0, [0.0, sy, (vy0 + 0.5) * sy - 0.5]])
    # Edge pixels are replicated; when every bilinear tap lies inside the image no border is
    # read and OpenCV's constant-border path gives the same pixels up to 5x faster.
    inside = _taps_inside(vy0, vy1, sy, height) and _taps_inside(vx0, vx1, sx, width)
    out = cv2.warpAffine(
        pixels, m, (vx1 - vx0, vy1 - vy0), dst=dst, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT if inside else cv2.BORDER_REPLICATE,
    )
    if dst is not None and out is not dst:  # OpenCV could not write in place (unusual layout)
        dst[...] = out
        return dst
    return out


def _resize_label(label: np.ndarray, p: CropParams, window: tuple[int, int, int, int], flip: bool = False) -> np.ndarray:
    """Nearest-neighbour resize of the window's part of the label (mirrored with `flip`):
    index arithmetic, exactly PIL's NEAREST on the whole image, then cropped (PIL's box
    variant can differ by one column on float ties)."""
    height, width = label.shape
    vy0, vy1, vx0, vx1 = window
    if p.scaled_h == height and p.scaled_w == width:
        cut = label[vy0:vy1, vx0:vx1]
        return cut[:, ::-1] if flip else cut
    ys = _nearest_index(vy0, vy1, height, p.scaled_h)
    xs = _nearest_index(vx0, vx1, width, p.scaled_w)
    return label.take(ys, axis=0).take(xs[::-1] if flip else xs, axis=1)


def resize_crop(
    image: np.ndarray, label: np.ndarray, p: CropParams, crop: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Resize (image bilinear, label nearest) and cut the crop window, without padding or flip.

    Returns the valid part of the crop (uint8 RGB [h, w, 3], uint8 label [h, w]) and where it
    goes in the crop: (y0, x0, y1, x1).
    """
    vy0, vy1, vx0, vx1 = window = _window(p, crop)
    placed = (vy0 - p.top, vx0 - p.left, vy1 - p.top, vx1 - p.left)
    rgb = np.ascontiguousarray(_resize_window(_pixels(image), p, window, False)[..., :3])
    return rgb, _resize_label(label, p, window), placed


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


def _fill_pixels(image: np.ndarray, pixel: np.ndarray) -> None:
    """image[...] = pixel for a uint8 [h, w, 4] array: as one 32-bit word per pixel, ~80x
    faster than numpy's broadcast of a 4-byte pattern."""
    try:
        image.view(np.uint32).fill(pixel.view(np.uint32)[0])
    except ValueError:  # not contiguous in its last axis: the slow way
        image[...] = pixel


class TrainTransform:
    """Decoded (uint8 RGB [H, W, 3] image, uint8 label) + rng -> (uint8 [h, w, 4] image, target).

    The image comes out as the training batch carries it (see segdist.data.batch): R, G, B
    and a fourth byte that holds the Canny edge map x255 with `edges=True` (unused, and not
    read, otherwise); padding is the mean colour. Normalisation happens on the device.
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

    def image_shape(self) -> tuple[int, int, int]:
        return (*self.crop, BATCH_CHANNELS)

    def target_shape(self) -> tuple[int, ...]:
        ch, cw = self.crop
        return (self.num_classes, ch, cw) if self.label_mode == "edgemix" else (ch, cw)

    def target_dtype(self):
        return np.float32 if self.label_mode == "edgemix" else np.uint8

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        rng: np.random.Generator,
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """Returns (image, target); with `out` = (image, target) arrays of those shapes and
        dtypes, writes into them instead (the loader passes its batch slots)."""
        height, width = label.shape
        p = sample_crop_params(rng, height, width, self.crop, self.scale_range, self.aspect_jitter, self.flip)
        ch, cw = self.crop
        if out is None:
            img_out = np.empty(self.image_shape(), dtype=np.uint8)
            target = np.empty(self.target_shape(), dtype=self.target_dtype())
        else:
            img_out, target = out
        window = _window(p, self.crop)
        vy0, vy1, vx0, vx1 = window
        y0, x0, y1, x1 = vy0 - p.top, vx0 - p.left, vy1 - p.top, vx1 - p.left
        if p.flip:  # the flipped valid part goes to the mirrored place
            x0, x1 = cw - x1, cw - x0
        if (y0, x0, y1, x1) != (0, 0, ch, cw):  # padding: image mean, label 255
            _fill_pixels(img_out, PAD_PIXEL)
            target.fill(0 if self.label_mode == "edgemix" else IGNORE_INDEX)
        # flipping commutes with trimap and edgemix (both symmetric), so it is done by the index
        lab = _resize_label(label, p, window, flip=p.flip)
        if self.label_mode == "edgemix":
            target[:, y0:y1, x0:x1] = edgemix(lab, self.num_classes, self.edgemix_radius)
        else:
            target[y0:y1, x0:x1] = trimap(lab) if self.label_mode == "trimap" else lab
        dst = img_out[y0:y1, x0:x1]
        if self.edges:  # Canny on the unflipped crop, then image and map mirrored together
            win = _resize_window(_pixels(image), p, window, False)
            win[..., 3] = edge_bytes(canny_edges(np.ascontiguousarray(win[..., :3])))
            dst[...] = win[:, ::-1] if p.flip else win
        else:  # the flip is part of the resize, written straight into the batch slot
            _resize_window(_pixels(image), p, window, p.flip, dst=dst)
        return img_out, target


def edge_bytes(edges: np.ndarray) -> np.ndarray:
    """An edge map in [0, 1] -> uint8 x255, as training crops carry it."""
    return np.rint(edges * 255.0).astype(np.uint8)


class EvalTransform:
    """Whole image, no augmentation: (float32 [3|4, H, W], uint8 label [H, W]).

    Validation images are few, whole and at batch 1, so they are normalised here, not on
    the device; the edge channel goes through the same uint8 rounding as in training."""

    def __init__(self, *, edges: bool = False) -> None:
        self.edges = edges

    def __call__(self, rgb: np.ndarray, label: np.ndarray):
        img = normalize(rgb)
        if self.edges:
            edges = edge_bytes(canny_edges(rgb)).astype(np.float32) / 255.0
            img = np.concatenate([img, edges[None]], axis=0)
        return img, label
