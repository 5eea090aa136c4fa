"""Paired (image, label) transforms. Every random choice comes from an explicit
`numpy.random.Generator`; nothing touches a global RNG.

Training (`TrainTransform`): random resize, pad to the crop size and random crop, horizontal
flip; image bilinear, label nearest. Two ways to draw them (the recipe's train.augmentation):

- `tensorpack`, the original's (tensorpack/dataflow/imgaug at the log's commits; reference/
  recipes.md "AUG-A"): RandomResize draws sx, then sy, each uniform in scale_range, rounds the
  new size with int(x + 0.5) and redraws (up to 51 pairs, else no resize) until the aspect
  ratio changes by less than aspect_jitter (0: sy = sx, no check); RandomCropWithPadding pads an axis that is
  smaller than the crop centrally (the odd pixel after) and draws the crop origin of a larger
  one with randint(diff), i.e. from 0 .. diff - 1; then Flip with probability 0.5. Labels are
  resized like cv2's INTER_NEAREST (source = floor(destination x in/out)).
- `deeplab`: one scale uniform in scale_range (aspect from 1 +- aspect_jitter), the image
  placed at a random offset in the padded crop when smaller, any crop origin; labels resized
  like PIL's NEAREST (pixel centres).

The resize is done only for the region that ends up in the crop, which gives the same
pixels as resizing the whole image and then cropping, at a cost proportional to the crop.
Crops stay uint8 (R, G, B, edge) and are written straight into their batch slot; the float
conversion and normalisation happen on the training device (segdist.data.batch).

The image resize is OpenCV's bilinear (`cv2.warpAffine`, INTER_LINEAR, pixel centres at
+0.5, edges replicated: cv2.resize's mapping, which the original used). When shrinking it
does not low-pass first, like cv2.resize(INTER_LINEAR).

Label modes: "hard" (class indices), "trimap" (boundary pixels become 255, computed on the
source label before any resize, as the original's offline trimap_gt1/ files were: band
"original" is generate_trimap's, a 2x2 block above-left of every pixel whose 3x3 window holds
another value; "3x3" is that whole neighbourhood) and "edgemix" (soft targets: the mean
one-hot label over a (2r+1)^2 window, void pixels contributing nothing; void pixels get an
all-zero target).

Optional edge channel (the `edge` variants): the original's PascalVOC12Edge map,
cv2.Canny(BGR image, 100, 200) / 255 then cv2.GaussianBlur((5, 5), 0), of the whole source
image before augmentation; stored x255 in the 4th byte, resized and flipped with the image
(0 in the padding) and divided by 255 on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2  # opencv-python-headless, single-threaded (see segdist/data/__init__.py)
import numpy as np

from segdist.data.classes import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from segdist.models.variant import LABEL_MODES

RESIZE_BACKEND = "opencv"  # recorded with every trial: the augmented pixels depend on it

_MEAN255 = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
_INV_STD255 = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)

# Training crops are uint8 [h, w, BATCH_CHANNELS]: R, G, B and the edge map (see TrainTransform)
BATCH_CHANNELS = 4
# default image padding: the mean colour (as close as uint8 gets; ~0.005 after normalisation), edge 0
MEAN_RGB = tuple(int(v) for v in np.rint(_MEAN255).astype(np.uint8))
PAD_PIXEL = np.array([*MEAN_RGB, 0], dtype=np.uint8)
AUGMENTATIONS = ("tensorpack", "deeplab")
TRIMAP_BANDS = ("original", "3x3")


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


def sample_crop_params_tensorpack(
    rng: np.random.Generator,
    height: int,
    width: int,
    crop: tuple[int, int],
    scale_range: tuple[float, float],
    aspect_limit: float = 0.15,
    flip: bool = True,
) -> CropParams:
    """tensorpack's RandomResize + RandomCropWithPadding + Flip (see the module docstring).
    scale_range (1, 1): no resize, nothing drawn for it."""
    sh, sw = height, width
    lo, hi = scale_range
    if (lo, hi) != (1.0, 1.0):
        old = width / height
        for _ in range(51):
            sx = float(rng.uniform(lo, hi))
            sy = sx if aspect_limit == 0 else float(rng.uniform(lo, hi))  # 0: keep the aspect ratio, no check
            new_w, new_h = max(1, int(sx * width + 0.5)), max(1, int(sy * height + 0.5))
            if aspect_limit == 0 or abs(new_w / new_h - old) / old < aspect_limit + 1e-5:
                sh, sw = new_h, new_w
                break
    ch, cw = crop
    top = int(rng.integers(0, sh - ch)) if sh > ch else -((ch - sh) // 2)
    left = int(rng.integers(0, sw - cw)) if sw > cw else -((cw - sw) // 2)
    do_flip = bool(rng.random() < 0.5) if flip else False
    return CropParams(sh, sw, top, left, do_flip)


def _window(p: CropParams, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of the crop window inside the resized image: (vy0, vy1, vx0, vx1)."""
    ch, cw = crop
    return max(p.top, 0), min(p.top + ch, p.scaled_h), max(p.left, 0), min(p.left + cw, p.scaled_w)


def _nearest_index(v0: int, v1: int, size: int, scaled: int, centres: bool = True) -> np.ndarray:
    """Source rows (or columns) of a NEAREST resize size -> scaled, for v0..v1-1: PIL's
    (pixel centres, floor((v + 0.5) in/out)) or, with centres=False, cv2's INTER_NEAREST
    (floor(v in/out))."""
    idx = ((np.arange(v0, v1) + (0.5 if centres else 0.0)) * (size / scaled)).astype(np.intp)
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


def _resize_label(label: np.ndarray, p: CropParams, window: tuple[int, int, int, int], flip: bool = False,
                  centres: bool = True) -> np.ndarray:
    """Nearest-neighbour resize of the window's part of the label (mirrored with `flip`):
    index arithmetic, exactly PIL's NEAREST (centres=True) or cv2's INTER_NEAREST (False) on
    the whole image, then cropped (PIL's box variant can differ by one column on float ties)."""
    height, width = label.shape
    vy0, vy1, vx0, vx1 = window
    if p.scaled_h == height and p.scaled_w == width:
        cut = label[vy0:vy1, vx0:vx1]
        return cut[:, ::-1] if flip else cut
    ys = _nearest_index(vy0, vy1, height, p.scaled_h, centres)
    xs = _nearest_index(vx0, vx1, width, p.scaled_w, centres)
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


def trimap(label: np.ndarray, band: str = "3x3") -> np.ndarray:
    """The label with a band around class boundaries set to 255 (uint8 [H, W] -> uint8 [H, W]).
    A pixel is a boundary pixel when its 3x3 window (clipped to the image) holds another value,
    255 included. band "3x3" (variants.md): the boundary pixels; "original": the original's
    misc/utils.py generate_trimap, which writes label[x-1:x+1, y-1:y+1] = 255 for every
    boundary pixel (x, y): the 2x2 block of rows x-1..x and columns y-1..y, nothing when x = 0
    or y = 0 (Python's [-1:1] slice is empty)."""
    if band not in TRIMAP_BANDS:
        raise ValueError(f"trimap band must be one of {TRIMAP_BANDS}, got {band!r}")
    from scipy import ndimage  # scipy only where trimap training needs it (a worker's start-up)

    border = ndimage.maximum_filter(label, size=3, mode="nearest") != ndimage.minimum_filter(
        label, size=3, mode="nearest"
    )
    if band == "original":
        seed = border.copy()
        seed[0, :] = False
        seed[:, 0] = False
        border = seed.copy()
        border[:-1, :] |= seed[1:, :]
        border[:, :-1] |= seed[:, 1:]
        border[:-1, :-1] |= seed[1:, 1:]
    out = label.copy()
    out[border] = IGNORE_INDEX
    return out


def edgemix(label: np.ndarray, num_classes: int, radius: int = 1) -> np.ndarray:
    """Soft targets float32 [C, H, W]: mean one-hot over a (2r+1)^2 window.

    Void pixels contribute nothing to their neighbours and get an all-zero target; the
    other targets sum to 1.
    """
    from scipy import ndimage  # scipy only where edgemix training needs it (a worker's start-up)

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
    """The original's edge map (PascalVOC12Edge) of uint8 RGB [H, W, 3] -> float32 [H, W] in
    [0, 1]: cv2.Canny on the colour image in BGR order (OpenCV keeps, per pixel, the channel of
    largest gradient), thresholds 100/200, / 255, then cv2.GaussianBlur((5, 5), sigma 0), i.e.
    the binomial kernel [1, 4, 6, 4, 1] / 16."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    edges = cv2.Canny(bgr, low, high).astype(np.float32) / 255.0
    return cv2.GaussianBlur(edges, (5, 5), 0)


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
    and a fourth byte that holds the edge map x255 with `edges=True` (unused, and not read,
    otherwise); padding is `image_pad` (RGB; default the mean colour), edge 0. Normalisation
    happens on the device. target: uint8 [h, w] for "hard"/"trimap" (255 = ignore), float32
    [C, h, w] for "edgemix". augmentation, trimap_band: see the module docstring.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 1.5),
        *,
        augmentation: str = "deeplab",
        aspect_jitter: float = 0.0,
        flip: bool = True,
        image_pad: tuple[int, int, int] = MEAN_RGB,
        label_mode: str = "hard",
        trimap_band: str = "3x3",
        num_classes: int | None = None,
        edgemix_radius: int = 1,
        edges: bool = False,
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if label_mode == "edgemix" and not num_classes:
            raise ValueError("label_mode='edgemix' needs num_classes")
        if augmentation not in AUGMENTATIONS or trimap_band not in TRIMAP_BANDS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS} and trimap_band one of {TRIMAP_BANDS}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0 <= aspect_jitter < 1:
            raise ValueError(f"aspect_jitter must be in [0, 1), got {aspect_jitter}")
        self.crop = as_size(crop_size)
        self.scale_range = (float(lo), float(hi))
        self.augmentation = augmentation
        self.aspect_jitter = float(aspect_jitter)
        self.flip = flip
        self.pad_pixel = np.array([*image_pad, 0], dtype=np.uint8)
        self.label_mode = label_mode
        self.trimap_band = trimap_band
        self.num_classes = num_classes
        self.edgemix_radius = edgemix_radius
        self.edges = edges

    @classmethod
    def from_recipe(cls, train, num_classes: int, edges: bool) -> TrainTransform:
        """The transform of a recipe's train part (segdist.recipe.TrainRecipe); `edges`: the
        model takes an edge map (recipe.model.edge_input is set)."""
        return cls(train.crop_size, train.scale_range, augmentation=train.augmentation,
                   aspect_jitter=train.aspect_jitter, flip=train.flip, image_pad=train.image_pad,
                   label_mode=train.label_mode, trimap_band=train.trimap_band, num_classes=num_classes,
                   edgemix_radius=train.edgemix_radius, edges=edges)

    def image_shape(self) -> tuple[int, int, int]:
        return (*self.crop, BATCH_CHANNELS)

    def target_shape(self) -> tuple[int, ...]:
        ch, cw = self.crop
        return (self.num_classes, ch, cw) if self.label_mode == "edgemix" else (ch, cw)

    def target_dtype(self):
        return np.float32 if self.label_mode == "edgemix" else np.uint8

    def sample(self, rng: np.random.Generator, height: int, width: int) -> CropParams:
        """This sample's resize, crop and flip, drawn by the transform's augmentation rule."""
        if self.augmentation == "tensorpack":
            return sample_crop_params_tensorpack(rng, height, width, self.crop, self.scale_range,
                                                 self.aspect_jitter, self.flip)
        return sample_crop_params(rng, height, width, self.crop, self.scale_range, self.aspect_jitter, self.flip)

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
        p = self.sample(rng, height, width)
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
        if (y0, x0, y1, x1) != (0, 0, ch, cw):  # padding: image_pad, edge 0, label 255
            _fill_pixels(img_out, self.pad_pixel)
            target.fill(0 if self.label_mode == "edgemix" else IGNORE_INDEX)
        if self.label_mode == "trimap":  # on the source label, before any resize (as the original)
            label = trimap(label, self.trimap_band)
        # flipping commutes with edgemix (symmetric), so it is done by the index
        lab = _resize_label(label, p, window, flip=p.flip, centres=self.augmentation == "deeplab")
        if self.label_mode == "edgemix":
            target[:, y0:y1, x0:x1] = edgemix(lab, self.num_classes, self.edgemix_radius)
        else:
            target[y0:y1, x0:x1] = lab
        pixels = _pixels(image)
        if self.edges:  # the whole image's edge map, resized and flipped with it
            pixels[..., 3] = edge_bytes(canny_edges(image))
        # the flip is part of the resize, written straight into the batch slot
        _resize_window(pixels, p, window, p.flip, dst=img_out[y0:y1, x0:x1])
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
