import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segdist.msf import MultiScaleInference, tile_starts, tile_stride
from tests.evaluation.conftest import ConvModel


def whole(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


@pytest.mark.parametrize("tile,length", [(321, 500), (321, 2048), (512, 1024), (24, 40), (9, 10), (30, 30)])
def test_tiles_overlap_by_a_third_and_cover_everything(tile, length):
    stride = tile_stride(tile)
    assert stride == math.ceil(2 * tile / 3)
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0 and starts[-1] + tile == length
    covered = torch.zeros(length)
    for s in starts:
        covered[s : s + tile] += 1
    assert (covered >= 1).all()
    for a, b in zip(starts, starts[1:], strict=False):
        overlap = a + tile - b
        assert overlap >= tile // 3 > 0  # stride ceil(2c/3); the original had 0 overlap (bug 5)
    assert len(starts) == (1 if length <= tile else math.ceil((length - tile) / stride) + 1)


def test_scale_one_without_flip_is_plain_whole_image_inference():
    model = ConvModel(kernel=3)
    x = torch.randn(2, 3, 17, 23)
    assert torch.equal(MultiScaleInference(model)(x[:1]), whole(model, x[:1]))  # bit for bit
    assert torch.allclose(MultiScaleInference(model)(x), whole(model, x), atol=1e-6)  # image by image
    # one tile exactly the image size: the same single forward pass
    assert torch.allclose(MultiScaleInference(model, tile_size=(17, 23))(x[:1]), whole(model, x[:1]), atol=1e-6)


def test_image_smaller_than_the_tile_is_padded_with_zero_the_mean():
    # two 3x3 layers: the first one's bias makes the padding differ from zero padding
    model = nn.Sequential(ConvModel(kernel=3, seed=1), ConvModel(kernel=3, seed=2))
    x = torch.randn(1, 3, 10, 13)
    got = MultiScaleInference(model, tile_size=16)(x)
    padded = F.pad(x, (0, 3, 0, 6))  # bottom/right, value 0 = the mean after normalisation
    assert torch.allclose(got, whole(model, padded)[..., :10, :13], atol=1e-6)
    # so it differs from whole-image inference only within the receptive field (2 px) of
    # the bottom/right padding
    diff = (got - whole(model, x)).abs().amax(1)[0]
    assert diff[:8, :11].max() < 1e-6 and diff.max() > 1e-4


def test_tiling_with_a_pointwise_model_equals_the_whole_image():
    model = ConvModel(kernel=1)
    x = torch.randn(1, 3, 50, 70)
    msf = MultiScaleInference(model, tile_size=16, tile_batch=3)
    assert torch.allclose(msf(x), whole(model, x), atol=1e-6)
    assert msf.tiles_run == len(tile_starts(50, 16, 11)) * len(tile_starts(70, 16, 11))


class PositionModel(nn.Module):
    """Logits that depend only on the position inside the tile: shows how tiles are averaged."""

    def forward(self, x):
        n, _, h, w = x.shape
        ramp = torch.linspace(-3, 3, w).expand(n, 1, h, w)
        return torch.cat([ramp, torch.zeros_like(ramp)], dim=1)


def test_probabilities_are_averaged_over_overlapping_tiles():
    tile, h, w = 12, 12, 30
    got = MultiScaleInference(PositionModel(), tile_size=tile)(torch.zeros(1, 3, h, w))
    tile_probs = torch.linspace(-3, 3, tile).sigmoid()  # softmax of [ramp, 0], class 0
    expected = torch.zeros(w)
    for col in range(w):
        covering = [s for s in tile_starts(w, tile, tile_stride(tile)) if s <= col < s + tile]
        expected[col] = sum(tile_probs[col - s] for s in covering) / len(covering)
    assert torch.allclose(got[0, 0, 0], expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(1, h, w), atol=1e-6)


def test_tile_batch_size_does_not_change_the_result():
    model = ConvModel(kernel=3)
    x = torch.randn(1, 3, 40, 57)
    one = MultiScaleInference(model, scales=(0.75, 1.0), flip=True, tile_size=20, tile_batch=1)(x)
    many = MultiScaleInference(model, scales=(0.75, 1.0), flip=True, tile_size=20, tile_batch=7)(x)
    assert torch.allclose(one, many, atol=1e-6)


@pytest.mark.parametrize("tile_size", [None, 16])
def test_flip_on_symmetric_input_with_a_symmetric_model_changes_nothing(tile_size):
    model = ConvModel(kernel=3, symmetric=True)
    half = torch.randn(1, 3, 24, 20)
    x = torch.cat([half, half.flip(-1)], dim=-1)  # left-right symmetric image
    plain = MultiScaleInference(model, tile_size=tile_size)(x)
    flipped = MultiScaleInference(model, flip=True, tile_size=tile_size)(x)
    assert torch.allclose(plain, flipped, atol=1e-5)


def test_flip_is_really_applied():
    model = ConvModel(kernel=3, seed=4)  # not symmetric
    x = torch.randn(1, 3, 16, 21)
    msf = MultiScaleInference(model, flip=True)
    got = msf(x)
    expected = 0.5 * (whole(model, x) + whole(model, x.flip(-1)).flip(-1))
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - whole(model, x)).abs().max() > 1e-3
    assert msf.tiles_run == 2


def test_scales_are_resized_back_and_averaged():
    model = ConvModel(kernel=3)
    x = torch.randn(1, 3, 20, 28)
    got = MultiScaleInference(model, scales=(0.5, 1.5))(x)
    parts = []
    for s in (0.5, 1.5):
        small = F.interpolate(x, size=(round(20 * s), round(28 * s)), mode="bilinear", align_corners=False)
        parts.append(F.interpolate(whole(model, small), size=(20, 28), mode="bilinear", align_corners=False))
    assert torch.allclose(got, (parts[0] + parts[1]) / 2, atol=1e-6)


def test_edge_channel_goes_to_models_that_need_edges():
    class EdgeModel(nn.Module):
        needs_edges = True

        def forward(self, images, edges):
            assert images.shape[1] == 3 and edges.shape[1] == 1
            return torch.cat([images[:, :1], edges], dim=1)

    x = torch.randn(1, 4, 20, 20)
    got = MultiScaleInference(EdgeModel(), scales=(1.0, 0.5), flip=True, tile_size=12)(x)
    assert got.shape == (1, 2, 20, 20)
    with pytest.raises(ValueError, match="edge"):
        MultiScaleInference(EdgeModel())(x[:, :3])


def test_bad_arguments():
    with pytest.raises(ValueError):
        MultiScaleInference(ConvModel(), scales=())
    with pytest.raises(ValueError):
        MultiScaleInference(ConvModel(), scales=(0.0,))
    with pytest.raises(ValueError):
        MultiScaleInference(ConvModel(), tile_batch=0)


def test_bf16_autocast_and_channels_last_run_and_stay_close():
    model = ConvModel(kernel=3)
    x = torch.randn(1, 3, 30, 41)
    ref = MultiScaleInference(model, scales=(0.5, 1.0), flip=True, tile_size=16)(x)
    low = MultiScaleInference(
        model, scales=(0.5, 1.0), flip=True, tile_size=16, amp_dtype=torch.bfloat16, channels_last=True
    )(x)
    assert low.dtype == torch.float32
    assert torch.allclose(low.sum(1), torch.ones(1, 30, 41), atol=1e-4)
    assert (low - ref).abs().max() < 0.05
