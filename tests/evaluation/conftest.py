"""Tiny shards, a tiny checkpoint and small models for the evaluation tests (one thread)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from segdist.config import DataConfig, TrialConfig
from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.shard_writer import build_shards
from segdist.data.synthetic import write_synthetic_voc
from segdist.data.voc import iter_voc
from segdist.models import build_model
from segdist.resolve import resolve_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """Validation shards of the synthetic set: 5 images of 32-44 px, shards of 2, 2, 1."""
    root = tmp_path_factory.mktemp("eval-synth")
    write_synthetic_voc(root / "voc", seed=5, n_train=1, n_val=5, min_size=32, max_size=44)
    out = root / "shards" / "val"
    build_shards(
        iter_voc(root / "voc", "val", classes=SYNTHETIC_CLASSES),
        out,
        dataset="synthetic",
        classes=SYNTHETIC_CLASSES,
        max_samples_per_shard=2,
    )
    return out


def tiny_trial(variant: str = "naked", crop: int = 24, protocol: str = "deeplab", **values) -> TrialConfig:
    """A tiny recipe (ResNet-18 width 4) of `variant`; `values`: more `section__field` values."""
    recipe = resolve_recipe({
        "model.variant": variant, "model.depth": 18, "model.width": 4, "model.pretrained": None,
        "train.epochs": 1, "train.batch_size": 2, "train.crop_size": (crop, crop),
        **{key.replace("__", "."): value for key, value in values.items()},
    }, protocol, "test")
    return TrialConfig(recipe=recipe, data=DataConfig())


def save_checkpoint(path: Path, trial: TrialConfig, classes, model: nn.Module | None = None) -> Path:
    """A checkpoint dict with the keys train.fit writes."""
    if model is None:
        torch.manual_seed(0)
        model = build_model(trial.recipe.model, len(classes))
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "scheduler": {},
            "epoch": 0,
            "classes": list(classes),
            "trial": dataclasses.asdict(trial),
            "metrics": {},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", tiny_trial(), SYNTHETIC_CLASSES)


class ConvModel(nn.Module):
    """One conv layer as a segmentation model: logits at input size."""

    def __init__(self, in_ch: int = 3, classes: int = 3, kernel: int = 1, symmetric: bool = False, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(in_ch, classes, kernel, padding=kernel // 2)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen)
            if symmetric:
                w = 0.5 * (w + w.flip(-1))  # left-right symmetric kernels: flip-equivariant
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(torch.randn(classes, generator=gen))

    def forward(self, x):
        return self.conv(x)
