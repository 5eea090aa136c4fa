import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.shard_writer import build_from_source
from segdist.data.stream import decode_sample, iter_shard
from segdist.data.voc import VocSource
from segdist.shards import main

from .conftest import save_palette_png


def test_synth_build_inspect(tmp_path, capsys):
    root, out = tmp_path / "synth", tmp_path / "shards" / "train"
    assert main(["synth", "--out", str(root), "--train", "5", "--val", "2"]) == 0
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == ["000005", "000006"]
    args = [
        "build",
        "--dataset",
        "synthetic",
        "--root",
        str(root),
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--workers",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    assert "5 samples in 3 shards" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 written, 3 kept" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["samples"] == 5 and report["shards"] == 3


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "build",
                "--dataset",
                "voc",
                "--root",
                str(tmp_path / "nope"),
                "--split",
                "train",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("segdist: error:") and "nope" in err and "\n" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no shards in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["build", "--dataset", "imagenet", "--root", ".", "--split", "x", "--out", "y"])
    assert exc.value.code == 2


def test_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "segdist.shards", "build", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--on-bad" in result.stdout and "--downscale" in result.stdout


def test_on_bad_raise_and_skip(tmp_path, capsys):
    root = tmp_path / "synth"
    main(["synth", "--out", str(root), "--train", "4", "--val", "1"])
    save_palette_png(root / "SegmentationClass" / "000002.png", np.full((20, 20), 9, np.uint8))
    args = [
        "build",
        "--dataset",
        "synthetic",
        "--root",
        str(root),
        "--split",
        "train",
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "1",
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "000002.png" in err and "'000002'" in err
    assert main(args + ["--on-bad", "skip"]) == 0
    assert "skipped 1 bad sample(s): 000002" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["num_samples"] == 3 and meta["stats"]["skipped_keys"] == ["000002"]


def test_inspect_finds_a_corrupt_shard(tmp_path, capsys, synth_shards):
    import shutil

    out = tmp_path / "val"
    shutil.copytree(synth_shards["val"], out)
    path = out / "val-000001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    assert main(["inspect", str(out)]) == 2
    captured = capsys.readouterr()
    assert "val-000001.tar" in captured.err and "truncated" in captured.err
    assert "problem:" in captured.out


def test_cityscapes_build_with_downscale(cityscapes_root, tmp_path, capsys):
    out = tmp_path / "cs" / "train"
    assert (
        main(
            [
                "build",
                "--dataset",
                "cityscapes",
                "--root",
                str(cityscapes_root),
                "--split",
                "train",
                "--out",
                str(out),
                "--downscale",
                "0.5",
                "--quiet",
            ]
        )
        == 0
    )
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["width"], r["height"], r["orig_width"], r["orig_height"]) for r in rows] == [(8, 4, 16, 8)] * 3
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["dataset"] == "cityscapes" and len(meta["classes"]) == 19 and meta["downscale"] == 0.5
    assert main(["inspect", str(out)]) == 0


def test_interrupted_build_resumes(synth_root, tmp_path):
    class Interrupting(VocSource):
        def load(self, key):
            if key == "000007":
                raise KeyboardInterrupt
            return super().load(key)

    out = tmp_path / "train"
    with pytest.raises(KeyboardInterrupt):
        build_from_source(
            Interrupting(str(synth_root), "train", SYNTHETIC_CLASSES),
            out,
            dataset="synthetic",
            classes=SYNTHETIC_CLASSES,
            shard_size=5,
            workers=1,
        )
    # only the complete first shard is visible; no half-written file, no dataset.json
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == ["train-000000.tar"]
    result = build_from_source(
        VocSource(str(synth_root), "train", SYNTHETIC_CLASSES),
        out,
        dataset="synthetic",
        classes=SYNTHETIC_CLASSES,
        shard_size=5,
        workers=1,
    )
    assert result.reused == 1 and result.written == 2 and result.num_samples == 13


def test_rebuild_after_a_label_fix(tmp_path, capsys):
    root, out = tmp_path / "synth", tmp_path / "shards" / "train"
    main(["synth", "--out", str(root), "--train", "5", "--val", "1"])
    args = ["build", "--dataset", "synthetic", "--root", str(root), "--split", "train", "--out", str(out)]
    args += ["--shard-size", "2", "--workers", "1", "--quiet"]
    assert main(args) == 0
    assert "(3 written, 0 kept from an earlier run)" in capsys.readouterr().out
    path = root / "SegmentationClass" / "000002.png"
    label = np.asarray(Image.open(path)).copy()
    label[label != 255] = 1
    save_palette_png(path, label)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    assert main(args) == 0
    assert "(1 written (1 because its sources changed), 2 kept from an earlier run)" in capsys.readouterr().out
    served = {s["__key__"]: decode_sample(s, 6)[2] for s in iter_shard(str(out / "train-000001.tar"))}
    assert np.array_equal(served["000002"], label)
    assert main(args) == 0
    assert "(0 written, 3 kept from an earlier run)" in capsys.readouterr().out
