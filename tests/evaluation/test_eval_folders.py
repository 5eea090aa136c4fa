"""Scoring folders of label PNGs in the official formats; agreement with cityscapesscripts."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdist.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    cityscapes_label_id_lut,
    cityscapes_train_id_lut,
    voc_palette,
)
from segdist.evaluate import main
from segdist.evaluation.folders import score_folders, write_prediction_png
from segdist.metrics import confusion_matrix, confusion_matrix_with_void, scores


def save_png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(voc_palette())
    im.save(path)


@pytest.fixture
def voc_folders(tmp_path):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for i, (h, w) in enumerate([(20, 30), (25, 18), (16, 16)]):
        gt = rng.integers(0, 21, (h, w)).astype(np.uint8)
        gt[:2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, 21, (h, w))).astype(np.uint8)
        pred[gt == 255] = rng.integers(0, 21)
        save_png(tmp_path / "gt" / f"2007_{i:06d}.png", gt, palette=True)
        save_png(tmp_path / "pred" / f"2007_{i:06d}.png", pred, palette=i % 2 == 0)
        gts.append(gt)
        preds.append(pred)
    return tmp_path / "pred", tmp_path / "gt", gts, preds


def test_voc_folders_score_like_the_confusion_matrix(voc_folders):
    pred_dir, gt_dir, gts, preds = voc_folders
    expected = sum(
        confusion_matrix(torch.from_numpy(p).long(), torch.from_numpy(g).long(), 21) for p, g in zip(preds, gts, strict=True)
    )
    want = scores(expected)
    got = score_folders(pred_dir, gt_dir, "voc", boundary_kernels=(11,))
    assert got["num_images"] == 3
    assert math.isclose(got["miou"], want["miou"], rel_tol=1e-12)
    assert list(got["per_class_iou"].values()) == pytest.approx(want["per_class_iou"], nan_ok=True)
    assert got["pixel_acc"] == pytest.approx(want["pixel_acc"])
    assert set(got["boundary"]["11"]) == {"boundary", "inner"}


def test_voc_cli_json(voc_folders, capsys):
    pred_dir, gt_dir, _, _ = voc_folders
    assert main(["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc", "--json",
                 "--boundary", "11,15"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou", "per_class_iou", "pixel_acc", "mean_acc", "boundary"} <= set(out)
    assert list(out["boundary"]) == ["11", "15"]
    assert list(out["per_class_iou"])[:2] == ["background", "aeroplane"]


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segdist: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_prediction_is_one_line(voc_folders, capsys):
    pred_dir, gt_dir, _, _ = voc_folders
    (pred_dir / "2007_000001.png").unlink()
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "1 of 3 predictions missing" in err and "2007_000001.png" in err


def test_size_mismatch_is_one_line(voc_folders, capsys):
    pred_dir, gt_dir, _, _ = voc_folders
    save_png(pred_dir / "2007_000002.png", np.zeros((16, 17), np.uint8))
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "2007_000002.png" in err and "17x16" in err and "16x16" in err


def test_bad_values_and_colour_pngs_are_one_line(voc_folders, capsys):
    pred_dir, gt_dir, _, _ = voc_folders
    save_png(pred_dir / "2007_000002.png", np.full((16, 16), 21, np.uint8))
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "value 21" in err and "2007_000002.png" in err
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(pred_dir / "2007_000002.png")
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "2007_000002.png" in err and "16-bit" in err and "mode I;16" in err
    Image.new("RGB", (16, 16), (1, 2, 3)).save(pred_dir / "2007_000002.png")
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "2007_000002.png" in err and "colour (1, 2, 3) is not one of the 21 VOC class colours" in err
    save_png(pred_dir / "2007_000002.png", np.zeros((16, 16), np.uint8))
    Image.new("RGB", (16, 16)).save(gt_dir / "2007_000002.png")  # ground truth must hold indices
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "2007_000002.png" in err and "ground-truth PNG is a colour image (mode RGB)" in err
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir / "nope"), "--gt-dir", str(gt_dir), "--dataset", "voc"])
    assert "not found" in err


# ----------------------------------------------------------------------------- Cityscapes

LABEL_IDS = [label_id for _name, label_id, _train in CITYSCAPES_LABELS if label_id >= 0]


def write_cityscapes(root: Path, seed: int = 0, images: int = 4, size=(24, 48)):
    """gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png and predictions
    <city>_<seq>_<frame>_leftImg8bit.png (labelIds, some of them ignored classes)."""
    rng = np.random.default_rng(seed)
    gt_root, pred_root = root / "gtFine" / "val", root / "results"
    for i in range(images):
        city = ("aachen", "bremen")[i % 2]
        stem = f"{city}_{i:06d}_{i * 7:06d}"
        h, w = size
        gt = rng.choice(LABEL_IDS, size=(h, w)).astype(np.uint8)
        gt[:, : w // 3] = 7 + i  # a larger block of one evaluated class
        pred = np.where(rng.random((h, w)) < 0.5, gt, rng.choice(LABEL_IDS, size=(h, w))).astype(np.uint8)
        save_png(gt_root / city / f"{stem}_gtFine_labelIds.png", gt)
        save_png(pred_root / ("sub" if i % 2 else "") / f"{stem}_leftImg8bit.png", pred)
    return pred_root, gt_root


def official_scores(pred_root: Path, gt_root: Path) -> dict:
    ev = pytest.importorskip(
        "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
        reason="cityscapesScripts is not installed (pip install 'cityscapesScripts==2.3.0')",
    )
    args = ev.args
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    args.predictionPath = str(pred_root)
    args.predictionWalk = None
    gts = sorted(str(p) for p in gt_root.rglob("*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(args, gt) for gt in gts]
    return ev.evaluateImgLists(preds, gts, args)


@pytest.mark.parametrize("seed", [0, 1])
def test_cityscapes_agrees_with_the_official_evaluator(tmp_path, seed):
    pred_root, gt_root = write_cityscapes(tmp_path, seed=seed)
    official = official_scores(pred_root, gt_root)
    ours = score_folders(pred_root, gt_root, "cityscapes")
    assert ours["num_images"] == 4
    for name in CITYSCAPES_CLASSES:
        want, got = official["classScores"][name], ours["per_class_iou"][name]
        assert (math.isnan(want) and math.isnan(got)) or abs(want - got) < 1e-4, name
    assert abs(ours["miou"] - official["averageScoreClasses"]) < 1e-4
    # the generated predictions do hold ignored labelIds (void predictions) on evaluated pixels
    lut = np.array(cityscapes_train_id_lut())
    preds = [np.asarray(Image.open(p)) for p in pred_root.rglob("*.png")]
    assert any((lut[p] == 255).any() for p in preds)


def test_cityscapes_written_predictions_round_trip(tmp_path):
    """write_prediction_png (train ids -> labelIds) scores exactly like the train-id matrix."""
    rng = np.random.default_rng(3)
    lut = np.array(cityscapes_train_id_lut(), dtype=np.uint8)
    total = torch.zeros(19, 19, dtype=torch.int64)
    for i in range(3):
        stem = f"zurich_{i:06d}_000019"
        gt_ids = rng.choice(LABEL_IDS, size=(16, 32)).astype(np.uint8)
        save_png(tmp_path / "gt" / "zurich" / f"{stem}_gtFine_labelIds.png", gt_ids)
        pred_train = rng.integers(0, 19, (16, 32)).astype(np.uint8)
        write_prediction_png(tmp_path / "pred", stem, pred_train, "cityscapes")
        total += confusion_matrix(torch.from_numpy(pred_train).long(), torch.from_numpy(lut[gt_ids]).long(), 19)
    got = score_folders(tmp_path / "pred", tmp_path / "gt", "cityscapes")
    assert got["miou"] == pytest.approx(scores(total)["miou"], abs=1e-12)
    assert score_folders(tmp_path / "pred", tmp_path / "gt", "cityscapes", pred_ids="label") == got
    if official := official_scores(tmp_path / "pred", tmp_path / "gt"):
        assert got["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-4)


def test_cityscapes_bad_input(tmp_path, capsys):
    pred_root, gt_root = write_cityscapes(tmp_path, images=2)
    extra = pred_root / "copy" / "aachen_000000_000000_other.png"
    save_png(extra, np.zeros((24, 48), np.uint8))
    err = one_error_line(capsys, ["--pred-dir", str(pred_root), "--gt-dir", str(gt_root), "--dataset", "cityscapes"])
    assert "several predictions" in err
    extra.unlink()
    save_png(next(pred_root.rglob("bremen*.png")), np.full((24, 48), 40, np.uint8))
    err = one_error_line(capsys, ["--pred-dir", str(pred_root), "--gt-dir", str(gt_root), "--dataset", "cityscapes"])
    assert "not a Cityscapes labelId" in err
    next(pred_root.rglob("bremen*.png")).unlink()
    err = one_error_line(capsys, ["--pred-dir", str(pred_root), "--gt-dir", str(gt_root), "--dataset", "cityscapes"])
    assert "predictions missing" in err and "bremen_000001_000007*.png" in err


def voc_colour_png(path: Path, indices: np.ndarray, mode: str = "RGB") -> None:
    """indices drawn in the VOC colour map as an RGB(A) PNG (what a visualisation saves)."""
    colours = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[indices]
    Image.fromarray(colours, mode="RGB").convert(mode).save(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_voc_colour_predictions_are_mapped_back_to_classes(voc_folders, mode):
    pred_dir, gt_dir, gts, preds = voc_folders
    for i, gt in enumerate(gts):  # a perfect answer (void pixels: some class, as an argmax gives)
        voc_colour_png(pred_dir / f"2007_{i:06d}.png", np.where(gt == 255, 3, gt), mode)
    got = score_folders(pred_dir, gt_dir, "voc")
    present = set(np.unique(np.concatenate([g.ravel() for g in gts]))) - {255}
    assert got["miou"] == 1.0 and got["pixel_acc"] == 1.0
    assert {name for name, iou in got["per_class_iou"].items() if iou == 1.0} == {
        name for k, name in enumerate(got["per_class_iou"]) if k in present
    }
    voc_colour_png(pred_dir / "2007_000001.png", preds[1], mode)  # colours of an imperfect answer
    want = scores(sum(confusion_matrix(torch.from_numpy(p).long(), torch.from_numpy(g).long(), 21)
                      for p, g in zip([np.where(gts[0] == 255, 3, gts[0]), preds[1], np.where(gts[2] == 255, 3, gts[2])],
                                      gts, strict=True)))
    assert score_folders(pred_dir, gt_dir, "voc")["miou"] == pytest.approx(want["miou"], abs=1e-12)


def test_voc_colour_prediction_with_other_colours_is_one_line(voc_folders, capsys):
    pred_dir, gt_dir, gts, _ = voc_folders
    voc_colour_png(pred_dir / "2007_000000.png", gts[0])  # the void colour (224, 224, 192) is no class
    argv = ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc"]
    err = one_error_line(capsys, argv)
    assert "2007_000000.png" in err and "colour (224, 224, 192) is not one of the 21 VOC class colours" in err
    rgba = np.dstack([np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 255, np.uint8)])
    rgba[5, 5, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(pred_dir / "2007_000000.png")
    err = one_error_line(capsys, argv)
    assert "2007_000000.png" in err and "transparent" in err
    err = one_error_line(capsys, [*argv, "--pred-ids", "train"])
    assert "--pred-ids is for --dataset cityscapes" in err


TRAIN_LUT = np.array(cityscapes_train_id_lut(), dtype=np.uint8)


def write_train_id_case(root: Path, seed: int = 0):
    """The issue's case: one 32x64 gtFine labelIds GT and its perfect prediction written as
    trainIds 0..18 (as an argmax gives: GT-ignored pixels get some class too)."""
    rng = np.random.default_rng(seed)
    stem = "aachen_000000_000019"
    gt = rng.choice([0, 4, 7, 8, 11, 17, 21, 23, 24, 26, 33], size=(32, 64)).astype(np.uint8)
    pred = TRAIN_LUT[gt]
    pred[pred == 255] = rng.integers(0, 19, int((pred == 255).sum()))
    save_png(root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelIds.png", gt)
    save_png(root / "results" / f"{stem}_leftImg8bit.png", pred)
    return root / "results", root / "gtFine" / "val", gt, pred


def test_cityscapes_train_id_predictions_refused_or_scored_as_asked(tmp_path, capsys):
    pred_root, gt_root, gt, pred = write_train_id_case(tmp_path)
    argv = ["--pred-dir", str(pred_root), "--gt-dir", str(gt_root), "--dataset", "cityscapes", "--json"]
    err = one_error_line(capsys, argv)  # before: exit 0 with mIoU 0.0
    assert f"{pred_root}: the predictions look like Cityscapes trainIds (values 0..18 only" in err
    assert "pass --pred-ids train" in err and "--pred-ids label" in err and "trainId->id" in err
    assert main([*argv, "--pred-ids", "train"]) == 0
    out = json.loads(capsys.readouterr().out)
    present = {CITYSCAPES_CLASSES[t] for t in np.unique(TRAIN_LUT[gt]) if t != 255}
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0
    assert {name for name, iou in out["per_class_iou"].items() if iou is not None} == present
    assert all(out["per_class_iou"][name] == 1.0 for name in present)  # absent classes: null, not 0
    assert main([*argv, "--pred-ids", "label"]) == 0  # asked for: the trainIds read as labelIds
    as_labels = confusion_matrix_with_void(torch.from_numpy(TRAIN_LUT[pred]).long(),
                                           torch.from_numpy(TRAIN_LUT[gt]).long(), 19)
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(scores(as_labels)["miou"], abs=1e-12)
    # the same answer in labelIds (the official format) scores 1.0 under auto and label
    save_png(next(pred_root.glob("*.png")), np.array(cityscapes_label_id_lut(), np.uint8)[pred])
    for pred_ids in (None, "auto", "label"):
        assert score_folders(pred_root, gt_root, "cityscapes", pred_ids=pred_ids)["miou"] == 1.0


def test_cityscapes_train_id_values_outside_the_table_are_one_line(tmp_path, capsys):
    pred_root, gt_root, _, pred = write_train_id_case(tmp_path)
    path = next(pred_root.glob("*.png"))
    argv = ["--pred-dir", str(pred_root), "--gt-dir", str(gt_root), "--dataset", "cityscapes"]
    pred[3, 4] = 23
    save_png(path, pred)
    err = one_error_line(capsys, [*argv, "--pred-ids", "train"])
    assert path.name in err and "prediction value 23 is not a Cityscapes trainId (0..18, 255)" in err
    pred[3, 4] = 255  # trainIds with 'no class': not labelIds either
    save_png(path, pred)
    assert score_folders(pred_root, gt_root, "cityscapes", pred_ids="train")["miou"] < 1.0
    err = one_error_line(capsys, argv)
    assert path.name in err and "value 255 is not a Cityscapes labelId" in err and "--pred-ids train" in err
    save_png(path, pred[:, :63])
    err = one_error_line(capsys, [*argv, "--pred-ids", "train"])
    assert path.name in err and "63x32" in err and "64x32" in err
    Image.fromarray(pred.astype(np.uint16)).save(path)
    err = one_error_line(capsys, [*argv, "--pred-ids", "train"])
    assert path.name in err and "16-bit" in err


def test_voc_image_list_selects_what_is_scored(voc_folders, tmp_path, capsys):
    pred_dir, gt_dir, gts, preds = voc_folders
    (pred_dir / "2007_000001.png").unlink()  # not listed: not needed
    ids = tmp_path / "val.txt"
    ids.write_text("2007_000000\n2007_000002\n")
    got = score_folders(pred_dir, gt_dir, "voc", id_list=ids)
    want = scores(sum(confusion_matrix(torch.from_numpy(preds[i]).long(), torch.from_numpy(gts[i]).long(), 21)
                      for i in (0, 2)))
    assert got["num_images"] == 2 and got["miou"] == pytest.approx(want["miou"])
    ids.write_text("2007_000000\n2007_000009\n")
    err = one_error_line(capsys, ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--dataset", "voc",
                                  "--list", str(ids)])
    assert "listed ground-truth files missing" in err and "2007_000009.png" in err
