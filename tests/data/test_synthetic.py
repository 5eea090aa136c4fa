import hashlib

import numpy as np
from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.synthetic import make_synthetic_sample, write_synthetic_voc


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_synthetic_voc(tmp_path / name, seed=seed, n_train=4, n_val=2, min_size=32, max_size=40)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_synthetic_layout_and_labels(synth_root):
    lists = synth_root / "ImageSets" / "Segmentation"
    train = lists.joinpath("train.txt").read_text().split()
    val = lists.joinpath("val.txt").read_text().split()
    assert len(train) == 13 and len(val) == 7 and not set(train) & set(val)
    for key in train + val:
        image = Image.open(synth_root / "JPEGImages" / f"{key}.jpg")
        label = Image.open(synth_root / "SegmentationClass" / f"{key}.png")
        assert image.format == "JPEG" and label.mode == "P"
        assert image.size == label.size and all(32 <= s <= 48 for s in image.size)
        values = set(np.unique(np.asarray(label)).tolist())
        assert values <= set(range(len(SYNTHETIC_CLASSES))) | {255}
        assert 255 in values and 0 in values  # void border around the objects


def test_void_border_separates_classes():
    for index in range(5):
        _, label = make_synthetic_sample(0, index)
        # no two different (non-void) labels touch horizontally or vertically
        a, b = label[:, :-1], label[:, 1:]
        assert not np.any((a != b) & (a != 255) & (b != 255))
        a, b = label[:-1], label[1:]
        assert not np.any((a != b) & (a != 255) & (b != 255))
