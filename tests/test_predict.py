"""segdist.predict: a checkpoint over a folder of unlabelled images, in the official formats;
segdist.models.load_model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segdist.crf import CrfParams, crf_labels
from segdist.data.classes import (
    CITYSCAPES_CLASSES,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    cityscapes_label_id_lut,
    voc_palette,
)
from segdist.evaluation.checkpoint import CHECKPOINT_FILE
from segdist.evaluation.folders import score_folders
from segdist.models import TrainedModel, load_model
from segdist.msf import MultiScaleInference
from segdist.predict import main, read_image
from tests.evaluation.conftest import save_checkpoint, tiny_trial

CITY = "berlin_000000_000019"
SIZES = {"a.jpg": (37, 51), "sub/b.png": (29, 40), "sub/deeper/c.JPEG": (33, 23)}  # (H, W)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def write_image(path: Path, height: int, width: int, seed: int, gray: bool = False) -> Path:
    """A smooth random picture (so JPEG keeps it recognisable), RGB or grayscale."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 1 if gray else 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for seed, (name, (h, w)) in enumerate(SIZES.items()):
        write_image(root / name, h, w, seed, gray=name.endswith("c.JPEG"))
    (root / "notes.txt").write_text("not an image: left out")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    return {name: save_checkpoint(root / f"{name}.pt", tiny_trial(), classes)
            for name, classes in (("voc", VOC_CLASSES), ("cityscapes", CITYSCAPES_CLASSES),
                                  ("synthetic", SYNTHETIC_CLASSES))}


def predict(*argv, quiet: bool = True) -> int:
    return main([*map(str, argv), "--threads", "1", "--crf-workers", "0", *(["--quiet"] if quiet else [])])


def expected(checkpoint: Path, image: Path, scales=(1.0,), flip=False) -> torch.Tensor:
    """What MultiScaleInference of the checkpoint's model gives for one image: probabilities [C, H, W]."""
    model = load_model(checkpoint).model
    with torch.inference_mode():
        return MultiScaleInference(model, scales, flip)(read_image(image)[0])[0]


def one_error_line(capsys, *argv) -> str:
    assert predict(*argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("segdist: error: ") and "\n" not in err and "Traceback" not in err
    assert captured.out == ""
    return err


def test_voc_palette_pngs_of_odd_sized_jpeg_and_png(images, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict("--checkpoint", checkpoints["voc"], "--images", images, "--out", out, "--json", quiet=False) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout: the summary only; the progress bar is on stderr
    assert summary["format"] == "voc" and summary["images"] == 3 and summary["images_per_second"] > 0
    assert "3/3" in captured.err
    gt = tmp_path / "gt"
    for name, (h, w) in SIZES.items():
        with Image.open(out / Path(name).with_suffix(".png")) as im:
            assert im.mode == "P" and im.size == (w, h)
            assert im.getpalette()[: 3 * 256] == voc_palette()
            pred = np.asarray(im)
        want = expected(checkpoints["voc"], images / name).argmax(0).numpy().astype(np.uint8)
        np.testing.assert_array_equal(pred, want)
        (gt / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(want, mode="L").save(gt / Path(name).with_suffix(".png"))
    # the official-format reader takes them back: perfect agreement with the expected maps
    assert score_folders(out, gt, "voc")["pixel_acc"] == 1.0


def test_cityscapes_label_ids_read_by_the_official_evaluator(checkpoints, tmp_path, capsys):
    images = tmp_path / "leftImg8bit" / "test"
    write_image(images / "berlin" / f"{CITY}_leftImg8bit.png", 24, 48, seed=7)
    out = tmp_path / "results"
    assert predict("--checkpoint", checkpoints["cityscapes"], "--images", images, "--out", out) == 0
    written = out / "berlin" / f"{CITY}_pred_labelIds.png"
    with Image.open(written) as im:
        assert im.mode == "L" and im.size == (48, 24)
        ids = np.asarray(im)
    train_ids = expected(checkpoints["cityscapes"], images / "berlin" / f"{CITY}_leftImg8bit.png").argmax(0)
    np.testing.assert_array_equal(ids, np.array(cityscapes_label_id_lut(), dtype=np.uint8)[train_ids.numpy()])
    assert set(np.unique(ids)) <= set(cityscapes_label_id_lut()[:19])
    # the official evaluator finds the file by its name and reads it (scored against itself)
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    gt = tmp_path / "gtFine" / "val" / "berlin" / f"{CITY}_gtFine_labelIds.png"
    gt.parent.mkdir(parents=True)
    shutil.copy(written, gt)
    args = ev.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    args.predictionPath, args.predictionWalk = str(out), None
    assert ev.getPrediction(args, str(gt)) == str(written)
    result = ev.evaluateImgLists([str(written)], [str(gt)], args)
    assert result["averageScoreClasses"] == pytest.approx(1.0)


def test_msf_and_flip_equal_multi_scale_inference(images, checkpoints, tmp_path):
    out = tmp_path / "out"
    assert predict("--checkpoint", checkpoints["synthetic"], "--images", images, "--out", out,
                   "--scales", "0.5,0.75,1", "--flip") == 0
    for name in SIZES:
        with Image.open(out / Path(name).with_suffix(".png")) as im:
            assert im.mode == "P"
            pred = np.asarray(im)
        want = expected(checkpoints["synthetic"], images / name, (0.5, 0.75, 1.0), True).argmax(0)
        np.testing.assert_array_equal(pred, want.numpy())


def test_crf_option_and_overlays(images, checkpoints, tmp_path):
    out = tmp_path / "crf"
    assert predict("--checkpoint", checkpoints["synthetic"], "--images", images, "--out", out, "--crf",
                   "--crf-param", "iter_max=2") == 0
    name = "sub/b.png"
    probs = expected(checkpoints["synthetic"], images / name).numpy()
    rgb = read_image(images / name)[1]
    want = crf_labels(probs.astype(np.float16), rgb, CrfParams(iter_max=2))
    with Image.open(out / name) as im:
        np.testing.assert_array_equal(np.asarray(im), want)
    over = tmp_path / "overlay"
    assert predict("--checkpoint", checkpoints["synthetic"], "--images", images, "--out", over,
                   "--format", "overlay") == 0
    for name, (h, w) in SIZES.items():
        with Image.open(over / Path(name).with_suffix(".png")) as im:
            assert im.mode == "RGB" and im.size == (w, h)


def test_bad_inputs_are_one_line_naming_the_file(images, checkpoints, tmp_path, capsys):
    voc, out = checkpoints["voc"], tmp_path / "out"
    err = one_error_line(capsys, "--checkpoint", voc, "--images", images, "--out", out, "--format", "cityscapes")
    assert "voc.pt" in err and "21 classes" in err and "19 cityscapes classes" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    err = one_error_line(capsys, "--checkpoint", voc, "--images", tmp_path / "empty", "--out", out)
    assert "empty" in err and "no images" in err
    assert "not found" in one_error_line(capsys, "--checkpoint", voc, "--images", tmp_path / "none", "--out", out)
    broken = tmp_path / "broken"
    write_image(broken / "fine.png", 20, 20, seed=1)
    (broken / "bad.jpg").write_bytes(b"this is text, not a JPEG")
    err = one_error_line(capsys, "--checkpoint", voc, "--images", broken, "--out", out)
    assert "bad.jpg" in err and "cannot read image" in err
    (broken / "bad.jpg").unlink()
    write_image(broken / "fine.jpg", 20, 20, seed=2)
    err = one_error_line(capsys, "--checkpoint", voc, "--images", broken, "--out", out)
    assert "fine.jpg" in err and "fine.png" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.png").write_bytes(b"")
    err = one_error_line(capsys, "--checkpoint", voc, "--images", images, "--out", full)
    assert str(full) in err and "not empty" in err and "--overwrite" in err
    assert predict("--checkpoint", voc, "--images", images, "--out", full, "--overwrite") == 0
    assert "3 predictions" in capsys.readouterr().out
    err = one_error_line(capsys, "--checkpoint", voc, "--images", images, "--out", images, "--overwrite")
    assert "is the images folder" in err
    assert "checkpoint not found" in one_error_line(
        capsys, "--checkpoint", tmp_path / "none.pt", "--images", images, "--out", out)


def test_load_model_rebuilds_the_model_from_a_file_or_its_folder(checkpoints, tmp_path):
    folder = tmp_path / "best_checkpoint"
    folder.mkdir()
    shutil.copy(checkpoints["voc"], folder / CHECKPOINT_FILE)
    for where in (checkpoints["voc"], folder):
        trained = load_model(where)
        assert isinstance(trained, TrainedModel) and trained.classes == list(VOC_CLASSES)
        assert not trained.model.training and trained.epoch == 0
        assert trained.trial.recipe.model.variant == "naked"
        with torch.inference_mode():
            assert trained.model(torch.zeros(1, 3, 17, 19)).shape == (1, 21, 17, 19)
    assert trained.path == folder / CHECKPOINT_FILE


def test_edge_variant_gets_its_edge_channel(images, tmp_path):
    ckpt = save_checkpoint(tmp_path / "edge.pt", tiny_trial("naked.edge"), SYNTHETIC_CLASSES)
    assert predict("--checkpoint", ckpt, "--images", images, "--out", tmp_path / "out", "--scales", "0.5,1",
                   "--flip") == 0
    assert len(list((tmp_path / "out").rglob("*.png"))) == len(SIZES)
