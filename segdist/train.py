"""The per-worker training loop: SGD/Adam with a poly schedule and head lr multipliers,
an all-reduced validation confusion matrix every epoch, checkpoints and a NaN guard.

`fit` knows nothing about Ray: it takes a rank, a world size and a `report` function, so
the same loop runs under Ray Train (`ray_train_loop`), plain torch.distributed and tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from segdist.config import EvalConfig, TrainConfig, TrialConfig, trial_from_dict
from segdist.data.batch import model_inputs, model_targets
from segdist.data.classes import IGNORE_INDEX
from segdist.data.stream import read_dataset_info, train_loader, val_loader
from segdist.data.transforms import RESIZE_BACKEND
from segdist.evaluate import all_reduce_result, evaluate_distributed, flat_metrics, summarize
from segdist.models import build_model, describe_model, param_groups
from segdist.visualize import confusion_matrix_png, overlays_png

CHECKPOINT_FILE = "checkpoint.pt"
PICTURES_DIR = "evaluation"  # beside the checkpoint: the driver logs them to MLflow
# Read the running loss (a host sync) only this often, to keep the step asynchronous.
LOSS_CHECK_EVERY = 10

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(model: torch.nn.Module, trial: TrialConfig) -> torch.optim.Optimizer:
    train = trial.train
    groups = param_groups(model, lr=train.lr, head_lr_mult=train.head_lr_mult, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float):
    """lr = base_lr * (1 - step / total_steps) ** power, per parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total_steps) ** power
    )


def batches_per_epoch(num_samples: int, trial: TrialConfig, world_size: int) -> int:
    """One epoch = `epoch_scale` passes over the training list, split over all ranks."""
    global_batch = trial.train.batch_size * world_size
    return max(1, math.ceil(trial.train.epoch_scale * num_samples / global_batch))


def largest_image_size(shard_dir: str) -> tuple[int, int]:
    """(height, width) of the largest training image, from the shards' manifest."""
    import pyarrow.fs
    import pyarrow.parquet

    if "://" in shard_dir:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(shard_dir)
    else:
        filesystem, path = pyarrow.fs.LocalFileSystem(), shard_dir
    table = pyarrow.parquet.read_table(f"{path}/manifest.parquet", columns=["height", "width"],
                                       filesystem=filesystem)
    return max(table.column("height").to_pylist()), max(table.column("width").to_pylist())


def crop_and_scale(trial: TrialConfig, full_image: bool):
    """The variant's `full` token trains on whole images (the original: Cityscapes
    1024x2048 at batch 1, flip only): crop = the largest image, no random resize."""
    if full_image:
        return largest_image_size(trial.data.train_shards), (1.0, 1.0), 0.0
    return trial.train.crop_size, trial.train.scale_range, trial.train.aspect_jitter


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on hard labels (255 ignored) or, for edgemix, on soft targets
    (void pixels carry an all-zero target and are left out of the mean)."""
    logits = logits.float()
    if targets.dtype == torch.int64:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    per_pixel = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    valid = targets.sum(dim=1) > 0
    return per_pixel[valid].sum() / valid.sum().clamp(min=1)


def resolve_precision(train: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for this device. `precision: auto` is bf16 autocast +
    channels_last on CUDA (tensor cores; BN and the loss stay fp32) and fp32 elsewhere: on
    CPU bf16 is only fast where the cores have bf16 instructions (see bench train), so it is
    asked for explicitly."""
    if train.precision == "auto":
        cuda = device.type == "cuda"
        return cuda, cuda or train.channels_last
    return train.precision == "bf16", train.channels_last


@dataclass
class StepOptions:
    device: torch.device
    needs_edges: bool = False
    bf16: bool = False
    channels_last: bool = False
    skip_nan_steps: bool = False


@dataclass
class EpochStats:
    mean_loss: float
    steps: int
    skipped_steps: int


def train_one_epoch(model, loader, optimizer, scheduler, options: StepOptions, epoch: int) -> EpochStats:
    """One epoch. A non-finite loss raises TrainingDiverged at once, or, with
    `skip_nan_steps`, drops that step (its gradients, all-reduced, are non-finite on
    every rank alike) and counts it."""
    model.train()
    device = options.device
    running = torch.zeros((), device=device)
    steps = skipped = 0
    for batch_images, batch_targets in loader:
        images, edges = model_inputs(batch_images, device, channels_last=options.channels_last,
                                     edges=options.needs_edges)
        targets = model_targets(batch_targets, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
            logits = model(images, edges) if edges is not None else model(images)
        loss = segmentation_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        steps += 1
        if options.skip_nan_steps:
            # Needs a host sync every step; only paid when the option is on.
            if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                continue
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        if not options.skip_nan_steps and steps % LOSS_CHECK_EVERY == 0 and not torch.isfinite(running):
            raise TrainingDiverged(f"loss is not finite in epoch {epoch} by step {steps}")
    mean_loss = float(running) / max(steps - skipped, 1)
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"loss is not finite in epoch {epoch}")
    return EpochStats(mean_loss, steps, skipped)


def run_evaluation(model, loader, classes, options: StepOptions, eval_config=None, crop_size=None,
                   examples: int = 0):
    """Evaluate on every rank's share and all-reduce: whole-image by default, or with the
    study's multi-scale / flip / boundary settings (tiles of the training crop size)."""
    kwargs = {}
    if eval_config is not None:
        kwargs = dict(scales=eval_config.scales, flip=eval_config.flip,
                      boundary_kernels=eval_config.boundary_kernels, tile_size=crop_size)
    # Whole validation images come in many sizes: cuDNN's autotuning (on for the fixed-size
    # training crops) would search again for every new size.
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        result = evaluate_distributed(
            model, loader, len(classes), options.device, examples=examples,
            amp_dtype=torch.bfloat16 if options.bf16 else None, channels_last=options.channels_last, **kwargs,
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark
    examples_of_this_rank = result.examples
    result = all_reduce_result(result)
    return summarize(result, classes), result.confusion.cpu(), examples_of_this_rank


def evaluation_pictures(confusion, examples, classes) -> dict[str, bytes]:
    pictures = {"confusion.png": confusion_matrix_png(confusion, classes)}
    if examples:
        pictures["overlays.png"] = overlays_png(examples, classes)
    return pictures


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def fit(
    trial: TrialConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    report: Report,
    resume: dict[str, Any] | None = None,
) -> None:
    """Train `trial` on this rank. `report(metrics, state)` is called once per epoch on
    every rank; `state` (a checkpoint dict) is given on rank 0 only."""
    started = time.time()
    torch.manual_seed(trial.train.seed)
    train_info = read_dataset_info(trial.data.train_shards)
    val_info = read_dataset_info(trial.data.val_shards)
    classes = train_info.classes
    num_classes = len(classes)

    model = build_model(trial.model, num_classes).to(device)
    variant = model.variant
    model_info = describe_model(model, num_classes, input_size=trial.train.crop_size) if rank == 0 else {}
    # FPN/GCN decoders always run at output stride 32, whatever the config says.
    model_info["output_stride"] = model.output_stride
    model_info["resize_backend"] = RESIZE_BACKEND  # how crops are resampled: part of what a seed means
    bf16, channels_last = resolve_precision(trial.train, device)
    model_info["precision"] = "bf16" if bf16 else "fp32"  # what `auto` became on this device
    model_info["channels_last"] = channels_last
    options = StepOptions(
        device=device,
        needs_edges=model.needs_edges,
        bf16=bf16,
        channels_last=channels_last,
        skip_nan_steps=trial.train.on_nan == "skip",
    )
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # training crops have one size: cuDNN picks its fastest kernels once
        torch.backends.cudnn.benchmark = True
    ddp_model = (
        # Gradients live in the all-reduce buckets: no copy per step.
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                gradient_as_bucket_view=True)
        if world_size > 1
        else model
    )
    steps_per_epoch = batches_per_epoch(train_info.num_samples, trial, world_size)
    optimizer = make_optimizer(model, trial)
    scheduler = poly_schedule(optimizer, trial.train.epochs * steps_per_epoch, trial.train.poly_power)

    start_epoch = 0
    # Every epoch's metrics travel with the checkpoints, so a resumed trial can hand the
    # tracker epochs the driver may never have logged (it can die after a checkpoint).
    history: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = resume["epoch"] + 1
        history = list(resume.get("history", []))

    validation = val_loader(
        val_info, rank=rank, world_size=world_size, loader_workers=trial.data.loader_workers,
        edges=options.needs_edges, on_bad_sample=trial.train.on_bad_sample,
    )
    crop_size, scale_range, aspect_jitter = crop_and_scale(trial, variant.full)
    for epoch in range(start_epoch, trial.train.epochs):
        epoch_start = time.time()
        loader = train_loader(
            train_info,
            batch_size=trial.train.batch_size,
            batches_per_epoch=steps_per_epoch,
            crop_size=crop_size,
            scale_range=scale_range,
            aspect_jitter=aspect_jitter,
            seed=trial.train.seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            loader_workers=trial.data.loader_workers,
            shuffle_buffer=trial.data.shuffle_buffer,
            label_mode=variant.label_mode,
            edgemix_radius=variant.edgemix_radius,
            edges=options.needs_edges,
            on_bad_sample=trial.train.on_bad_sample,
        )
        stats = train_one_epoch(ddp_model, loader, optimizer, scheduler, options, epoch)
        train_time = time.time() - epoch_start
        last_epoch = epoch == trial.train.epochs - 1
        summary, confusion, examples = run_evaluation(model, validation, classes, options,
                                                      examples=4 if last_epoch and rank == 0 else 0)
        metrics = {"epoch": epoch, **flat_metrics(summary, prefix="val_")}
        pictures = None
        if last_epoch:
            # The study's evaluation (MSF, flip, boundary statistics) once, at the end; a
            # whole-image study reuses the pass above. Reports aggregate these final_* values.
            if trial.eval != EvalConfig():
                summary, confusion, examples = run_evaluation(
                    model, validation, classes, options, trial.eval, trial.train.crop_size,
                    examples=4 if rank == 0 else 0)
            metrics.update(flat_metrics(summary, prefix="final_"))
            pictures = evaluation_pictures(confusion, examples, classes) if rank == 0 else None
        counts = all_reduce_sum(torch.tensor(
            [loader.num_skipped, validation.num_skipped, stats.skipped_steps], dtype=torch.int64, device=device
        ))
        metrics.update({
            "train_loss": all_reduce_mean(stats.mean_loss, device),
            "lr": optimizer.param_groups[0]["lr"],
            "skipped_train_samples": int(counts[0]),
            "skipped_val_samples": int(counts[1]),
            "skipped_nan_steps": int(counts[2]),
            "train_images_per_s": steps_per_epoch * trial.train.batch_size * world_size / train_time,
            "epoch_time_s": time.time() - epoch_start,
            "worker_started_at": started,
        })
        if rank == 0 and epoch == start_epoch:
            metrics.update({f"model_{key}": value for key, value in model_info.items()})
            if history:
                metrics["resumed_history_json"] = json.dumps(history)
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        state = None
        if rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "classes": list(classes),
                "trial": dataclasses.asdict(trial),
                "metrics": metrics,
                "history": history,
                "pictures": pictures,
            }
        report(metrics, state)


def all_reduce_mean(value: float, device) -> float:
    tensor = all_reduce_sum(torch.tensor(value, dtype=torch.float64, device=device))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return float(tensor) / world


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: resume from Ray's checkpoint, report through Ray."""
    import ray.train
    import ray.train.torch

    trial = trial_from_dict(config["trial"])
    torch.set_num_threads(trial.resources.cpus_per_worker)
    context = ray.train.get_context()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, png in (state.pop("pictures", None) or {}).items():
                (Path(directory) / PICTURES_DIR).mkdir(exist_ok=True)
                (Path(directory) / PICTURES_DIR / name).write_bytes(png)
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(
        trial,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        resume=resume,
    )
