"""The per-worker loop without Ray: one process, world size 1, tiny shards."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from segdist.config import expand_trials, parse_study
from segdist.epoch_report import EpochReport
from segdist.train import (
    CHECKPOINT_FILE,
    PICTURES_DIR,
    TrainingDiverged,
    fit,
    read_resume_state,
    resolve_precision,
    segmentation_loss,
)


def tiny_trial(train_shards, val_shards, variant="naked", evaluation=None, protocol="deeplab", **train):
    raw = {
        "protocol": protocol,
        "data": {"train_shards": str(train_shards), "val_shards": str(val_shards), "loader_workers": 0},
        "model": {"variant": variant, "depth": 18, "width": 4, "pretrained": None},
        "train": {"epochs": 2, "batch_size": 2, "crop_size": 32, "scale_range": [0.8, 1.2], "lr": 0.01,
                  **train},
        "eval": evaluation or {},
        "seeds": [0],
    }
    (trial,) = expand_trials(parse_study(raw, "tiny.yaml"))
    return trial


def run(trial, resume=None):
    reports = []
    fit(trial, rank=0, world_size=1, device=torch.device("cpu"),
        # Snapshot the state as the Ray path does (torch.save at report time): state_dict()
        # holds live tensors that later epochs keep changing.
        report=lambda report, state: reports.append((report, copy.deepcopy(state))), resume=resume)
    return reports


def comparable(report):
    """An EpochReport's epoch and metrics, less its timings."""
    timing = ("train_images_per_s", "epoch_time_s")
    return report.epoch, {k: v for k, v in report.metrics.items() if k not in timing}


def test_fit_reports_every_epoch_with_metrics_and_a_checkpoint(tiny_shards):
    reports = run(tiny_trial(*tiny_shards))
    assert [m.epoch for m, _ in reports] == [0, 1]
    first, state = reports[0]
    for key in ("train_loss", "val_miou", "val_pixel_acc", "val_mean_acc", "val_iou_background",
                "skipped_train_samples", "train_images_per_s"):
        assert key in first.metrics, key
    # what the device and weights made of the recipe, once per worker group
    assert first.facts == {"precision": "fp32", "channels_last": False, "tf32": False,  # auto on CPU
                           "pretrained_sha256": "-"}
    assert 0.0 <= first.metrics["val_miou"] <= 1.0
    assert state["epoch"] == 0 and set(state) >= {"model", "optimizer", "scheduler", "classes", "trial"}
    assert reports[1][0].facts == {} and reports[1][0].history == []
    last, last_state = reports[-1]
    assert last.metrics["final_miou"] == last.metrics["val_miou"]  # a whole-image study reuses the epoch's pass
    assert "final_miou" not in first.metrics
    assert (first.pictures, last.pictures) == (False, True)
    assert last_state["pictures"]["confusion.png"][:4] == b"\x89PNG"
    assert last_state["pictures"]["overlays.png"][:4] == b"\x89PNG"


def test_the_studys_evaluation_runs_once_at_the_end(tiny_shards):
    trial = tiny_trial(*tiny_shards, epochs=1,
                       evaluation={"scales": [0.75, 1.0], "flip": True, "boundary_kernels": [5]})
    (report, _), = run(trial)
    metrics = report.metrics
    for key in ("final_miou", "final_boundary5_miou", "final_inner5_miou", "final_boundary5_pixel_acc"):
        assert key in metrics, key
    assert "val_boundary5_miou" not in metrics  # per-epoch evaluation stays whole-image


def test_same_seed_gives_identical_metrics_on_cpu(tiny_shards):
    trial = tiny_trial(*tiny_shards, epochs=1)
    first = [comparable(m) for m, _ in run(trial)]
    again = [comparable(m) for m, _ in run(trial)]
    assert first == again
    other_seed = dataclasses.replace(trial, seed=1)
    assert [comparable(m) for m, _ in run(other_seed)] != first


def test_resuming_from_a_checkpoint_continues_exactly(tiny_shards):
    trial = tiny_trial(*tiny_shards)
    straight = run(trial)
    resumed = run(trial, resume=straight[0][1])
    assert [m.epoch for m, _ in resumed] == [1]
    assert comparable(resumed[0][0]) == comparable(straight[1][0])


def test_an_original_recipe_resumes_exactly(tiny_shards):
    """TF1 Adam's state, the lr step and the decaying L2 term (its step count) survive a resume."""
    trial = tiny_trial(*tiny_shards, protocol="original", epochs=3, lr_steps=[[1, 0.4]],
                       weight_decay=0.01, weight_decay_every=3)
    straight = run(trial)
    resumed = run(trial, resume=straight[0][1])
    assert [m.epoch for m, _ in resumed] == [1, 2]
    assert [comparable(m) for m, _ in resumed] == [comparable(m) for m, _ in straight[1:]]


def test_a_nan_loss_stops_the_trial(tiny_shards):
    with pytest.raises(TrainingDiverged) as raised:
        run(tiny_trial(*tiny_shards, lr=1e12, epochs=1))
    assert raised.value.epoch == 0 and "not finite in epoch 0" in str(raised.value)


def test_skip_policy_drops_nan_steps_and_counts_them(tiny_shards):
    reports = run(tiny_trial(*tiny_shards, lr=1e12, epochs=1, on_nan="skip"))
    assert reports[0][0].metrics["skipped_nan_steps"] > 0


def test_soft_targets_equal_hard_cross_entropy_on_one_hot_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    labels = torch.randint(0, 3, (2, 5, 5))
    labels[0, 0, 0] = 255
    soft = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    soft[0, :, 0, 0] = 0  # void pixel: all-zero soft target
    assert torch.allclose(segmentation_loss(logits, soft), segmentation_loss(logits, labels))


def test_an_original_recipe_trains_with_its_optimizer_schedule_and_augmentation(tiny_shards):
    """A whole trial of the original protocol on CPU: TF1 Adam, step schedule, L2 decay,
    tensorpack augmentation, TF1 numerics, tiled multi-scale evaluation."""
    trial = tiny_trial(*tiny_shards, variant="naked.fpn.learnable.sobel.channelwise.1order", protocol="original",
                       epochs=3, lr_steps=[[1, 0.4], [2, 0.04]], crop_size=64)
    recipe = trial.recipe
    assert (recipe.train.optimizer, recipe.train.schedule, recipe.model.framework) == ("adam_tf1", "steps", "tf1")
    reports = run(trial)
    lrs = [m.metrics["lr"] for m, _ in reports]
    assert lrs == pytest.approx([0.01, 0.004, 0.0004])  # epoch e's last lr: after epochs 1 and 2 the steps
    assert all(math.isfinite(m.metrics["train_loss"]) for m, _ in reports)
    assert {"final_miou"} <= set(reports[-1][0].metrics)


def test_a_resumed_trial_reports_the_history_its_checkpoint_holds(tiny_shards):
    trial = tiny_trial(*tiny_shards, epochs=3)
    straight = run(trial)
    assert [epoch for epoch, _ in straight[1][1]["history"]] == [0, 1]
    resumed = run(trial, resume=straight[1][1])  # from the epoch-1 checkpoint
    sent = EpochReport.from_result(resumed[0][0].result())  # as the driver reads it
    assert [epoch for epoch, _ in sent.history] == [0, 1]
    assert sent.history[1][1] == straight[1][0].metrics
    assert sent.facts == straight[0][0].facts  # a new worker group says what it runs on again
    assert straight[0][0].history == [] and straight[2][0].history == []


def test_a_trial_resumed_from_its_last_epoch_reports_that_epoch_again_without_training(tiny_shards):
    """The driver died after the last checkpoint: the trial must still give Tune its final result."""
    trial = tiny_trial(*tiny_shards)
    straight = run(trial)
    last, state = straight[-1]
    state["pictures"] = {"confusion.png": b"png"}  # what read_resume_state reads back beside it
    (again, saved), = run(trial, resume=state)
    sent = EpochReport.from_result(again.result())
    assert (sent.epoch, sent.metrics) == (last.epoch, last.metrics)  # final_miou included
    assert [epoch for epoch, _ in sent.history] == [0] and sent.pictures
    assert saved["epoch"] == 1 and saved["history"] == state["history"]  # the checkpoint, once more
    other = []
    fit(trial, rank=1, world_size=2, device=torch.device("cpu"), resume=state,  # no process group: no training
        report=lambda report, state: other.append((report, state)))
    assert [(r.epoch, r.metrics, r.history, s) for r, s in other] == [(1, last.metrics, [], None)]


def test_an_unreadable_checkpoint_is_left_with_one_line_naming_it(tmp_path, capsys):
    from ray.train import Checkpoint

    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 torn")
    assert read_resume_state(Checkpoint.from_directory(str(tmp_path)), rank=0) is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("segdist: warning: checkpoint ") and f"{tmp_path}/{CHECKPOINT_FILE}" in line
    assert "from epoch 0" in line
    (tmp_path / CHECKPOINT_FILE).unlink()  # deleted: the same
    assert read_resume_state(Checkpoint.from_directory(str(tmp_path)), rank=1) is None
    assert capsys.readouterr().err == ""  # rank 0 speaks for the worker group


def test_a_checkpoint_is_read_back_with_its_pictures(tmp_path):
    from ray.train import Checkpoint

    torch.save({"epoch": 3}, tmp_path / CHECKPOINT_FILE)
    (tmp_path / PICTURES_DIR).mkdir()
    (tmp_path / PICTURES_DIR / "confusion.png").write_bytes(b"png")
    state = read_resume_state(Checkpoint.from_directory(str(tmp_path)), rank=0)
    assert state == {"epoch": 3, "pictures": {"confusion.png": b"png"}}


@pytest.mark.parametrize(
    ("precision", "channels_last", "device", "expected"),
    [
        ("auto", False, "cpu", (False, False)),
        ("auto", False, "cuda", (True, True)),  # the GPU default: bf16 autocast + channels_last
        ("auto", True, "cpu", (False, True)),
        ("fp32", False, "cuda", (False, False)),
        ("bf16", False, "cpu", (True, False)),
    ],
)
def test_precision_auto_is_bf16_and_channels_last_on_cuda_only(precision, channels_last, device, expected):
    from segdist.resolve import resolve_recipe

    train = resolve_recipe({"train.precision": precision, "train.channels_last": channels_last}, "deeplab", "t").train
    assert resolve_precision(train, torch.device(device)) == expected


# ------------------------------------------------------------------ batches with no labelled pixel


@pytest.fixture(scope="module")
def void_shards(tmp_path_factory):
    """Four 32x40 images, the second labelled 255 everywhere, as train and val splits."""
    import io

    import numpy as np
    from PIL import Image

    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.sample import Sample
    from segdist.data.shard_writer import build_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        label = rng.integers(0, 3, (32, 40)).astype(np.uint8)
        if i == 1:
            label[:] = 255
        samples.append(Sample(f"s{i}", buffer.getvalue(), label, "png"))
    base = tmp_path_factory.mktemp("void")
    for split in ("train", "val"):
        build_shards(samples, base / split, dataset="synthetic", classes=DATASET_CLASSES["synthetic"])
    return base / "train", base / "val"


def one_image_per_batch(trial):
    return dataclasses.replace(trial, data=dataclasses.replace(trial.data, shuffle_buffer=1))


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_batch_with_no_labelled_pixel_is_skipped_and_counted(void_shards, on_nan):
    reports = run(one_image_per_batch(tiny_trial(*void_shards, batch_size=1, crop_size=24, on_nan=on_nan)))
    assert [m.metrics["skipped_void_steps"] for m, _ in reports] == [1, 1]  # the all-void image, every epoch
    assert [m.metrics["skipped_nan_steps"] for m, _ in reports] == [0, 0]
    assert all(math.isfinite(m.metrics["train_loss"]) and 0 <= m.metrics["val_miou"] <= 1 for m, _ in reports)


def test_all_void_images_in_edgemix_training_and_boundary_evaluation(void_shards):
    trial = tiny_trial(*void_shards, variant="naked.voc.edgemix", batch_size=1, crop_size=24, epochs=1,
                       evaluation={"boundary_kernels": [3, 5]})
    reports = run(one_image_per_batch(trial))
    metrics = reports[-1][0].metrics
    assert metrics["skipped_void_steps"] == 1 and math.isfinite(metrics["train_loss"])
    boundary = {k: v for k, v in metrics.items() if "boundary" in k}
    assert boundary and all(math.isfinite(v) for v in boundary.values() if isinstance(v, float))


def test_the_loss_of_a_batch_with_no_labelled_pixel_is_zero_with_zero_gradients():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    segmentation_loss(logits, torch.full((2, 4, 4), 255, dtype=torch.int64)).backward()
    assert logits.grad is not None and not logits.grad.any()
    soft = torch.zeros(2, 3, 4, 4)
    assert segmentation_loss(logits, soft).item() == 0.0
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0] = 255  # one void image does not change the mean over the labelled pixels
    assert segmentation_loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels, ignore_index=255).item(), rel=1e-6)


def _void_steps_on_two_ranks(rank, store, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from segdist.distributed import host_group
    from segdist.train import StepOptions, train_one_epoch

    # A file store: no rank hosts a server the other could lose while shutting down.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    net = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images = torch.randint(0, 255, (1, 4, 4, 4), dtype=torch.uint8)
    labelled, void = torch.ones(1, 4, 4, dtype=torch.uint8), torch.full((1, 4, 4), 255, dtype=torch.uint8)
    # step 0: rank 0 all void, rank 1 not; step 1: void everywhere; step 2: labelled everywhere
    batches = [(images, void if rank == 0 else labelled), (images, void), (images, labelled)]
    stats = train_one_epoch(net, batches, optimizer, scheduler, StepOptions(torch.device("cpu"),
                            flag_group=host_group()), epoch=0)
    out.put((rank, stats.steps, stats.void_steps, scheduler.last_epoch, model.weight.detach().tolist()))  # plain values: a tensor would need its sender alive
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_agree_on_void_steps_and_stay_in_step(tmp_path):
    """Two DDP ranks (gloo): a step void on one rank trains on the other's pixels; a step void
    on both is skipped by both (no hang, no update); the replicas stay identical."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_void_steps_on_two_ranks, args=(rank, tmp_path / "store", out)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert [r[1:4] for r in results] == [(3, 1, 3), (3, 1, 3)]
    assert results[0][4] == results[1][4]


def test_a_batch_of_one_trains_when_every_batchnorm_sees_more_than_one_value(void_shards):
    """The check's boundary: fpn (output stride 32) at batch 1 is refused at crop 24 (1x1
    deepest map, tests/test_bad_inputs.py) and trains at crop 33 (2x2)."""
    reports = run(tiny_trial(*void_shards, variant="fpn", batch_size=1, crop_size=33, epochs=1))
    assert math.isfinite(reports[0][0].metrics["train_loss"])
