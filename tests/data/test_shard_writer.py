import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segdist.data.cityscapes import CityscapesSource
from segdist.data.classes import CITYSCAPES_CLASSES, SYNTHETIC_CLASSES, VOC_CLASSES
from segdist.data.prepare import prepare_synthetic
from segdist.data.sample import Sample
from segdist.data.sbd import TrainAugSource
from segdist.data.shard_writer import build_from_source, build_shards
from segdist.data.stream import decode_sample, iter_shard
from segdist.data.synthetic import write_synthetic_voc
from segdist.data.voc import VocSource, iter_voc
from segdist.errors import SegdistError

from .conftest import jpeg_bytes, save_gray_png, save_palette_png, save_sbd_mat


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_manifest_and_dataset_json(synth_root, synth_shards):
    out = synth_shards["train"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["dataset"] == "synthetic" and meta["classes"] == list(SYNTHETIC_CLASSES)
    assert meta["ignore_index"] == 255 and meta["num_samples"] == 13
    assert meta["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert meta["shard_sizes"] == [5, 5, 3]
    assert len(meta["class_frequency"]) == 6 and abs(sum(meta["class_frequency"]) - 1) < 1e-9
    assert len(meta["image_mean"]) == 3 and len(meta["image_std"]) == 3
    assert meta["stats"]["skipped"] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == meta["shards"]
    assert not list(out.glob(".*tmp*"))

    table = pq.read_table(out / "manifest.parquet")
    for column in ("key", "shard", "width", "height", "class_pixels", "ignore_pixels", "downscale"):
        assert column in table.column_names
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(13)]
    assert rows[7]["shard"] == "train-000001.tar"
    for row in rows:
        label = np.asarray(Image.open(synth_root / "SegmentationClass" / f"{row['key']}.png"))
        assert (row["height"], row["width"]) == label.shape
        assert row["class_pixels"] == np.bincount(label.ravel(), minlength=256)[:6].tolist()
        assert row["ignore_pixels"] == int((label == 255).sum())


def test_shard_members_keep_original_jpeg(synth_root, synth_shards):
    members = _members(synth_shards["train"] / "train-000001.tar")
    assert sorted(members)[:3] == ["000005.jpg", "000005.json", "000005.label.zst"]
    assert members["000005.jpg"] == (synth_root / "JPEGImages" / "000005.jpg").read_bytes()
    meta = json.loads(members["000005.json"])
    assert meta["key"] == "000005" and meta["dataset"] == "synthetic"
    # the label is a plain zstd frame of the raw H x W indices (any zstd tool reads it)
    expected = np.asarray(Image.open(synth_root / "SegmentationClass" / "000005.png"))
    raw = pa.Codec("zstd").decompress(members["000005.label.zst"], decompressed_size=expected.size)
    label = np.frombuffer(raw, np.uint8).reshape(meta["height"], meta["width"])
    assert np.array_equal(label, expected)


def test_rebuild_is_reproducible_and_skips_finished(synth_root, tmp_path, synth_shards):
    source = VocSource(str(synth_root), "train", SYNTHETIC_CLASSES)
    out = tmp_path / "train"
    result = build_from_source(
        source, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, shard_size=5, workers=2
    )
    assert result.written == 3 and result.reused == 0
    for name in result.shards:  # multiprocess build == single-process build, byte for byte
        assert (out / name).read_bytes() == (synth_shards["train"] / name).read_bytes()
    # simulate an interrupted build: one shard missing, no dataset.json
    (out / "train-000001.tar").unlink()
    (out / "dataset.json").unlink()
    result = build_from_source(
        source, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, shard_size=5, workers=1
    )
    assert result.written == 1 and result.reused == 2
    assert (out / "train-000001.tar").read_bytes() == (
        synth_shards["train"] / "train-000001.tar"
    ).read_bytes()
    # other settings: everything rewritten, stale shards removed
    result = build_from_source(
        source, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, shard_size=7, workers=1
    )
    assert result.written == 2 and sorted(p.name for p in out.glob("*.tar")) == result.shards


def _bad_samples():
    rgb = np.zeros((8, 8, 3), np.uint8)
    good = np.zeros((8, 8), np.uint8)
    yield Sample("a", jpeg_bytes(rgb), good)
    bad = good.copy()
    bad[2, 2] = 17
    yield Sample("b", jpeg_bytes(rgb), bad, source="/data/b.png")
    yield Sample("c", jpeg_bytes(rgb), good[:7])
    yield Sample("d", b"not a jpeg", good)
    yield Sample("e", jpeg_bytes(rgb), good)


def test_bad_samples_raise_naming_the_key(tmp_path):
    with pytest.raises(SegdistError, match=r"/data/b\.png \(sample 'b'\).*\[17\]"):
        build_shards(_bad_samples(), tmp_path / "x", dataset="synthetic", classes=SYNTHETIC_CLASSES)
    assert not list((tmp_path / "x").glob("*.tar")) and not (tmp_path / "x" / "dataset.json").exists()


def test_bad_samples_skipped_and_listed(tmp_path):
    out = tmp_path / "train"
    result = build_shards(_bad_samples(), out, dataset="synthetic", classes=SYNTHETIC_CLASSES, on_bad="skip")
    assert result.num_samples == 2 and result.skipped_keys == ["b", "c", "d"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_samples"] == 2 and meta["stats"]["skipped"] == 3
    assert meta["stats"]["skipped_keys"] == ["b", "c", "d"]
    assert "17" in meta["stats"]["skipped_reasons"][0]["reason"]


def test_downscale_recorded(synth_root, tmp_path):
    samples = list(iter_voc(synth_root, "val", classes=SYNTHETIC_CLASSES))[:3]
    out = tmp_path / "val"
    build_shards(samples, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, downscale=0.5)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    for sample, row in zip(samples, rows, strict=False):
        assert (row["orig_width"], row["orig_height"]) == (sample.width, sample.height)
        assert row["width"] == round(sample.width * 0.5) and row["downscale"] == 0.5
    assert json.loads((out / "dataset.json").read_text())["downscale"] == 0.5


# ----------------------------------------------------------------------------- changed sources


def _shard_labels(path, num_classes):
    """{key: label} as the training reader decodes shard PATH."""
    return {key: label for key, _, label in (decode_sample(s, num_classes) for s in iter_shard(str(path)))}


def _later_mtime(path, seconds=10):
    """Move PATH's mtime `seconds` later than it was: a change no clock resolution can hide."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def _build_voc(root, out):
    source = VocSource(str(root), "train", SYNTHETIC_CLASSES)
    return build_from_source(source, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, shard_size=2, workers=1)


@pytest.fixture
def small_voc(tmp_path):
    """6 train images in a VOC-layout folder this test may edit; 000003 (shard 1) has class 1."""
    root = tmp_path / "voc"
    write_synthetic_voc(root, seed=3, n_train=6, n_val=1, min_size=32, max_size=40)
    return root


def test_corrected_label_rewrites_its_shard_only(small_voc, tmp_path):
    out = tmp_path / "train"
    assert _build_voc(small_voc, out).written == 3
    kept = {n: (out / n).stat().st_mtime_ns for n in ("train-000000.tar", "train-000002.tar")}
    path = small_voc / "SegmentationClass" / "000003.png"
    old = np.asarray(Image.open(path))
    assert (old == 1).any()
    new = np.where(old == 1, 2, old).astype(np.uint8)
    save_palette_png(path, new)
    _later_mtime(path)
    result = _build_voc(small_voc, out)
    assert (result.written, result.changed, result.reused) == (1, 1, 2)
    assert np.array_equal(_shard_labels(out / "train-000001.tar", 6)["000003"], new)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # unchanged shards untouched
    rows = {r["key"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert rows["000003"]["class_pixels"][1] == 0
    result = _build_voc(small_voc, out)  # nothing changed since
    assert (result.written, result.changed, result.reused) == (0, 0, 3)


def test_same_size_touched_file_and_old_bookkeeping_rewrite(small_voc, tmp_path):
    out = tmp_path / "train"
    _build_voc(small_voc, out)
    image = small_voc / "JPEGImages" / "000004.jpg"
    _later_mtime(image)  # same bytes, later mtime: cannot be told from an edit without reading it
    result = _build_voc(small_voc, out)
    assert (result.written, result.changed, result.reused) == (1, 1, 2)
    # a part written by a segdist without the sources record is rewritten
    part_path = out / "_parts" / "train-000000.tar.json"
    part = json.loads(part_path.read_text())
    del part["sources"]
    part_path.write_text(json.dumps(part))
    result = _build_voc(small_voc, out)
    assert (result.written, result.changed, result.reused) == (1, 1, 2)
    # a missing label file is recorded as missing; putting it back rewrites its shard
    label = small_voc / "SegmentationClass" / "000000.png"
    data = label.read_bytes()
    label.unlink()
    with pytest.raises(SegdistError, match="000000.png: label of sample '000000' not found"):
        _build_voc(small_voc, out)
    label.write_bytes(data)
    assert _build_voc(small_voc, out).changed == 1


def test_build_shards_hashes_the_samples(synth_root, tmp_path):
    samples = list(iter_voc(synth_root, "val", classes=SYNTHETIC_CLASSES))
    out = tmp_path / "val"

    def build():
        return build_shards(samples, out, dataset="synthetic", classes=SYNTHETIC_CLASSES, max_samples_per_shard=3)

    assert build().written == 3
    assert (build().written, build().reused) == (0, 3)
    new = samples[4].label.copy()
    new[new == 0] = 1
    samples[4] = Sample(samples[4].key, samples[4].image_bytes, new, "jpg")
    result = build()
    assert (result.written, result.changed, result.reused) == (1, 1, 2)
    assert np.array_equal(_shard_labels(out / "val-000001.tar", 6)[samples[4].key], new)


def test_train_aug_and_cityscapes_name_their_files(voc_sbd, cityscapes_root, tmp_path):
    source = TrainAugSource(str(voc_sbd["voc"]), str(voc_sbd["sbd"]))
    a, _ = voc_sbd["voc_keys"]
    s1 = voc_sbd["sbd_only"]
    assert [p.name for p in source.files(a)] == [f"{a}.jpg", f"{a}.png"]
    assert [p.parent.name for p in source.files(s1)] == ["img", "cls"]  # image only in SBD
    out = tmp_path / "train_aug"

    def build():
        return build_from_source(source, out, dataset="voc", classes=VOC_CLASSES, shard_size=1, workers=1)

    assert build().written == 5
    mat = source.files(s1)[1]
    save_sbd_mat(mat, np.full((12, 16), 3, np.uint8))
    _later_mtime(mat)
    result = build()
    assert (result.written, result.changed, result.reused) == (1, 1, 4)
    assert (_shard_labels(out / f"train_aug-{voc_sbd['train_aug'].index(s1):06d}.tar", 21)[s1] == 3).all()

    cs = CityscapesSource(str(cityscapes_root), "train")
    key = "bochum_000000_000313"
    assert cs.files(key) == list(cs.paths(key))
    cs_out = tmp_path / "cs"
    build_from_source(cs, cs_out, dataset="cityscapes", classes=CITYSCAPES_CLASSES, shard_size=2, workers=1)
    save_gray_png(cs.files(key)[1], np.full((8, 16), 7, np.uint8))  # labelId 7 = road = train id 0
    _later_mtime(cs.files(key)[1])
    result = build_from_source(
        cs, cs_out, dataset="cityscapes", classes=CITYSCAPES_CLASSES, shard_size=2, workers=1
    )
    assert (result.written, result.changed, result.reused) == (1, 1, 1)
    assert (_shard_labels(cs_out / "cs-000001.tar", 19)[key] == 0).all()


def test_prepare_synthetic_follows_its_folder(tmp_path):
    root, train, val = tmp_path / "synthetic", tmp_path / "shards" / "train", tmp_path / "shards" / "val"
    prepare_synthetic(root, train, val, n_train=3, n_val=1)
    built = (train / "dataset.json").stat().st_mtime_ns
    prepare_synthetic(root, train, val, n_train=3, n_val=1)  # up to date: nothing written
    assert (train / "dataset.json").stat().st_mtime_ns == built
    path = root / "SegmentationClass" / "000001.png"
    label = np.asarray(Image.open(path)).copy()
    label[label != 255] = 1
    save_palette_png(path, label)
    _later_mtime(path)
    prepare_synthetic(root, train, val, n_train=3, n_val=1)
    assert np.array_equal(_shard_labels(train / "train-000000.tar", 6)["000001"], label)
    prepare_synthetic(root, train, val, n_train=4, n_val=1)  # other arguments: regenerated
    assert json.loads((train / "dataset.json").read_text())["num_samples"] == 4
    assert json.loads((val / "dataset.json").read_text())["num_samples"] == 1
