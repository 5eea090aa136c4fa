import numpy as np
import pytest
from PIL import Image

from segdist.data.classes import IMAGENET_MEAN, IMAGENET_STD
from segdist.data.transforms import (
    CropParams,
    EvalTransform,
    TrainTransform,
    canny_edges,
    edgemix,
    normalize,
    resize_crop,
    trimap,
)


def _pair(h=37, w=45, seed=0, values=(0, 1, 2, 7, 255)):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, dtype=np.uint8), size=(h, w))
    return Image.fromarray(rgb), label


@pytest.mark.parametrize("scale_range", [(0.3, 0.6), (0.5, 2.5), (1.7, 3.1)])
def test_label_resize_never_invents_values(scale_range):
    image, label = _pair()
    t = TrainTransform(24, scale_range, aspect_jitter=0.15)
    rng = np.random.default_rng(1)
    for _ in range(20):
        img, target = t(image, label, rng)
        assert img.shape == (3, 24, 24) and img.dtype == np.float32
        assert target.shape == (24, 24) and target.dtype == np.uint8
        assert set(np.unique(target).tolist()) <= {0, 1, 2, 7, 255}


def test_padding_label_255_image_mean():
    image, label = _pair(h=10, w=12, values=(3,))
    t = TrainTransform((30, 40), (1.0, 1.0), flip=False)
    img, target = t(image, label, np.random.default_rng(0))
    inside = target == 3
    assert inside.sum() == 10 * 12
    assert np.all(target[~inside] == 255)
    assert np.all(img[:, ~inside] == 0.0)  # the mean, after normalisation
    # the unpadded part is the normalised image itself
    ys, xs = np.nonzero(inside)
    crop = img[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    np.testing.assert_allclose(crop, normalize(np.asarray(image)), rtol=1e-6)


def test_normalize_uses_imagenet_statistics():
    rgb = np.full((2, 2, 3), 128, np.uint8)
    out = normalize(rgb)
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-5)


def test_flip_moves_image_and_label_together():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :2] = 255
    label = np.zeros((8, 8), np.uint8)
    label[:, :2] = 1
    t = TrainTransform(8, (1.0, 1.0))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(16):
        img, target = t(Image.fromarray(rgb), label, rng)
        bright = img[0] > 0
        assert np.array_equal(bright, target == 1)
        seen.add(bool(target[0, 0] == 1))
    assert seen == {True, False}  # both flipped and unflipped occur


def test_crop_window_matches_resize_then_crop():
    image, label = _pair(h=40, w=50, values=(0, 1, 2, 3))
    p = CropParams(scaled_h=63, scaled_w=71, top=11, left=17, flip=False)
    rgb, lab, placed = resize_crop(image, label, p, (32, 32))
    full_lab = np.asarray(Image.fromarray(label).resize((71, 63), Image.NEAREST))
    full_rgb = np.asarray(image.resize((71, 63), Image.BILINEAR)).astype(int)
    assert placed == (0, 0, 32, 32)
    assert np.array_equal(lab, full_lab[11:43, 17:49])
    assert np.abs(rgb.astype(int) - full_rgb[11:43, 17:49]).max() <= 2


def test_same_rng_same_output():
    image, label = _pair()
    t = TrainTransform(20, (0.5, 1.5), aspect_jitter=0.1)
    a = t(image, label, np.random.default_rng(5))
    b = t(image, label, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_trimap_ignores_boundary_pixels():
    label = np.zeros((6, 6), np.uint8)
    label[:, 3:] = 1
    out = trimap(label)
    assert np.all(out[:, 2:4] == 255)
    assert np.all(out[:, :2] == 0) and np.all(out[:, 4:] == 1)


def test_edgemix_soft_targets():
    label = np.zeros((5, 6), np.uint8)
    label[:, 3:] = 2
    label[0, 0] = 255
    soft = edgemix(label, 3, radius=1)
    assert soft.shape == (3, 5, 6) and soft.dtype == np.float32
    assert np.all(soft[:, 0, 0] == 0)  # void pixel: no target
    valid = label != 255
    np.testing.assert_allclose(soft.sum(0)[valid], 1.0, rtol=1e-6)
    assert soft[0, 2, 0] == 1.0 and soft[2, 2, 5] == 1.0
    np.testing.assert_allclose(soft[:, 2, 2], [2 / 3, 0, 1 / 3], rtol=1e-6)


def test_edge_channel_and_label_modes():
    image, label = _pair(values=(0, 1, 2))
    rng = np.random.default_rng(0)
    img, target = TrainTransform(16, (1.0, 1.0), edges=True)(image, label, rng)
    assert img.shape == (4, 16, 16) and 0 <= img[3].min() and img[3].max() <= 1
    img, target = TrainTransform(16, (1.0, 1.0), label_mode="edgemix", num_classes=3)(image, label, rng)
    assert target.shape == (3, 16, 16) and target.dtype == np.float32
    img, lab = EvalTransform(edges=True)(image, label)
    assert img.shape == (4, 37, 45) and lab is label


def test_canny_finds_a_step_edge():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, 10:] = 255
    edges = canny_edges(rgb)
    assert edges.shape == (20, 20)
    column = edges[10]
    assert column[8:12].max() > 0.3 and column[:4].max() == 0 and column[16:].max() == 0
