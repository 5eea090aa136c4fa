import shutil

import numpy as np
import pytest
from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.voc import iter_voc
from segdist.errors import SegdistError

from .conftest import save_palette_png


@pytest.fixture
def voc_copy(synth_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synth_root, root)
    return root


def test_iter_voc_reads_original_bytes_and_indices(synth_root):
    samples = list(iter_voc(synth_root, "val", classes=SYNTHETIC_CLASSES))
    keys = (synth_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert [s.key for s in samples] == keys
    for s in samples:
        assert s.image_bytes == (synth_root / "JPEGImages" / f"{s.key}.jpg").read_bytes()
        expected = np.asarray(Image.open(synth_root / "SegmentationClass" / f"{s.key}.png"))
        assert s.label.dtype == np.uint8 and np.array_equal(s.label, expected)


def test_missing_root_and_list(tmp_path, voc_copy):
    with pytest.raises(SegdistError, match="nope"):
        list(iter_voc(tmp_path / "nope", "train", classes=SYNTHETIC_CLASSES))
    with pytest.raises(SegdistError, match=r"test\.txt"):
        list(iter_voc(voc_copy, "test", classes=SYNTHETIC_CLASSES))


def test_missing_label_names_file_and_key(voc_copy):
    (voc_copy / "SegmentationClass" / "000014.png").unlink()
    with pytest.raises(SegdistError, match=r"000014\.png.*'000014'"):
        list(iter_voc(voc_copy, "val", classes=SYNTHETIC_CLASSES))


def test_label_out_of_range_names_file_and_key(voc_copy):
    path = voc_copy / "SegmentationClass" / "000013.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = 9
    save_palette_png(path, label)
    with pytest.raises(SegdistError, match=r"000013\.png.*'000013'.*\[9\]"):
        list(iter_voc(voc_copy, "val", classes=SYNTHETIC_CLASSES))


def test_size_mismatch_names_file_and_key(voc_copy):
    path = voc_copy / "SegmentationClass" / "000015.png"
    label = np.asarray(Image.open(path))
    save_palette_png(path, label[:-1])
    with pytest.raises(SegdistError, match=r"000015\.png.*'000015'"):
        list(iter_voc(voc_copy, "val", classes=SYNTHETIC_CLASSES))
