"""segdist.models.tf1: TensorFlow 1 numerics ("SAME" padding, legacy resize_bilinear, SAME
conv2d_transpose) against explicit references, and a tf1 ResNet's feature sizes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segdist.models import tf1
from segdist.models.resnet import ResNet
from segdist.models.tf1 import Deconv, SameConv2d, SameMaxPool2d, resize_bilinear, same_padding


def tf_same_padding(size, kernel, stride, dilation=1):
    """TF's formula, written independently: pad_total = max((ceil(in/s) - 1) s + k_eff - in, 0)."""
    k_eff = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


# ------------------------------------------------------------------ "SAME" padding


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (512, 7, 2, (2, 3)),  # conv0 on a 512 crop: TF pads one more pixel at the bottom/right
        (321, 7, 2, (3, 3)),  # conv0 on a 321 crop: symmetric
        (256, 3, 2, (0, 1)),  # pool0 on 256: nothing before, one after
        (161, 3, 2, (1, 1)),
        (64, 3, 2, (0, 1)),
        (65, 3, 1, (1, 1)),
        (7, 1, 2, (0, 0)),  # a strided 1x1 conv never pads
        (8, 1, 2, (0, 0)),
    ],
)
def test_same_padding_examples(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_same_padding_formula_everywhere():
    for size in range(1, 70):
        for kernel in (1, 2, 3, 5, 7):
            for stride in (1, 2, 3):
                for dilation in (1, 2, 4):
                    assert same_padding(size, kernel, stride, dilation) == tf_same_padding(
                        size, kernel, stride, dilation), (size, kernel, stride, dilation)


@pytest.mark.parametrize("size", [(512, 512), (321, 321), (33, 48), (64, 17)])
@pytest.mark.parametrize("kernel, stride, dilation", [(7, 2, 1), (3, 2, 1), (3, 2, 2), (3, 1, 2), (1, 2, 1)])
def test_same_conv_equals_explicit_pad_then_conv(size, kernel, stride, dilation):
    conv = SameConv2d(3, 4, kernel, stride=stride, padding=kernel // 2, dilation=dilation, bias=True)
    x = torch.randn(1, 3, *size)
    top, bottom = tf_same_padding(size[0], kernel, stride, dilation)
    left, right = tf_same_padding(size[1], kernel, stride, dilation)
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride, 0, dilation)
    out = conv(x)
    assert out.shape[-2:] == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert torch.allclose(out, expected, atol=1e-5)
    # a state dict of nn.Conv2d loads as is
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_same_conv_differs_from_pytorch_on_even_sizes():
    """The reason the class exists: PyTorch's symmetric padding shifts the strided grid by one."""
    conv = SameConv2d(3, 4, 7, stride=2, padding=3)
    plain = nn.Conv2d(3, 4, 7, stride=2, padding=3)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert conv(x).shape == plain(x).shape
    assert not torch.allclose(conv(x), plain(x))
    x = torch.randn(1, 3, 65, 65)  # odd: TF pads (3, 3) too, the same result
    assert torch.allclose(conv(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("size", [(256, 256), (161, 161), (32, 17)])
def test_same_max_pool_equals_explicit_reference(size):
    pool = SameMaxPool2d(3, stride=2)
    x = torch.randn(2, 3, *size) - 5.0  # negative: a zero-padded pool would be wrong at the border
    top, bottom = tf_same_padding(size[0], 3, 2)
    left, right = tf_same_padding(size[1], 3, 2)
    expected = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, 2)
    out = pool(x)
    assert out.shape[-2:] == (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    assert torch.equal(out, expected)
    assert (out < -1).any()  # padded positions never won


def test_conv2d_helper_uses_same_only_for_strided_tf1():
    assert type(tf1.conv2d("tf1", 3, 4, 3, stride=2)) is SameConv2d
    assert type(tf1.conv2d("tf1", 3, 4, 3, stride=1, dilation=2)) is nn.Conv2d
    assert type(tf1.conv2d("pytorch", 3, 4, 3, stride=2)) is nn.Conv2d
    assert type(tf1.max_pool("tf1")) is SameMaxPool2d
    assert type(tf1.max_pool("pytorch")) is nn.MaxPool2d


@pytest.mark.parametrize("depth", [18, 50])
def test_tf1_resnet_feature_sizes_match_tensorflow(depth):
    """TF's "SAME" output size is ceil(in / stride) at every strided layer: 512 -> 256 (conv0),
    128 (pool0), 128, 64, 32, 16 (output stride 32)."""
    net = ResNet(depth, width=4, output_stride=32, framework="tf1", stride_on=("1x1", "1x1", "3x3"))
    with torch.no_grad():
        stem_conv = net.conv1(torch.zeros(1, 3, 512, 512))
        feats = net(torch.zeros(1, 3, 512, 512))
        odd = net(torch.zeros(1, 3, 321, 321))
    assert stem_conv.shape[-1] == 256
    assert [f.shape[-1] for f in feats] == [128, 64, 32, 16]
    assert [f.shape[-1] for f in odd] == [81, 41, 21, 11]


def test_tf1_resnet_stem_pads_like_tensorflow():
    """conv0 and pool0 of a tf1 ResNet on 512 pixels equal explicit TF padding (2, 3) then (0, 1)."""
    net = ResNet(18, width=4, output_stride=32, framework="tf1").eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        y = F.conv2d(F.pad(x, (2, 3, 2, 3)), net.conv1.weight, None, 2)
        assert y.shape[-1] == 256
        y = F.max_pool2d(F.pad(net.relu(net.bn1(y)), (0, 1, 0, 1), value=-math.inf), 3, 2)
        assert torch.allclose(net.stem(x), y, atol=1e-5)


# ------------------------------------------------------------------ resize_bilinear


def tf1_resize_bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1.x tf.image.resize_bilinear, align_corners=False (legacy, no half-pixel centres):
    src = dst * in / out, y0 = floor(src), y1 = min(y0 + 1, in - 1), then TF's order of
    interpolation (top and bottom rows along x, then along y)."""
    in_h, in_w = x.shape[-2:]

    def taps(in_size, out_size):
        src = np.arange(out_size) * (in_size / out_size)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, in_size - 1), src - low

    y0, y1, ly = taps(in_h, out_h)
    x0, x1, lx = taps(in_w, out_w)
    y0, y1, ly = y0[:, None], y1[:, None], ly[:, None]
    top = x[..., y0, x0] * (1 - lx) + x[..., y0, x1] * lx
    bottom = x[..., y1, x0] * (1 - lx) + x[..., y1, x1] * lx
    return top * (1 - ly) + bottom * ly


@pytest.mark.parametrize("src, dst", [((21, 21), (321, 321)), ((7, 7), (16, 16)), ((16, 16), (7, 7)),
                                      ((5, 9), (13, 4)), ((16, 16), (512, 512)), ((8, 6), (16, 12))])
def test_resize_bilinear_tf1_equals_tf_legacy_reference(src, dst):
    x = torch.randn(2, 3, *src, dtype=torch.float64)
    expected = tf1_resize_bilinear_reference(x.numpy(), *dst)
    out = resize_bilinear(x.float(), dst, "tf1")
    assert out.shape == (2, 3, *dst)
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_resize_bilinear_tf1_is_not_pytorch_mapping():
    x = torch.randn(1, 2, 7, 7)
    tf = resize_bilinear(x, (16, 16), "tf1")
    pt = resize_bilinear(x, (16, 16), "pytorch")
    assert not torch.allclose(tf, pt, atol=1e-3)
    # TF's legacy mapping samples the source grid at 0, in/out, ...: row/col 0 is the input's
    assert torch.allclose(tf[..., 0, 0], x[..., 0, 0])
    # the upper neighbour is clamped: the last output rows repeat the last input row
    assert torch.allclose(tf[..., -1, -1], x[..., -1, -1])


@pytest.mark.parametrize("src, dst", [((21, 21), (321, 321)), ((16, 16), (7, 7)), ((5, 9), (13, 4))])
def test_resize_bilinear_pytorch_equals_interpolate(src, dst):
    x = torch.randn(2, 3, *src)
    expected = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    assert torch.equal(resize_bilinear(x, dst, "pytorch"), expected)


@pytest.mark.parametrize("framework", ["tf1", "pytorch"])
def test_resize_bilinear_gradients_and_identity(framework):
    x = torch.randn(1, 2, 7, 5, requires_grad=True)
    out = resize_bilinear(x, (16, 11), framework)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if framework == "tf1":
        # linear in x: the gradient is the adjoint, <resize(x), w> == <x, grad>
        assert torch.allclose((out * weights).sum(), (x * x.grad).sum(), atol=1e-4)
    assert resize_bilinear(x, (7, 5), framework) is x  # same size: untouched


def test_resize_bilinear_tf1_keeps_dtype():
    x = torch.randn(1, 2, 7, 7, dtype=torch.bfloat16)
    assert resize_bilinear(x, (16, 16), "tf1").dtype == torch.bfloat16


# ------------------------------------------------------------------ Deconv


@pytest.mark.parametrize("h, w", [(4, 4), (5, 7), (16, 16)])
def test_tf1_deconv_is_full_transpose_cropped_to_first_rows(h, w):
    torch.manual_seed(1)
    deconv = Deconv(3, "tf1")
    x = torch.randn(2, 3, h, w)
    full = F.conv_transpose2d(x, deconv.conv.weight, deconv.conv.bias, stride=2, padding=0)
    assert full.shape[-2:] == (2 * h + 1, 2 * w + 1)
    out = deconv(x, (2 * h, 2 * w))
    assert out.shape == (2, 3, 2 * h, 2 * w)
    assert torch.allclose(out, full[..., : 2 * h, : 2 * w], atol=1e-6)


@pytest.mark.parametrize("h, w, target", [(4, 4, (8, 8)), (8, 5, (16, 10)), (16, 16, (32, 32)),
                                          (33, 33, (65, 65)), (17, 9, (33, 17)), (3, 5, (5, 10))])
def test_tf1_deconv_is_the_adjoint_of_a_same_conv(h, w, target):
    """TF defines conv2d_transpose as the gradient of conv2d ("SAME", stride 2) with respect to
    its input: the tf1 Deconv (bias aside) is exactly that adjoint, for even targets (the first
    2H rows of the full result) and odd ones (cut one row later)."""
    deconv = Deconv(2, "tf1")
    with torch.no_grad():
        deconv.conv.bias.zero_()
    conv = SameConv2d(2, 2, 3, stride=2, bias=False)
    conv.weight = deconv.conv.weight  # conv_transpose with W is the adjoint of conv2d with W
    x = torch.randn(1, 2, h, w)
    y = torch.zeros(1, 2, *target, requires_grad=True)
    assert conv(y).shape[-2:] == (h, w)
    (adjoint,) = torch.autograd.grad(conv(y), y, x)
    assert torch.allclose(deconv(x, target), adjoint, atol=1e-5)


def test_tf1_deconv_input_pixel_feeds_rows_2i_to_2i_plus_2():
    deconv = Deconv(1, "tf1")
    with torch.no_grad():
        deconv.conv.weight.fill_(1.0)
        deconv.conv.bias.zero_()
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 1.0
    out = deconv(x, (8, 8))[0, 0]
    rows, cols = torch.nonzero(out, as_tuple=True)
    assert sorted(set(rows.tolist())) == [2, 3, 4] and sorted(set(cols.tolist())) == [4, 5, 6]


@pytest.mark.parametrize("framework", ["tf1", "pytorch"])
@pytest.mark.parametrize("h, w, target", [(33, 33, (65, 65)), (17, 9, (33, 18)), (4, 4, (8, 8)), (3, 5, (5, 9))])
def test_deconv_exact_output_size(framework, h, w, target):
    deconv = Deconv(2, framework)
    x = torch.randn(1, 2, h, w, requires_grad=True)
    out = deconv(x, target)
    assert out.shape[-2:] == target
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pytorch_deconv_is_conv_transpose_padding_one():
    deconv = Deconv(2, "pytorch")
    x = torch.randn(1, 2, 5, 5)
    expected = F.conv_transpose2d(x, deconv.conv.weight, deconv.conv.bias, stride=2, padding=1, output_padding=1)
    assert torch.allclose(deconv(x, (10, 10)), expected, atol=1e-6)
    # tf1 and pytorch are one pixel apart on the same weights
    tf = Deconv(2, "tf1")
    tf.load_state_dict(deconv.state_dict())
    assert not torch.allclose(tf(x, (10, 10)), deconv(x, (10, 10)))
    assert torch.allclose(tf(x, (10, 10))[..., 1:, 1:], deconv(x, (10, 10))[..., :-1, :-1], atol=1e-6)
