"""segdist.optim against the original's optimiser (reference/recipes.md "OPT", "SG"): TF1's
Adam, gradient multipliers applied after the L2 term, the decaying weight decay, the step
schedule."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from segdist.optim import AdamTF1, apply_gradient_rules, lr_factor, make_optimizer, weight_decay_at
from segdist.resolve import resolve_recipe


def tf1_adam_reference(grads, p0, lr, eps, beta1=0.9, beta2=0.999):
    """tf.train.AdamOptimizer's ApplyAdam, written out (TF 1.x docs)."""
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        lr_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr_t * m / (np.sqrt(v) + eps)
    return p


def test_adam_tf1_is_tf1s_update_not_torchs():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3)).astype(np.float64)
    grads = [rng.normal(size=(5, 3)) * 1e-3 for _ in range(20)]  # small gradients: epsilon matters
    param = nn.Parameter(torch.tensor(p0))
    opt = AdamTF1([param], lr=2.5e-4, eps=2.5e-4)
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step()
    expected = tf1_adam_reference(grads, p0, 2.5e-4, 2.5e-4)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-10, atol=1e-14)
    torch_param = nn.Parameter(torch.tensor(p0))
    torch_opt = torch.optim.Adam([torch_param], lr=2.5e-4, eps=2.5e-4)
    for g in grads:
        torch_param.grad = torch.tensor(g)
        torch_opt.step()
    assert not np.allclose(torch_param.detach().numpy(), expected, rtol=1e-3, atol=0)  # epsilon placement


def test_a_gradient_multiplier_under_adam_only_reweighs_epsilon():
    """ScaleGradient(c) under Adam: update = lr m / (sqrt(v) + eps / c), not c times larger."""
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=7)
    grads = [rng.normal(size=7) * 1e-3 for _ in range(15)]
    scaled = tf1_adam_reference([10 * g for g in grads], p0, 2.5e-4, 2.5e-4)
    smaller_eps = tf1_adam_reference(grads, p0, 2.5e-4, 2.5e-5)
    np.testing.assert_allclose(scaled, smaller_eps, rtol=1e-9)
    lr_times_10 = tf1_adam_reference(grads, p0, 2.5e-3, 2.5e-4)
    assert not np.allclose(scaled, lr_times_10, rtol=1e-3)


def tiny_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Conv2d(2, 3, 3)
    model.classifier = nn.Conv2d(3, 4, 1, bias=True)
    return model


def test_l2_is_added_before_the_multiplier_and_only_on_decayed_kernels():
    train = resolve_recipe({"model.variant": "naked"}, "original", "t").train  # classifier W x10 b x20, decay
    model = tiny_model()
    opt = make_optimizer(model, train)
    names = {g["name"]: (g["grad_mult"], g["decay"]) for g in opt.param_groups}
    assert names == {"backbone.kernel": (1.0, True), "backbone.bias": (1.0, False),
                     "classifier.kernel": (10.0, True), "classifier.bias": (20.0, False)}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    apply_gradient_rules(opt, weight_decay=0.5)
    w, b = model.classifier.weight, model.classifier.bias
    assert torch.allclose(w.grad, 10 * (grads["classifier.weight"] + 0.5 * w.detach()))
    assert torch.allclose(b.grad, 20 * grads["classifier.bias"])
    assert torch.allclose(model.backbone.weight.grad, grads["backbone.weight"] + 0.5 * model.backbone.weight.detach())
    assert torch.allclose(model.backbone.bias.grad, grads["backbone.bias"])


def test_under_sgd_a_gradient_multiplier_is_a_learning_rate_multiplier():
    train = resolve_recipe({"model.variant": "naked", "train.weight_decay": 1e-3}, "deeplab", "t").train
    model, plain = tiny_model(), tiny_model()
    opt = make_optimizer(model, train)
    reference = torch.optim.SGD([
        {"params": [plain.backbone.weight], "lr": train.lr, "weight_decay": 1e-3},
        {"params": [plain.backbone.bias], "lr": train.lr},
        {"params": [plain.classifier.weight], "lr": 10 * train.lr, "weight_decay": 1e-3},
        {"params": [plain.classifier.bias], "lr": 20 * train.lr},
    ], lr=train.lr, momentum=0.9)
    x = torch.randn(2, 2, 6, 6)
    for _ in range(3):
        for net, o in ((model, opt), (plain, reference)):
            o.zero_grad()
            net.classifier(net.backbone(x)).square().mean().backward()
        apply_gradient_rules(opt, weight_decay_at(train, 0))
        opt.step()
        reference.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_originals_weight_decay_and_learning_rate_steps():
    train = resolve_recipe({"model.variant": "naked"}, "original", "t").train
    assert weight_decay_at(train, 0) == 2e-4 and weight_decay_at(train, 79999) == 2e-4
    assert weight_decay_at(train, 80000) == pytest.approx(1.4e-4) and weight_decay_at(train, 160000) == pytest.approx(9.8e-5)
    steps = 100  # per epoch: ScheduledHyperParamSetter sets the value after epoch e completes
    lrs = [train.lr * lr_factor(train, epoch * steps, steps) for epoch in range(10)]
    assert lrs == pytest.approx([2.5e-4, 2.5e-4, 1e-4, 1e-4, 1e-5, 1e-5, 8e-6, 8e-6, 8e-6, 8e-6])
    assert lr_factor(train, 2 * steps - 1, steps) == 1.0  # the last step of epoch 2 still at 2.5e-4
    poly = resolve_recipe({"model.variant": "naked", "train.epochs": 2}, "deeplab", "t").train
    assert lr_factor(poly, 0, 10) == 1.0 and lr_factor(poly, 10, 10) == pytest.approx(0.5**0.9)


def test_adam_tf1_resumes_from_its_state_dict():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = AdamTF1(a.parameters(), lr=1e-3, eps=1e-4)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).sum().backward()
        opt_a.step()
    opt_b = AdamTF1(b.parameters(), lr=1e-3, eps=1e-4)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint: tensors of its own
    for opt, net in ((opt_a, a), (opt_b, b)):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
