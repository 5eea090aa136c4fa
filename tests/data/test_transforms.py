import numpy as np
import pytest
import torch
from PIL import Image

from segdist.data.batch import model_inputs
from segdist.data.classes import IMAGENET_MEAN, IMAGENET_STD
from segdist.data.transforms import (
    PAD_PIXEL,
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
    return rgb, label


@pytest.mark.parametrize("scale_range", [(0.3, 0.6), (0.5, 2.5), (1.7, 3.1)])
def test_label_resize_never_invents_values(scale_range):
    image, label = _pair()
    t = TrainTransform(24, scale_range, aspect_jitter=0.15)
    rng = np.random.default_rng(1)
    for _ in range(20):
        img, target = t(image, label, rng)
        assert img.shape == (24, 24, 4) and img.dtype == np.uint8
        assert target.shape == (24, 24) and target.dtype == np.uint8
        assert set(np.unique(target).tolist()) <= {0, 1, 2, 7, 255}


def test_padding_label_255_image_mean():
    image, label = _pair(h=10, w=12, values=(3,))
    t = TrainTransform((30, 40), (1.0, 1.0), flip=False)
    img, target = t(image, label, np.random.default_rng(0))
    inside = target == 3
    assert inside.sum() == 10 * 12
    assert np.all(target[~inside] == 255)
    assert np.all(img[~inside] == PAD_PIXEL)
    # the unpadded part is the image itself; on the device the padding is the mean (~0)
    ys, xs = np.nonzero(inside)
    crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1, :3]
    assert np.array_equal(crop, image)
    rgb, edges = model_inputs(torch.from_numpy(img)[None], torch.device("cpu"))
    assert edges is None and rgb[0][:, torch.from_numpy(~inside)].abs().max() < 0.01


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
        img, target = t(rgb, label, rng)
        bright = img[..., 0] > 127
        assert np.array_equal(bright, target == 1)
        seen.add(bool(target[0, 0] == 1))
    assert seen == {True, False}  # both flipped and unflipped occur


def test_crop_window_matches_resize_then_crop():
    image, label = _pair(h=40, w=50, values=(0, 1, 2, 3))
    p = CropParams(scaled_h=63, scaled_w=71, top=11, left=17, flip=False)
    rgb, lab, placed = resize_crop(image, label, p, (32, 32))
    full_lab = np.asarray(Image.fromarray(label).resize((71, 63), Image.NEAREST))
    full_rgb = np.asarray(Image.fromarray(image).resize((71, 63), Image.BILINEAR)).astype(int)
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
    assert img.shape == (16, 16, 4) and img[..., 3].max() > 0
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


def test_device_normalisation_equals_the_cpu_one():
    """Training batches are normalised on the device, validation images on the CPU: the
    same numbers either way (and channels_last when asked)."""
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, size=(2, 9, 11, 4), dtype=np.uint8)
    rgb, edges = model_inputs(torch.from_numpy(batch), torch.device("cpu"), channels_last=True, edges=True)
    assert rgb.shape == (2, 3, 9, 11) and rgb.dtype == torch.float32
    assert rgb.is_contiguous(memory_format=torch.channels_last)
    for n in range(2):
        assert np.array_equal(rgb[n].numpy(), normalize(np.ascontiguousarray(batch[n, ..., :3])))
    np.testing.assert_allclose(edges[:, 0].numpy(), batch[..., 3] / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        model_inputs(torch.zeros(2, 3, 9, 11), torch.device("cpu"))


def test_fast_border_path_gives_the_replicated_border_pixels():
    """Where every bilinear tap lies inside the image the warp skips the border handling:
    the pixels must equal the edge-replicating warp's, flipped or not."""
    import cv2

    from segdist.data import transforms as T

    rng = np.random.default_rng(0)
    inside_cases = 0
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        crop = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
        p = T.sample_crop_params(rng, h, w, crop, (0.3, 2.5), aspect_jitter=0.2)
        if (p.scaled_h, p.scaled_w) == (h, w):
            continue
        window = T._window(p, crop)
        vy0, vy1, vx0, vx1 = window
        sy, sx = h / p.scaled_h, w / p.scaled_w
        inside_cases += T._taps_inside(vy0, vy1, sy, h) and T._taps_inside(vx0, vx1, sx, w)
        row0 = [-sx, 0.0, (vx1 - 0.5) * sx - 0.5] if p.flip else [sx, 0.0, (vx0 + 0.5) * sx - 0.5]
        m = np.array([row0, [0.0, sy, (vy0 + 0.5) * sy - 0.5]])
        reference = cv2.warpAffine(pixels, m, (vx1 - vx0, vy1 - vy0),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        assert np.array_equal(T._resize_window(pixels, p, window, p.flip), reference)
    assert inside_cases > 100  # the fast path was exercised


@pytest.mark.parametrize("mode", ["trimap", "edgemix"])
def test_label_modes_of_flipped_crops_are_the_flipped_modes(mode):
    """The flip is applied by the label index before edgemix, which must commute with
    mirroring for that to be right (trimap runs on the source label, before any flip; its 3x3
    band commutes too, the original's above-left band does not)."""
    label = np.random.default_rng(4).choice(np.array([0, 1, 2, 255], np.uint8), size=(13, 17))
    f = (lambda x: trimap(x)) if mode == "trimap" else (lambda x: edgemix(x, 3))
    assert np.array_equal(f(label[:, ::-1]), f(label)[..., ::-1])
