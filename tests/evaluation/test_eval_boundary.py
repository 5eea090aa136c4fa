import numpy as np
import pytest
import torch

from segdist.boundary import boundary_confusions, boundary_mask, boundary_scores, check_kernels
from segdist.errors import SegdistError
from segdist.metrics import confusion_matrix


def brute_force(label: np.ndarray, k: int) -> np.ndarray:
    """Window clipped to the image; boundary if any value differs from the centre."""
    h, w = label.shape
    r = k // 2
    out = np.zeros_like(label, dtype=bool)
    for y in range(h):
        for x in range(w):
            window = label[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            out[y, x] = bool((window != label[y, x]).any())
    return out


@pytest.mark.parametrize("k", [3, 5, 11])
def test_matches_the_definition_on_random_labels_with_ignore(k):
    rng = np.random.default_rng(k)
    label = rng.choice([0, 0, 0, 1, 2, 255], size=(23, 31)).astype(np.uint8)
    label[5:15, 8:20] = 1  # some flat areas so not everything is boundary
    label[:, 25:] = 2
    got = boundary_mask(torch.from_numpy(label).long(), k).numpy()
    assert np.array_equal(got, brute_force(label, k))


@pytest.mark.parametrize("k", [11, 15, 19])
def test_image_borders_make_no_fake_boundaries(k):
    flat = torch.full((30, 40), 3, dtype=torch.int64)
    assert not boundary_mask(flat, k).any()
    # one vertical edge at column 20: exactly the columns within k//2 of it are boundary
    label = flat.clone()
    label[:, 20:] = 4
    mask = boundary_mask(label, k)
    r = k // 2
    expected_cols = [c for c in range(40) if (c < 20 <= c + r) or (c >= 20 > c - r)]
    assert mask.all(dim=0).nonzero().flatten().tolist() == expected_cols
    assert (mask.any(dim=0) == mask.all(dim=0)).all()  # no row (e.g. top/bottom border) differs


def test_ignore_counts_as_a_different_value_but_is_not_scored():
    label = torch.zeros(12, 12, dtype=torch.int64)
    label[6, 6] = 255
    pred = torch.zeros_like(label)
    (b, i), = boundary_confusions(pred, label, 2, kernels=(3,)).values()
    assert int(b.sum()) == 8  # the 3x3 ring around the void pixel; the void pixel itself unscored
    assert int(i.sum()) == 144 - 9


def test_boundary_and_inner_add_up_to_the_whole_and_batches_work():
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 16, 20))
    target[:, :, :8] = 0
    pred = torch.randint(0, 3, (2, 16, 20))
    whole = confusion_matrix(pred, target, 3)
    for k, (b, i) in boundary_confusions(pred, target, 3, kernels=(11, 15, 19)).items():
        assert torch.equal(b + i, whole), k
        single = boundary_mask(target[1], k)
        assert torch.equal(boundary_mask(target, k)[1], single)
    summary = boundary_scores(boundary_confusions(pred, target, 3, kernels=(11,)))
    assert set(summary["11"]) == {"boundary", "inner"}
    assert {"miou", "pixel_acc", "mean_acc"} <= set(summary["11"]["inner"])


def test_kernels_must_be_odd():
    assert check_kernels([11, 15, 19]) == (11, 15, 19)
    for bad in ([10], [1], [11, 11]):
        with pytest.raises(SegdistError):
            check_kernels(bad)


def test_a_full_cityscapes_size_label_has_its_band_on_the_edge_only():
    label = torch.zeros(1024, 2048, dtype=torch.int64)
    label[:, 1000:] = 1
    mask = boundary_mask(label, 19)
    assert int(mask[0].sum()) == 18
