"""Scoring a checkpoint end to end: CLI, the library entry point, bad input, DDP reduction."""

import json
import math
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from segdist.crf import CrfParams, crf_grid_trial, load_sample, read_meta, saved_keys, score_saved
from segdist.data.classes import SYNTHETIC_CLASSES, VOC_CLASSES
from segdist.data.stream import read_dataset_info, val_loader
from segdist.evaluate import (
    all_reduce_result,
    denormalize,
    evaluate_distributed,
    flat_metrics,
    load_checkpoint,
    main,
    model_from_checkpoint,
    save_probabilities,
    summarize,
)
from segdist.metrics import confusion_matrix, scores
from segdist.models import build_model
from segdist.msf import MultiScaleInference
from segdist.visualize import log_evaluation_pictures
from tests.evaluation.conftest import save_checkpoint, tiny_trial

C = len(SYNTHETIC_CLASSES)


def test_whole_image_evaluation_equals_a_plain_forward_pass(eval_shards, tiny_checkpoint):
    model, _, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    info = read_dataset_info(eval_shards)
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0)
    ours = evaluate_distributed(model, loader, C, "cpu", scales=[1.0], flip=False, boundary_kernels=())
    plain = torch.zeros(C, C, dtype=torch.int64)
    with torch.no_grad():
        for images, labels in loader:
            plain += confusion_matrix(model(images).argmax(1), labels, C)
    assert torch.equal(ours.confusion, plain)
    assert ours.num_images == 5 and ours.boundary == {} and ours.before_crf is None


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


def test_saved_probabilities_feed_the_crf_grid(eval_shards, tiny_checkpoint, tmp_path):
    model, _, classes = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    info = read_dataset_info(eval_shards)
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0, with_keys=True)
    folder = tmp_path / "probs"
    result = save_probabilities(model, loader, folder, classes, "cpu", scales=(0.75, 1.0), flip=True, tile_size=24)
    assert read_meta(folder)["scales"] == [0.75, 1.0] and len(saved_keys(folder)) == 5
    saved = score_saved(folder, None)
    assert saved.sum() == result.confusion.sum()
    # the stored probabilities are the MSF ones, in float16 (which can flip the argmax of
    # near-ties: this random-weight model has many, so the matrices are not compared)
    images, labels, key = next(iter(loader))
    msf = MultiScaleInference(model, scales=(0.75, 1.0), flip=True, tile_size=24)
    probs, rgb, label = load_sample(folder, key[0] if isinstance(key, (list, tuple)) else key)
    assert np.abs(probs.astype(np.float32) - msf(images)[0].numpy()).max() < 1e-3
    assert np.array_equal(label, labels[0].numpy()) and np.array_equal(rgb, denormalize(images[0]))
    reported = []
    metrics = crf_grid_trial({"probabilities": str(folder), "workers": 1, **vars(CrfParams())}, report=reported.append)
    assert reported and 0.0 <= metrics["val_miou"] <= 1.0 and metrics["num_images"] == 5


def test_denormalize_recovers_the_uint8_image():
    from segdist.data.transforms import normalize

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(denormalize(torch.from_numpy(normalize(rgb))), rgb)


def test_summary_flat_metrics_and_pictures(eval_shards, tiny_checkpoint):
    model, _, classes = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    loader = val_loader(read_dataset_info(eval_shards), rank=0, world_size=1, loader_workers=0, with_keys=True)
    result = evaluate_distributed(model, loader, C, "cpu", scales=(1.0,), flip=True, boundary_kernels=(11,),
                                  examples=2)
    summary = summarize(result, classes)
    assert summary["miou"] == scores(result.confusion)["miou"] or math.isnan(summary["miou"])
    flat = flat_metrics(summary)
    assert {"val_miou", "val_pixel_acc", "val_mean_acc", "val_boundary11_miou", "val_inner11_pixel_acc"} <= set(flat)
    assert all(math.isfinite(v) for v in flat.values())
    assert len(result.examples) == 2 and result.examples[0][1].shape[-1] == 3

    class FakeClient:
        def __init__(self):
            self.logged = []

        def log_artifact(self, run_id, path, artifact_path=None):
            with Image.open(path) as im:
                im.verify()
            self.logged.append((run_id, os.path.basename(path), artifact_path))

    client = FakeClient()
    names = log_evaluation_pictures(client, "run1", result.confusion, classes, result.examples, tag="_epoch0")
    assert names == ["evaluation/confusion_matrix_epoch0.png", "evaluation/overlays_epoch0.png"]
    assert [n for _, n, _ in client.logged] == ["confusion_matrix_epoch0.png", "overlays_epoch0.png"]


def test_flat_round_trip():
    from segdist.evaluate import EvalResult

    m = lambda v: torch.full((2, 2), v, dtype=torch.int64)  # noqa: E731
    result = EvalResult(m(1), {11: (m(2), m(3)), 15: (m(4), m(5))}, m(6), 7)
    back = result.with_flat(result.flat() * 2)
    assert back.num_images == 14 and torch.equal(back.before_crf, m(12))
    assert torch.equal(back.boundary[15][1], m(10)) and torch.equal(back.confusion, m(2))


def _ddp_worker(rank, world, port, shards, ckpt, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _, _ = model_from_checkpoint(load_checkpoint(ckpt), "ckpt")
        loader = val_loader(read_dataset_info(shards), rank=rank, world_size=world, loader_workers=0)
        result = evaluate_distributed(model, loader, C, "cpu", scales=(1.0, 0.5), flip=True, boundary_kernels=(11,),
                                      tile_size=24)
        local = result.num_images
        result = all_reduce_result(result)
        if rank == 0:
            queue.put((local, result.num_images, result.flat().tolist()))
        dist.barrier()  # neither rank tears down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_ranks_add_up_to_the_single_process_result(eval_shards, tiny_checkpoint):
    model, _, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    loader = val_loader(read_dataset_info(eval_shards), rank=0, world_size=1, loader_workers=0)
    single = evaluate_distributed(model, loader, C, "cpu", scales=(1.0, 0.5), flip=True, boundary_kernels=(11,),
                                  tile_size=24)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, str(eval_shards), str(tiny_checkpoint), queue), nprocs=2,
                       start_method="spawn")
    local, total, flat = queue.get()
    assert 0 < local < 5 and total == 5
    assert flat == single.flat().tolist()


def test_benchmark_reports_the_three_timings():
    from segdist.evaluate import benchmark

    out = benchmark(size=(20, 26), images=1, depth=18, width=4, tile_size=16, scales=(0.5, 1.0))
    for key in ("whole_image_s_per_image", "msf_s_per_image", "crf_s_per_image"):
        assert out[key]["median"] > 0
    # scale 0.5 (10x13): one padded tile; scale 1 (20x26): 2 x 2 tiles; each run mirrored too
    assert out["msf"]["tile_passes_per_image"] == 2 * (1 + 4)


def test_checkpoint_does_not_need_its_imagenet_file(eval_shards, tmp_path, capsys):
    import dataclasses

    trial = tiny_trial()
    model = build_model(trial.recipe.model, C)
    gone = dataclasses.replace(trial.recipe.model, pretrained=str(tmp_path / "gone.pth"))
    trial = dataclasses.replace(trial, recipe=dataclasses.replace(trial.recipe, model=gone))
    ckpt = save_checkpoint(tmp_path / "from_imagenet.pt", trial, SYNTHETIC_CLASSES, model=model)
    assert main(["--checkpoint", str(ckpt), "--shards", str(eval_shards), "--json", "--loader-workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
