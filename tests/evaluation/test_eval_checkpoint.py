"""Checkpoints: rebuilding the model from one, and bad ones as one error line."""

import dataclasses
import json

import torch

from segdist.data.classes import SYNTHETIC_CLASSES, VOC_CLASSES
from segdist.evaluate import main
from segdist.models import build_model
from tests.evaluation.conftest import save_checkpoint, tiny_trial

C = len(SYNTHETIC_CLASSES)


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segdist: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_checkpoint_with_another_class_count_is_one_line(eval_shards, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "voc.pt", tiny_trial(), VOC_CLASSES)
    err = one_error_line(capsys, ["--checkpoint", str(ckpt), "--shards", str(eval_shards)])
    assert "21 classes" in err and "6" in err and "voc.pt" in err


def test_weights_of_another_variant_are_one_line(eval_shards, tmp_path, capsys):
    aspp = build_model(tiny_trial("aspp").recipe.model, C)
    ckpt = save_checkpoint(tmp_path / "mixed.pt", tiny_trial("naked"), SYNTHETIC_CLASSES, model=aspp)
    err = one_error_line(capsys, ["--checkpoint", str(ckpt), "--shards", str(eval_shards)])
    assert "do not fit variant 'naked'" in err and "mixed.pt" in err


def test_other_bad_checkpoint_input_is_one_line(eval_shards, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in one_error_line(
        capsys, ["--checkpoint", str(tmp_path / "junk.pt"), "--shards", str(eval_shards)])
    torch.save({"model": {}}, tmp_path / "bare.pt")
    assert "not a segdist checkpoint" in one_error_line(
        capsys, ["--checkpoint", str(tmp_path / "bare.pt"), "--shards", str(eval_shards)])
    assert "not found" in one_error_line(
        capsys, ["--checkpoint", str(tmp_path / "none.pt"), "--shards", str(eval_shards)])
    assert "no shards" in one_error_line(
        capsys, ["--checkpoint", str(tiny_checkpoint), "--shards", str(tmp_path)])
    assert "odd" in one_error_line(
        capsys, ["--checkpoint", str(tiny_checkpoint), "--shards", str(eval_shards), "--boundary", "10"])
    assert "unknown CRF parameter" in one_error_line(
        capsys, ["--checkpoint", str(tiny_checkpoint), "--shards", str(eval_shards), "--crf", "--crf-param", "w=1"])


def test_edge_variant_gets_its_edge_channel(eval_shards, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "edge.pt", tiny_trial("naked.edge"), SYNTHETIC_CLASSES)
    assert main(["--checkpoint", str(ckpt), "--shards", str(eval_shards), "--scales", "0.5,1", "--flip",
                 "--json", "--loader-workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5


def test_checkpoint_does_not_need_its_imagenet_file(eval_shards, tmp_path, capsys):
    trial = tiny_trial()
    model = build_model(trial.recipe.model, C)
    gone = dataclasses.replace(trial.recipe.model, pretrained=str(tmp_path / "gone.pth"))
    trial = dataclasses.replace(trial, recipe=dataclasses.replace(trial.recipe, model=gone))
    ckpt = save_checkpoint(tmp_path / "from_imagenet.pt", trial, SYNTHETIC_CLASSES, model=model)
    assert main(["--checkpoint", str(ckpt), "--shards", str(eval_shards), "--json", "--loader-workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
