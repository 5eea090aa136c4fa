"""The original's augmentation (train.augmentation: tensorpack), held against references
written from its code (tensorpack/dataflow/imgaug at the log's commits, reference/recipes.md
"AUG-A"; misc/utils.py generate_trimap; dataset PascalVOC12Edge) and against OpenCV itself."""

import cv2
import numpy as np
import pytest

from segdist.data import transforms as T
from segdist.data.transforms import TrainTransform, canny_edges, edge_bytes, trimap


class Draws:
    """A numpy Generator look-alike that returns scripted uniforms (for the retry loop)."""

    def __init__(self, uniforms, integers=0, random=0.9):
        self.uniforms, self.int_value, self.random_value = list(uniforms), integers, random
        self.integer_calls = []

    def uniform(self, low, high):
        return self.uniforms.pop(0)

    def integers(self, low, high):
        self.integer_calls.append((low, high))
        return self.int_value

    def random(self):
        return self.random_value


def tensorpack_reference(rng, h, w, crop, xrange=(0.7, 1.5), thres=0.15):
    """imgaug.RandomResize._get_augment_params + RandomCropWithPadding, transcribed (thres > 0)."""
    cnt = 0
    while True:
        sx, sy = rng.uniform(*xrange), rng.uniform(*xrange)
        dest_x, dest_y = sx * w, sy * h
        new_w, new_h = int(dest_x + 0.5), int(dest_y + 0.5)
        oldr, newr = w * 1.0 / h, new_w * 1.0 / new_h
        if abs(newr - oldr) / oldr >= thres + 1e-5:
            cnt += 1
            if cnt > 50:
                new_h, new_w = h, w
                break
            continue
        break
    placement = []
    for size, c in ((new_h, crop[0]), (new_w, crop[1])):
        if c > size:
            placement.append(-((c - size) // 2))  # py2 int division; the odd pixel after
        else:
            diff = size - c
            placement.append(0 if diff == 0 else int(rng.integers(0, diff)))  # randint(diff): 0 .. diff-1
    return new_h, new_w, placement[0], placement[1]


def test_tensorpack_draws_match_the_original_algorithm():
    for seed in range(300):
        h, w = (int(v) for v in np.random.default_rng(seed).integers(20, 80, 2))
        crop = (33, 41)
        ours = T.sample_crop_params_tensorpack(np.random.default_rng(seed), h, w, crop, (0.7, 1.5), 0.15)
        theirs = tensorpack_reference(np.random.default_rng(seed), h, w, crop)
        assert (ours.scaled_h, ours.scaled_w, ours.top, ours.left) == theirs, seed


def test_tensorpack_resize_gives_up_after_51_draws_and_keeps_the_size():
    # every pair changes the aspect ratio by 1.5/0.7 - 1 > 0.15: 51 pairs, then no resize
    rng = Draws([0.7, 1.5] * 51, integers=0)
    p = T.sample_crop_params_tensorpack(rng, 40, 40, (20, 20), (0.7, 1.5), 0.15)
    assert (p.scaled_h, p.scaled_w) == (40, 40) and rng.uniforms == []
    rng = Draws([0.7, 1.5] * 50 + [1.2, 1.2])  # the 51st pair is accepted
    p = T.sample_crop_params_tensorpack(rng, 40, 40, (20, 20), (0.7, 1.5), 0.15)
    assert (p.scaled_h, p.scaled_w) == (48, 48)


def test_tensorpack_crop_origin_never_takes_the_last_offset():
    """randint(diff) draws 0 .. diff - 1: the window never ends at the image's last pixel."""
    rng = Draws([1.0, 1.0])
    T.sample_crop_params_tensorpack(rng, 50, 60, (20, 20), (0.7, 1.5), 0.15)
    assert rng.integer_calls == [(0, 30), (0, 40)]
    rng = np.random.default_rng(0)
    origins = {T.sample_crop_params_tensorpack(rng, 24, 24, (20, 20), (1.0, 1.0), 0.15).top for _ in range(400)}
    assert origins == {0, 1, 2, 3}


def test_tensorpack_padding_is_centred_with_the_odd_pixel_after_and_blue():
    image = np.full((7, 10, 3), 9, np.uint8)
    label = np.zeros((7, 10), np.uint8)
    t = TrainTransform((12, 15), (1.0, 1.0), augmentation="tensorpack", flip=False, image_pad=(0, 0, 255))
    img, target = t(image, label, np.random.default_rng(0))
    rows, cols = np.nonzero(target == 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 8, 2, 11)  # 5 rows: 2 before, 3 after
    assert np.all(img[target == 255] == [0, 0, 255, 0])  # cv2.copyMakeBorder(value=255) on BGR: blue
    assert np.all(img[target == 0, :3] == 9)


def test_tensorpack_crops_equal_cv2_resize_then_crop():
    """Image: cv2.resize INTER_LINEAR of the whole image, then the crop (within a grey level);
    label: cv2.resize INTER_NEAREST (source = floor(destination x in/out)), exactly."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (41, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (41, 53), dtype=np.uint8)
    t = TrainTransform(24, (0.7, 1.5), augmentation="tensorpack", aspect_jitter=0.15, flip=False)
    resized = 0
    for seed in range(30):
        p = t.sample(np.random.default_rng(seed), 41, 53)
        img, target = t(image, label, np.random.default_rng(seed))
        big = cv2.resize(image, (p.scaled_w, p.scaled_h), interpolation=cv2.INTER_LINEAR)
        big_label = cv2.resize(label, (p.scaled_w, p.scaled_h), interpolation=cv2.INTER_NEAREST)
        y0, x0 = max(p.top, 0), max(p.left, 0)
        oy, ox = max(-p.top, 0), max(-p.left, 0)
        hh, ww = min(24 - oy, p.scaled_h - y0), min(24 - ox, p.scaled_w - x0)
        assert np.array_equal(target[oy:oy + hh, ox:ox + ww], big_label[y0:y0 + hh, x0:x0 + ww])
        diff = np.abs(img[oy:oy + hh, ox:ox + ww, :3].astype(int) - big[y0:y0 + hh, x0:x0 + ww].astype(int))
        assert diff.max() <= 1
        resized += (p.scaled_h, p.scaled_w) != (41, 53)
    assert resized > 25


def test_tensorpack_without_an_aspect_limit_keeps_the_aspect_ratio():
    """aspect_ratio_thres 0: sy = sx, one draw, no check (imgaug.RandomResize)."""
    rng = Draws([1.25])
    p = T.sample_crop_params_tensorpack(rng, 40, 60, (20, 20), (0.7, 1.5), 0.0)
    assert (p.scaled_h, p.scaled_w) == (50, 75) and rng.uniforms == []


def generate_trimap_reference(label: np.ndarray) -> np.ndarray:
    """misc/utils.py generate_trimap(rador=1), transcribed (x rows, y columns)."""
    w, h = label.shape
    out = label.copy()

    def is_edge(x, y):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                if x + dx >= w or x + dx < 0 or y + dy >= h or y + dy < 0:
                    continue
                if label[x + dx, y + dy] != label[x, y]:
                    return True
        return False

    for x in range(w):
        for y in range(h):
            if is_edge(x, y):
                out[x - 1:x + 1, y - 1:y + 1] = 255
    return out


@pytest.mark.parametrize("seed", range(5))
def test_original_trimap_band_is_generate_trimaps(seed):
    rng = np.random.default_rng(seed)
    label = np.zeros((17, 23), np.uint8)
    for _ in range(4):  # a few rectangles of classes, void included
        y, x = rng.integers(0, 15), rng.integers(0, 21)
        label[y:y + rng.integers(2, 9), x:x + rng.integers(2, 9)] = rng.choice([1, 2, 255])
    assert np.array_equal(trimap(label, "original"), generate_trimap_reference(label))
    assert not np.array_equal(trimap(label, "original"), trimap(label, "3x3"))


def test_trimap_is_computed_on_the_source_label_before_the_resize():
    label = np.zeros((20, 20), np.uint8)
    label[:, 10:] = 1
    t = TrainTransform(40, (2.0, 2.0), augmentation="deeplab", flip=False, label_mode="trimap")
    _, target = t(np.zeros((20, 20, 3), np.uint8), label, np.random.default_rng(0))
    band = np.nonzero(target[5] == 255)[0]
    assert band.tolist() == [18, 19, 20, 21]  # 2 source pixels, doubled: the band scales with the image


def test_edge_map_is_the_whole_images_resized_with_it():
    """PascalVOC12Edge computed the edge map on the original image, before augmentation; the
    map is then resized, cropped and flipped with the image."""
    rng = np.random.default_rng(2)
    image = np.zeros((40, 50, 3), np.uint8)
    image[10:30, 15:35] = rng.integers(100, 256, 3, dtype=np.uint8)
    label = np.zeros((40, 50), np.uint8)
    whole = TrainTransform((40, 50), (1.0, 1.0), augmentation="tensorpack", flip=False, edges=True)
    img, _ = whole(image, label, np.random.default_rng(0))
    assert np.array_equal(img[..., 3], edge_bytes(canny_edges(image)))
    t = TrainTransform((60, 75), (1.5, 1.5), augmentation="deeplab", flip=False, edges=True)
    img, _ = t(image, label, np.random.default_rng(0))
    resized = cv2.resize(edge_bytes(canny_edges(image)), (75, 60), interpolation=cv2.INTER_LINEAR)
    assert np.abs(img[..., 3].astype(int) - resized.astype(int)).max() <= 1


def test_canny_runs_on_the_colour_image():
    """cv2.Canny on BGR keeps each pixel's strongest channel: an edge between two colours of
    the same grey level is found, which Canny on the grey image misses."""
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :10] = (150, 0, 0)
    grey_left = int(round(0.299 * 150))
    image[:, 10:] = (0, int(round(grey_left / 0.587)), 0)  # the same grey level, another colour
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    assert abs(int(grey[0, 0]) - int(grey[0, 15])) <= 1
    assert cv2.Canny(grey, 100, 200).max() == 0
    edges = canny_edges(image)
    assert edges[:, 8:12].max() > 0.3
    reference = cv2.GaussianBlur(cv2.Canny(image[..., ::-1].copy(), 100, 200).astype(np.float32) / 255, (5, 5), 0)
    assert np.array_equal(edges, reference)
