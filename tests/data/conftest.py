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


def _rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_sbd_mat(path: Path, label: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    gt = {
        "Segmentation": label.astype(np.uint8),
        "Boundaries": np.zeros(1),
        "CategoriesPresent": np.array([1]),
    }
    savemat(str(path), {"GTcls": gt})


@pytest.fixture
def voc_sbd(tmp_path) -> dict:
    """VOC2012 + SBD (benchmark_RELEASE/dataset) in their real layouts, a few 12x16 images.

    VOC train: A, B; VOC val: C, D. SBD train: S1, S2, B, C; SBD val: S3, D.
    train_aug = {S1, S2, S3, A, B}. S1's image exists only in SBD's img/.
    VOC labels use value 1 (+255 border), SBD labels value 2, so the source is visible.
    """
    rng = np.random.default_rng(0)
    A, B, C, D = "2007_000001", "2007_000002", "2007_000003", "2007_000004"
    S1, S2, S3 = "2008_000011", "2008_000012", "2008_000013"
    voc = tmp_path / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (sbd / "img").mkdir(parents=True)
    for key in (A, B, C, D, S2, S3):
        (voc / "JPEGImages" / f"{key}.jpg").write_bytes(jpeg_bytes(_rgb(rng, 12, 16)))
    for key in (S1, S2, S3, B, C, D):
        src = voc / "JPEGImages" / f"{key}.jpg"
        data = src.read_bytes() if src.exists() else jpeg_bytes(_rgb(rng, 12, 16))
        (sbd / "img" / f"{key}.jpg").write_bytes(data)
    voc_label = np.ones((12, 16), np.uint8)
    voc_label[0] = 255
    for key in (A, B, C, D):
        save_palette_png(voc / "SegmentationClass" / f"{key}.png", voc_label)
    for key in (S1, S2, S3, B, C, D):
        save_sbd_mat(sbd / "cls" / f"{key}.mat", np.full((12, 16), 2, np.uint8))
    (voc / "ImageSets/Segmentation/train.txt").write_text(f"{A}\n{B}\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text(f"{C}\n{D}\n")
    (sbd / "train.txt").write_text(f"{S1}\n{S2}\n{B}\n{C}\n")
    (sbd / "val.txt").write_text(f"{S3}\n{D}\n")
    return {
        "voc": voc,
        "sbd": sbd.parent,
        "train_aug": sorted([S1, S2, S3, A, B]),
        "voc_keys": (A, B),
        "sbd_only": S1,
    }


def save_gray_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)  # 2-D uint8 -> mode "L"


@pytest.fixture
def cityscapes_root(tmp_path) -> Path:
    """leftImg8bit/ + gtFine/ for train (2 cities, 3 images) and val (1 image), 8x16 px.

    Every labelId 0..33 appears in aachen_000000_000019 (first 34 pixels, row-major)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    keys = {
        "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
        "val": ["frankfurt_000000_000294"],
    }
    for split, names in keys.items():
        for key in names:
            city = key.split("_")[0]
            image = root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(rng, 8, 16)).save(image)
            ids = rng.integers(0, 34, size=(8, 16)).astype(np.uint8)
            if key == "aachen_000000_000019":
                ids.ravel()[:34] = np.arange(34)
            save_gray_png(root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png", ids)
    return root
