"""`python -m segdist.evaluate --checkpoint`: scoring a checkpoint end to end."""

import json

from PIL import Image

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.evaluate import main
from tests.evaluation.conftest import save_checkpoint, tiny_trial


def test_cli_scores_a_checkpoint_with_msf_crf_and_boundary(eval_shards, tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_checkpoint), "--shards", str(eval_shards), "--scales", "0.75,1",
            "--flip", "--crf", "--crf-workers", "1", "--crf-param", "bi_rgb_std=10", "--boundary", "11,15",
            "--save-pred", str(tmp_path / "pred"), "--pictures", str(tmp_path / "pics"), "--json",
            "--loader-workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou", "per_class_iou", "pixel_acc", "mean_acc", "boundary", "without_crf"} <= set(out)
    assert list(out["per_class_iou"]) == list(SYNTHETIC_CLASSES)
    assert out["num_images"] == 5 and out["scales"] == [0.75, 1.0] and out["flip"] is True
    assert out["tile_size"] is None  # the checkpoint recipe's eval.tile: deeplab scores whole images
    assert out["crf"]["bi_rgb_std"] == 10.0 and out["crf"]["bi_w"] == 4.0
    assert set(out["boundary"]) == {"11", "15"}
    assert {"miou", "pixel_acc", "mean_acc"} <= set(out["boundary"]["11"]["inner"])
    assert len(list((tmp_path / "pred").glob("*.png"))) == 5
    for name in ("confusion_matrix.png", "overlays.png"):
        with Image.open(tmp_path / "pics" / name) as im:
            assert im.size[0] > 100


def test_cli_defaults_are_the_checkpoint_recipes_evaluation(eval_shards, tmp_path, capsys):
    """Without --scales/--flip/--tile/--boundary the checkpoint's own recipe decides: here the
    original protocol's scales 0.9/1/1.1, flip, tiles of the 24-pixel crop, boundary K=5."""
    trial = tiny_trial(protocol="original", eval__boundary_kernels=(5,))
    assert (trial.recipe.eval.scales, trial.recipe.eval.tile) == ((0.9, 1.0, 1.1), (24, 24))
    ckpt = save_checkpoint(tmp_path / "original.pt", trial, SYNTHETIC_CLASSES)
    argv = ["--checkpoint", str(ckpt), "--shards", str(eval_shards), "--json", "--loader-workers", "0"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["scales"], out["flip"], out["tile_size"]) == ([0.9, 1.0, 1.1], True, [24, 24])
    assert set(out["boundary"]) == {"5"}
    assert main([*argv, "--scales", "1", "--no-flip", "--tile", "0", "--boundary", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["scales"], out["flip"], out["tile_size"], set(out["boundary"])) == ([1.0], False, None, {"3"})


def test_cli_table_output(eval_shards, tiny_checkpoint, capsys):
    assert main(["--checkpoint", str(tiny_checkpoint), "--shards", str(eval_shards), "--boundary",
                 "--loader-workers", "0", "--tile", "0"]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "K=19" in text and "disc" in text
