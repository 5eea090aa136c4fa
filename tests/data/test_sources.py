import numpy as np
import pytest
from PIL import Image

from segdist.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_LABELS, VOC_CLASSES, cityscapes_train_id_lut
from segdist.data.sbd import SbdSource, TrainAugSource
from segdist.data.sources import make_source
from segdist.errors import SegdistError

from .conftest import save_gray_png, save_palette_png, save_sbd_mat

# The official table, copied from cityscapesscripts 2.3.0 helpers/labels.py: (name, id, trainId).
OFFICIAL = """unlabeled 0 255|ego vehicle 1 255|rectification border 2 255|out of roi 3 255|static 4 255|
dynamic 5 255|ground 6 255|road 7 0|sidewalk 8 1|parking 9 255|rail track 10 255|building 11 2|wall 12 3|
fence 13 4|guard rail 14 255|bridge 15 255|tunnel 16 255|pole 17 5|polegroup 18 255|traffic light 19 6|
traffic sign 20 7|vegetation 21 8|terrain 22 9|sky 23 10|person 24 11|rider 25 12|car 26 13|truck 27 14|
bus 28 15|caravan 29 255|trailer 30 255|train 31 16|motorcycle 32 17|bicycle 33 18|license plate -1 -1"""


def _official_table():
    rows = []
    for item in OFFICIAL.replace("\n", "").split("|"):
        *name, label_id, train_id = item.split()
        rows.append((" ".join(name), int(label_id), int(train_id)))
    return rows


def test_cityscapes_table_matches_official():
    assert list(CITYSCAPES_LABELS) == _official_table()
    lut = cityscapes_train_id_lut()
    names = {train_id: name for name, _, train_id in CITYSCAPES_LABELS if 0 <= train_id < 255}
    assert tuple(names[i] for i in range(19)) == CITYSCAPES_CLASSES
    for _name, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0:
            assert lut[label_id] == (train_id if 0 <= train_id < 255 else 255)
    assert all(v == 255 for v in lut[34:])


def test_cityscapes_table_matches_installed_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    assert [(lab.name, lab.id, lab.trainId) for lab in labels.labels] == list(CITYSCAPES_LABELS)


def test_cityscapes_source(cityscapes_root):
    source = make_source("cityscapes", str(cityscapes_root), "train")
    assert source.keys() == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
    sample = source.load("aachen_000000_000019")
    assert sample.image_ext == "png"
    image_path, label_path = source.paths(sample.key)
    assert sample.image_bytes == image_path.read_bytes()
    ids = np.asarray(Image.open(label_path))
    expected = np.array(cityscapes_train_id_lut(), np.uint8)[ids]
    assert np.array_equal(sample.label, expected)
    assert sample.label.ravel()[7] == 0 and sample.label.ravel()[33] == 18 and sample.label.ravel()[0] == 255
    assert set(np.unique(sample.label).tolist()) == set(range(19)) | {255}


def test_cityscapes_bad_inputs(cityscapes_root, tmp_path):
    with pytest.raises(SegdistError, match="leftImg8bit"):
        make_source("cityscapes", str(tmp_path), "train").keys()
    source = make_source("cityscapes", str(cityscapes_root), "train")
    _, label_path = source.paths("bochum_000000_000313")
    save_gray_png(label_path, np.full((8, 16), 40, np.uint8))
    with pytest.raises(
        SegdistError, match=r"bochum_000000_000313_gtFine_labelIds\.png.*'bochum_000000_000313'.*\[40\]"
    ):
        source.load("bochum_000000_000313")
    save_gray_png(label_path, np.zeros((9, 16), np.uint8))
    with pytest.raises(SegdistError, match=r"labelIds\.png: label is 16x9.*'bochum_000000_000313'"):
        source.load("bochum_000000_000313")
    label_path.unlink()
    with pytest.raises(
        SegdistError, match=r"labelIds\.png: label of sample 'bochum_000000_000313' not found"
    ):
        source.load("bochum_000000_000313")


def test_sbd_own_split(voc_sbd):
    source = make_source("sbd", str(voc_sbd["sbd"]), "val")  # benchmark_RELEASE: dataset/ found
    assert isinstance(source, SbdSource)
    assert source.keys() == ["2008_000013", "2007_000004"]
    sample = source.load("2008_000013")
    assert sample.label.dtype == np.uint8 and np.all(sample.label == 2)


def test_train_aug_from_sbd(voc_sbd):
    source = make_source("sbd", str(voc_sbd["voc"]), "train_aug", sbd_root=str(voc_sbd["sbd"]))
    assert isinstance(source, TrainAugSource)
    assert source.keys() == voc_sbd["train_aug"]
    for key in source.keys():
        sample = source.load(key)
        if key in voc_sbd["voc_keys"]:  # VOC's own fine label, with its border
            assert set(np.unique(sample.label).tolist()) == {1, 255}
        else:
            assert np.all(sample.label == 2)
    sample = source.load(voc_sbd["sbd_only"])  # image only in SBD img/
    assert "benchmark_RELEASE" in sample.source


def test_train_aug_from_segmentation_class_aug(voc_sbd):
    voc = voc_sbd["voc"]
    for key in voc_sbd["train_aug"] + ["2007_000003", "2007_000004"]:
        save_palette_png(voc / "SegmentationClassAug" / f"{key}.png", np.full((12, 16), 3, np.uint8))
    import shutil

    shutil.copy(voc_sbd["sbd"] / "dataset" / "img" / f"{voc_sbd['sbd_only']}.jpg", voc / "JPEGImages")
    source = make_source("voc", str(voc), "train_aug")
    assert source.keys() == voc_sbd["train_aug"]
    assert all(np.all(source.load(k).label == 3) for k in source.keys())


def test_train_aug_bad_inputs(voc_sbd, tmp_path):
    with pytest.raises(SegdistError, match="SegmentationClassAug: not found"):
        make_source("voc", str(voc_sbd["voc"]), "train_aug").keys()
    with pytest.raises(SegdistError, match="SBD folder not found"):
        make_source("sbd", str(voc_sbd["voc"]), "train_aug", sbd_root=str(tmp_path / "nope")).keys()
    mat = voc_sbd["sbd"] / "dataset" / "cls" / "2008_000012.mat"
    save_sbd_mat(mat, np.full((12, 16), 21, np.uint8))
    source = TrainAugSource(str(voc_sbd["voc"]), str(voc_sbd["sbd"]), VOC_CLASSES)
    with pytest.raises(SegdistError, match=r"2008_000012\.mat \(sample '2008_000012'\).*\[21\]"):
        source.load("2008_000012")
    mat.write_bytes(b"garbage")
    with pytest.raises(SegdistError, match=r"2008_000012\.mat \(sample '2008_000012'\): cannot read"):
        source.load("2008_000012")
    with pytest.raises(SegdistError, match="--sbd-root is only used"):
        make_source("sbd", str(voc_sbd["voc"]), "train", sbd_root=str(voc_sbd["sbd"]))
