"""The bad-input table: data, study files, command lines and checkpoints. Each mistake is
one `segdist: error:` line that names the file or value, exit status 2, no traceback."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segdist.data.classes import voc_palette
from segdist.data.synthetic import write_synthetic_voc
from tests.test_train import run, tiny_trial


def cli(*args, cwd, env=None):
    import os

    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_shards):
    """A folder of broken things, built once."""
    root = tmp_path_factory.mktemp("bad")
    write_synthetic_voc(root / "voc", seed=0, n_train=6, n_val=3, min_size=40, max_size=48)
    first = (root / "voc/ImageSets/Segmentation/train.txt").read_text().split()[0]

    shutil.copytree(root / "voc", root / "voc_missing")
    (root / f"voc_missing/SegmentationClass/{first}.png").unlink()

    shutil.copytree(root / "voc", root / "voc_range")
    label = np.array(Image.open(root / f"voc_range/SegmentationClass/{first}.png"))
    label[0, 0] = 40
    image = Image.fromarray(label, mode="P")
    image.putpalette(voc_palette())
    image.save(root / f"voc_range/SegmentationClass/{first}.png")

    shutil.copytree(tiny_shards[1], root / "truncated")
    tar = sorted((root / "truncated").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])

    # The same images sharded as VOC: 21 classes, not the generated set's 6.
    assert cli("segdist.shards", "build", "--dataset", "voc", "--root", str(root / "voc"), "--split", "val",
               "--out", str(root / "voc_shards"), cwd=root).returncode == 0

    (*_, (_, state)) = run(tiny_trial(*tiny_shards, epochs=1))
    state.pop("pictures", None)
    torch.save(state, root / "checkpoint.pt")
    (root / "junk.pt").write_bytes(b"not a checkpoint")

    for folder in ("pred", "gt", "gt_sized"):
        (root / folder).mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "pred/a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "gt/a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "gt/b.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "gt_sized/a.png")

    studies = {
        "broken.yaml": "train: {lr: [0.1\n",
        "variant.yaml": yaml.safe_dump({"model": {"variant": "naked.fpn.sobell"}}),
        "key.yaml": yaml.safe_dump({"train": {"learning_rate": 0.1}}),
        "seeds.yaml": yaml.safe_dump({"seeds": {"min": 5, "max": 2}}),
        "search.yaml": yaml.safe_dump({"search": {"train.lr": {"loguniform": [0.1, 0.01]}}}),
        "contradiction.yaml": yaml.safe_dump({"protocol": "original", "model": {"variant": "voc.size512"},
                                              "train": {"crop_size": 321}}),
        "weights_name.yaml": yaml.safe_dump({"model": {"variant": "naked", "pretrained": "imagenet"}}),
        "one_value.yaml": yaml.safe_dump({"model": {"variant": "fpn", "depth": 18, "width": 4, "pretrained": None},
                                          "train": {"batch_size": 1, "crop_size": 24}}),
        "weights_url.yaml": yaml.safe_dump({
            "data": {"train_shards": str(tiny_shards[0]), "val_shards": str(tiny_shards[1])},
            "model": {"variant": "naked", "depth": 18, "width": 64, "pretrained": "torchvision"}}),
    }
    for name, text in studies.items():
        (root / name).write_text(text)
    return root


CASES = [
    # data
    ("missing label", ["segdist.shards", "build", "--dataset", "synthetic", "--root", "voc_missing",
                       "--split", "train", "--out", "out1"], ["voc_missing/SegmentationClass/", "not found"]),
    ("label out of range", ["segdist.shards", "build", "--dataset", "synthetic", "--root", "voc_range",
                            "--split", "train", "--out", "out2"], ["voc_range/SegmentationClass/", "[40] outside 0..5"]),
    ("truncated shard", ["segdist.shards", "inspect", "truncated"], ["truncated/", "truncated or corrupt tar"]),
    ("no data folder", ["segdist.shards", "build", "--dataset", "voc", "--root", "nowhere", "--split", "train",
                        "--out", "out3"], ["nowhere"]),
    # study files
    ("broken YAML", ["segdist.tune", "--space", "broken.yaml", "--dry-run"], ["broken.yaml", "broken YAML (line"]),
    ("unknown variant token", ["segdist.tune", "--space", "variant.yaml", "--dry-run"],
     ["variant.yaml", "unknown token 'sobell'", "valid tokens:"]),
    ("unknown key", ["segdist.tune", "--space", "key.yaml", "--dry-run"], ["key.yaml", "unknown key 'learning_rate'"]),
    ("seed spec that makes no sense", ["segdist.tune", "--space", "seeds.yaml", "--dry-run"],
     ["seeds.yaml", "min <= max"]),
    ("empty search range", ["segdist.tune", "--space", "search.yaml", "--dry-run"], ["search.yaml", "0 < low < high"]),
    ("a study value that contradicts its variant", ["segdist.tune", "--space", "contradiction.yaml", "--dry-run"],
     ["contradiction.yaml", "train.crop_size: 321x321 contradicts variant 'voc.size512'", "'size512' sets 512x512"]),
    ("a BatchNorm that would see one value per channel", ["segdist.tune", "--space", "one_value.yaml", "--dry-run"],
     ["one_value.yaml", "BatchNorm backbone.layer4.0.downsample.1 would see one value per channel",
      "1x1 map from crop 24x24 at output stride 32"]),
    ("unknown ImageNet weights name", ["segdist.tune", "--space", "weights_name.yaml", "--dry-run"],
     ["weights_name.yaml", "model.pretrained: 'imagenet' is neither a known name", "valid: torchvision, tensorpack"]),
    ("unreachable ImageNet weights", ["segdist.tune", "--space", "weights_url.yaml", "--tracking-uri",
                                      "sqlite:///w.db"], ["pretrained 'torchvision' (ResNet-18)", "127.0.0.1:9"]),
    # command lines
    ("missing study file", ["segdist.tune", "--space", "nope.yaml"], ["nope.yaml", "study file not found"]),
    ("unusable storage", ["segdist.tune", "--tracking-uri", "sqlite:///tune.db", "--storage", "/proc/forbidden/x"],
     ["/proc/forbidden/x", "cannot create"]),
    ("unreachable MLflow server", ["segdist.tune", "--tracking-uri", "http://127.0.0.1:9"],
     ["http://127.0.0.1:9", "unreachable"]),
    ("unknown variant to describe", ["segdist.models", "describe", "naked.bogus"], ["unknown token 'bogus'"]),
    ("unknown experiment", ["segdist.report", "--experiment", "nope", "--tracking-uri", "sqlite:///report.db"],
     ["no MLflow experiment named 'nope'"]),
    # checkpoints and evaluation folders
    ("junk checkpoint", ["segdist.evaluate", "--checkpoint", "junk.pt", "--shards", "voc_shards", "--json"],
     ["junk.pt", "not a readable checkpoint"]),
    ("checkpoint of another class count", ["segdist.evaluate", "--checkpoint", "checkpoint.pt", "--shards",
                                           "voc_shards", "--json"], ["checkpoint.pt"]),
    ("missing prediction", ["segdist.evaluate", "--pred-dir", "pred", "--gt-dir", "gt", "--dataset", "voc",
                            "--json"], ["pred/b.png", "missing"]),
    ("prediction of another size", ["segdist.evaluate", "--pred-dir", "pred", "--gt-dir", "gt_sized", "--dataset",
                                    "voc", "--json"], ["pred/a.png", "4x4", "5x4"]),
]


@pytest.mark.parametrize("what, args, fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(bad, what, args, fragments):
    # ImageNet weights from a mirror nobody answers on, into a cache of the test's own
    env = {"SEGDIST_WEIGHTS_MIRROR": "http://127.0.0.1:9/", "TORCH_HOME": str(bad / "torch-home")}
    result = cli(*args, cwd=bad, env=env)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("segdist: error: ")]
    assert result.returncode == 2, f"{what}: exit {result.returncode}\n{result.stderr[-2000:]}"
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_the_table_covers_every_kind_of_input():
    assert len(CASES) >= 12
    assert {args[0] for _, args, _ in CASES} >= {"segdist.shards", "segdist.tune", "segdist.models",
                                                  "segdist.report", "segdist.evaluate"}
