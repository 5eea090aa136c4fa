"""The optimiser, learning-rate schedule and gradient rules of a recipe (segdist.recipe.TrainRecipe).

    optimizer = make_optimizer(model, recipe.train)          # one param group per (group, role)
    scheduler = lr_schedule(optimizer, recipe.train, steps_per_epoch)
    ... loss.backward()
    apply_gradient_rules(optimizer, weight_decay_at(recipe.train, step))
    optimizer.step(); scheduler.step()

Gradient rules, as the original applied them (reference/recipes.md "OPT" and "SG"): the L2
term's gradient wd * W is added to the kernels of groups whose rule says `decay`, then each
param group's gradient is multiplied by its group's multiplier (tensorpack's ScaleGradient
acted on the gradient of the total cost, L2 included). Under SGD a gradient multiplier is a
learning-rate multiplier; under Adam it is not: it only changes how epsilon weighs
(update = lr m / (sqrt(v) + eps / c)).
"""

from __future__ import annotations

import math

import torch

from segdist.models.factory import parameter_groups
from segdist.recipe import TrainRecipe


class AdamTF1(torch.optim.Optimizer):
    """TF 1.x's tf.train.AdamOptimizer (ApplyAdam), which puts epsilon outside the bias correction:

        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        p = p - lr_t * m / (sqrt(v) + eps)

    (torch.optim.Adam divides by sqrt(v_hat) + eps instead, i.e. a smaller effective epsilon
    early on: with eps 2.5e-4 TF's is 32x larger at t = 1.) Source: the TF 1.x docs of
    tf.train.AdamOptimizer / tf.raw_ops.ApplyAdam. State per parameter: step, exp_avg, exp_avg_sq.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamTF1 settings lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            grads = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            # one t per parameter; all parameters of a group step together, so one lr_t each
            for steps, indices in _by_step(params, self.state).items():
                lr_t = group["lr"] * math.sqrt(1 - beta2**steps) / (1 - beta1**steps)
                torch._foreach_addcdiv_([params[i] for i in indices], [m[i] for i in indices],
                                        [denom[i] for i in indices], value=-lr_t)
        return loss


def _by_step(params, state) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault(state[p]["step"], []).append(i)
    return out


def make_optimizer(model: torch.nn.Module, train: TrainRecipe) -> torch.optim.Optimizer:
    """One optimizer param group per (named group, role) of segdist.models.parameter_groups,
    each with "name", "grad_mult" (the group rule's weight multiplier for kernels and scales,
    its bias multiplier for biases, 1 for norm parameters) and "decay" (L2 on kernels of
    groups whose rule decays). The optimizer's own weight_decay is 0: apply_gradient_rules adds
    the L2 term. sgd: torch SGD (momentum); adam: torch Adam; adam_tf1: AdamTF1."""
    groups = []
    for group, roles in parameter_groups(model).items():
        rule = getattr(train.multipliers, group)
        for role, params in roles.items():
            mult = rule.bias if role == "bias" else 1.0 if role == "norm" else rule.weight
            groups.append({"params": params, "name": f"{group}.{role}", "grad_mult": float(mult),
                           "decay": rule.decay and role == "kernel", "lr": train.lr})
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr, eps=train.adam_epsilon)
    return AdamTF1(groups, lr=train.lr, eps=train.adam_epsilon)


def weight_decay_at(train: TrainRecipe, step: int) -> float:
    """The L2 coefficient at global step `step` (0-based): weight_decay x
    rate^floor(step / every) (the original's exponential_decay(2e-4, step, 80000, 0.7,
    staircase=True)), or weight_decay when weight_decay_every is 0."""
    if not train.weight_decay_every:
        return train.weight_decay
    return train.weight_decay * train.weight_decay_rate ** (step // train.weight_decay_every)


@torch.no_grad()
def apply_gradient_rules(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """grad = grad_mult x (grad + weight_decay x W [decay groups]), per param group."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group.get("decay") and weight_decay:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        if group.get("grad_mult", 1.0) != 1.0:
            torch._foreach_mul_(grads, group["grad_mult"])


def lr_factor(train: TrainRecipe, step: int, steps_per_epoch: int) -> float:
    """The learning rate's factor at global step `step` (0-based): poly, (1 - step/total)^power
    over epochs x steps_per_epoch steps; steps, the factor of the last (epoch, factor) pair
    whose epoch has been completed (the original's ScheduledHyperParamSetter sets the value
    after epoch e), else 1."""
    if train.schedule == "poly":
        return max(0.0, 1.0 - step / (train.epochs * steps_per_epoch)) ** train.poly_power
    done = step // steps_per_epoch
    factor = 1.0
    for epoch, value in train.lr_steps:
        if done >= epoch:
            factor = value
    return factor


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainRecipe, steps_per_epoch: int):
    """A LambdaLR stepping once per optimizer step with lr_factor (every param group alike)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(train, step, steps_per_epoch))
