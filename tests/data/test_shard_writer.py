import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.sample import Sample
from segdist.data.shard_writer import build_from_source, build_shards
from segdist.data.voc import VocSource, iter_voc
from segdist.errors import SegdistError

from .conftest import jpeg_bytes


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
