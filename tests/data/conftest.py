"""Small folders in the exact source layouts, and shards built from them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES, voc_palette
from segdist.data.shard_writer import build_shards
from segdist.data.synthetic import write_synthetic_voc
from segdist.data.voc import iter_voc

torch.set_num_threads(1)


def save_palette_png(path: Path, label: np.ndarray) -> None:
    im = Image.frombytes(
        "P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, np.uint8).tobytes()
    )
    im.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny generated VOC-layout folder: 13 train + 7 val images of 32-48 px."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_voc(root, seed=3, n_train=13, n_val=7, min_size=32, max_size=48)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> dict[str, Path]:
    """train: 13 samples in shards of 5, 5, 3; val: 7 samples in shards of 3, 3, 1."""
    out = tmp_path_factory.mktemp("shards")
    dirs = {}
    for split in ("train", "val"):
        dirs[split] = out / split
        build_shards(
            iter_voc(synth_root, split, classes=SYNTHETIC_CLASSES),
            dirs[split],
            dataset="synthetic",
            classes=SYNTHETIC_CLASSES,
            max_samples_per_shard=5 if split == "train" else 3,
        )
    return dirs
