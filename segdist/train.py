"""The per-worker training loop of a recipe: its optimiser, schedule and gradient rules
(segdist.optim), an all-reduced validation confusion matrix every epoch, the recipe's final
evaluation, checkpoints and a NaN guard.

`fit` knows nothing about Ray: it takes a rank, a world size and a `report` function. Ray
Train runs it (`ray_train_loop`, started by segdist.tune), and so do the tests. The benchmark
(segdist.bench) does not run `fit`: it builds the same set-up (`training_setup`, and
`epoch_loader` for the data) and times `train_one_epoch` over a fixed number of steps,
without evaluation or checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from segdist.config import TrialConfig, trial_from_dict
from segdist.data.batch import model_inputs, model_targets
from segdist.data.classes import IGNORE_INDEX
from segdist.data.stream import DatasetInfo, StreamLoader, read_dataset_info, train_loader, val_loader
from segdist.data.transforms import RESIZE_BACKEND, TrainTransform
from segdist.distributed import all_reduce_mean, all_reduce_sum, any_rank, host_group
from segdist.epoch_report import EpochReport, Fact
from segdist.evaluation.checkpoint import CHECKPOINT_FILE
from segdist.evaluation.loop import evaluate_split
from segdist.evaluation.results import all_reduce_result, flat_metrics, summarize
from segdist.evaluation.sinks import ExampleCollector
from segdist.models import build_model, describe_recipe
from segdist.optim import apply_gradient_rules, lr_factor, lr_schedule, make_optimizer, weight_decay_at
from segdist.recipe import EvalRecipe, TrainRecipe

PICTURES_DIR = "evaluation"  # beside the checkpoint: the driver logs them to MLflow
# Read the running loss (a host sync) only this often, to keep the step asynchronous.
LOSS_CHECK_EVERY = 10

Report = Callable[[EpochReport, dict[str, Any] | None], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite in epoch `epoch` (every rank raises it at the same step)."""

    def __init__(self, epoch: int, message: str):
        super().__init__(message)
        self.epoch = epoch


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of a batch: hard int64 [B, h, w] labels
    (255 = void) or, for edgemix, soft float32 [B, C, h, w] targets (void pixels carry an
    all-zero target). Logits: [B, C, h, w], any float dtype (computed in float32). A batch
    with no labelled pixel gives 0, with gradients (all zero) to every logit, not 0/0 = NaN:
    a DDP rank whose crops are all void still joins the gradient all-reduce."""
    logits = logits.float()
    if targets.dtype == torch.int64:
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    per_pixel = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    valid = targets.sum(dim=1) > 0
    return per_pixel[valid].sum() / valid.sum().clamp(min=1)


def has_labelled_pixels(targets: torch.Tensor) -> bool:
    """Whether a training batch as the loader ships it (host memory: uint8 [B, h, w] with 255
    = void, or soft float32 [B, C, h, w] with all-zero = void) has a labelled pixel. Read on
    the host, so asking costs no device synchronisation."""
    if targets.dtype == torch.uint8:
        return bool((targets != IGNORE_INDEX).any())
    return bool((targets > 0).any())


def resolve_precision(train: TrainRecipe, device: torch.device) -> tuple[bool, bool]:
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
    train: TrainRecipe | None = None  # its weight-decay schedule (None: no L2 term, multipliers only)
    flag_group: Any = None  # host_group(): where the ranks agree that a step is all void


@dataclass
class EpochStats:
    mean_loss: float  # over the steps that updated the model
    steps: int  # every step of the epoch, skipped ones included
    skipped_steps: int  # non-finite gradients, with skip_nan_steps
    void_steps: int = 0  # no labelled pixel on any rank: nothing to learn, the model is left alone


def train_one_epoch(model, loader, optimizer, scheduler, options: StepOptions, epoch: int) -> EpochStats:
    """One epoch: per step the loss, its gradients, the recipe's L2 term and multipliers
    (segdist.optim.apply_gradient_rules), the optimizer and the schedule. A non-finite loss
    (checked every LOSS_CHECK_EVERY steps and at the end, agreed over the ranks so that all
    raise together) raises TrainingDiverged, or, with `skip_nan_steps`, drops that step (its
    gradients, all-reduced, are non-finite on every rank alike) and counts it.

    A step whose crops have no labelled pixel on any rank (all void: small crops at image
    borders, trimap bands, Cityscapes) is skipped and counted in `void_steps`: no forward
    pass, no update, no weight decay; the schedule still advances, as it counts iterations.
    A rank that is all void while others are not contributes zero gradients (its loss is 0)
    to DDP's average, each rank's loss being the mean over its own labelled pixels. (The
    original's loss was 0/0 = NaN for an all-void tower; this is segdist's fix.)"""
    model.train()
    device = options.device
    running = torch.zeros((), device=device)
    steps = skipped = void = 0
    for batch_images, batch_targets in loader:
        if not any_rank(has_labelled_pixels(batch_targets), options.flag_group):
            steps += 1
            void += 1
            _advance_without_update(scheduler)
            continue
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
                _advance_without_update(scheduler)
                continue
        decay = weight_decay_at(options.train, scheduler.last_epoch) if options.train is not None else 0.0
        apply_gradient_rules(optimizer, decay)
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        if (not options.skip_nan_steps and steps % LOSS_CHECK_EVERY == 0
                and any_rank(not bool(torch.isfinite(running)), options.flag_group)):
            raise TrainingDiverged(epoch, f"loss is not finite in epoch {epoch} by step {steps}")
    mean_loss = float(running) / max(steps - skipped - void, 1)
    if any_rank(not math.isfinite(mean_loss), options.flag_group):
        raise TrainingDiverged(epoch, f"loss is not finite in epoch {epoch}")
    return EpochStats(mean_loss, steps, skipped, void)


def _advance_without_update(scheduler) -> None:
    """One schedule step for a skipped iteration. PyTorch warns when a schedule steps before
    its optimizer ever has; here that is what is meant (the schedule counts iterations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


WHOLE_IMAGE = EvalRecipe(scales=(1.0,), flip=False, tile=None, boundary_kernels=())


def run_evaluation(model, loader, classes, options: StepOptions, evaluation: EvalRecipe = WHOLE_IMAGE,
                   examples: int = 0):
    """Evaluate on every rank's share and all-reduce, with `evaluation`'s scales, flip, tiles
    and boundary kernels (default: the whole image, once)."""
    kwargs = dict(scales=evaluation.scales, flip=evaluation.flip, boundary_kernels=evaluation.boundary_kernels,
                  tile_size=evaluation.tile)
    # Whole validation images come in many sizes: cuDNN's autotuning (on for the fixed-size
    # training crops) would search again for every new size.
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    pictures = ExampleCollector(examples)
    try:
        result = evaluate_split(
            model, loader, len(classes), options.device, sink=pictures,
            amp_dtype=torch.bfloat16 if options.bf16 else None, channels_last=options.channels_last, **kwargs,
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark
    result = all_reduce_result(result)
    return summarize(result, classes), result.confusion.cpu(), pictures.examples


def evaluation_pictures(confusion, examples, classes) -> dict[str, bytes]:
    from segdist.visualize import confusion_matrix_png, overlays_png  # matplotlib: last epoch, rank 0 only

    pictures = {"confusion.png": confusion_matrix_png(confusion, classes)}
    if examples:
        pictures["overlays.png"] = overlays_png(examples, classes)
    return pictures


@dataclass
class Setup:
    """What one rank trains with, built from the recipe (`training_setup`)."""

    model: torch.nn.Module  # the bare model (checkpoints, evaluation)
    net: torch.nn.Module  # what the loop calls: DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    options: StepOptions
    steps_per_epoch: int
    facts: dict[str, Fact]  # what this device and these weights made of the recipe (EpochReport.facts)


def model_facts(trial: TrialConfig, num_classes: int) -> dict[str, Fact]:
    """The static facts of what `trial` trains, for the record (MLflow params model_<name>):
    params, size_mb, gflops (one forward of a crop-sized image), output_stride
    (models.describe_recipe) and resize_backend. Computed in the driver from the recipe alone,
    once per configuration; what the device and weights make of it is in Setup.facts."""
    recipe = trial.recipe
    return {**describe_recipe(recipe.model, num_classes, recipe.train.crop_size),
            "resize_backend": RESIZE_BACKEND}  # how crops are resampled: part of what a seed means


def training_setup(trial: TrialConfig, num_classes: int, num_samples: int, *, rank: int, world_size: int,
                   device: torch.device) -> Setup:
    """Model, optimizer, schedule and step options of `trial`'s recipe on this rank."""
    recipe = trial.recipe
    model = build_model(recipe.model, num_classes).to(device)
    facts: dict[str, Fact] = {"pretrained_sha256": model.pretrained_sha256 or "-"}
    bf16, channels_last = resolve_precision(recipe.train, device)
    facts["precision"] = "bf16" if bf16 else "fp32"  # what `auto` became on this device
    facts["channels_last"] = channels_last
    options = StepOptions(device=device, needs_edges=model.needs_edges, bf16=bf16, channels_last=channels_last,
                          skip_nan_steps=recipe.train.on_nan == "skip", train=recipe.train,
                          flag_group=host_group())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # training crops have one size: cuDNN picks its fastest kernels once
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32 (as TF 1.4 trained): no TF32 convolutions or matmuls, PyTorch's default
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bf16
    facts["tf32"] = device.type == "cuda" and bf16
    net = model
    if world_size > 1:  # gradients live in the all-reduce buckets: no copy per step
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    steps = recipe.steps_per_epoch(num_samples, world_size)
    optimizer = make_optimizer(model, recipe.train)
    return Setup(model, net, optimizer, lr_schedule(optimizer, recipe.train, steps), options, steps, facts)


def epoch_loader(trial: TrialConfig, info: DatasetInfo, run: Setup, epoch: int, *, rank: int, world_size: int,
                 batches: int | None = None) -> StreamLoader:
    """Epoch `epoch`'s training batches of `trial` on this rank for `run` (training_setup):
    the recipe's transform (with the edge map when the model takes one), batch size and
    bad-sample rule; the trial's seed, loader workers and shuffle buffer; `batches` of them
    (default: the set-up's steps per epoch)."""
    train = trial.recipe.train
    return train_loader(
        info, transform=TrainTransform.from_recipe(train, info.num_classes, run.options.needs_edges),
        batch_size=train.batch_size, batches_per_epoch=run.steps_per_epoch if batches is None else batches,
        seed=trial.seed, epoch=epoch, rank=rank, world_size=world_size, loader_workers=trial.data.loader_workers,
        shuffle_buffer=trial.data.shuffle_buffer, on_bad_sample=train.on_bad_sample,
    )


def _evaluate(run: Setup, validation, classes, evaluation: EvalRecipe, last_epoch: bool, rank: int):
    """This epoch's whole-image scores (val_*) and, at the last epoch, the recipe's evaluation
    (final_*: scales, flip, tiles, boundary statistics; a whole-image recipe reuses the pass)
    with its pictures (rank 0). Returns (metrics, pictures or None)."""
    summary, confusion, examples = run_evaluation(run.model, validation, classes, run.options,
                                                  examples=4 if last_epoch and rank == 0 else 0)
    metrics = flat_metrics(summary, prefix="val_")
    if not last_epoch:
        return metrics, None
    if evaluation != WHOLE_IMAGE:
        summary, confusion, examples = run_evaluation(run.model, validation, classes, run.options, evaluation,
                                                      examples=4 if rank == 0 else 0)
    metrics.update(flat_metrics(summary, prefix="final_"))
    return metrics, evaluation_pictures(confusion, examples, classes) if rank == 0 else None


def _checkpoint(run: Setup, trial: TrialConfig, epoch: int, classes, history, pictures) -> dict[str, Any]:
    """What rank 0 saves after an epoch (the resume of a trial reads it back). history:
    (epoch, metrics) of every epoch so far, this one included."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "classes": list(classes),
        "trial": dataclasses.asdict(trial),
        "history": history,
        "pictures": pictures,
    }


def fit(
    trial: TrialConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    report: Report,
    resume: dict[str, Any] | None = None,
) -> None:
    """Train `trial` on this rank. `report(epoch_report, state)` is called once per epoch on
    every rank; `state` (a checkpoint dict) is given on rank 0 only. `resume`: a checkpoint
    dict (`_checkpoint`) to continue from, at the epoch after its own; one of the last epoch
    trains nothing and reports that epoch once more (`report_final_again`)."""
    started = time.time()
    recipe, train = trial.recipe, trial.recipe.train
    if resume is not None and resume["epoch"] >= train.epochs - 1:
        report_final_again(resume, rank, started, report)
        return
    torch.manual_seed(trial.seed)
    train_info = read_dataset_info(trial.data.train_shards)
    val_info = read_dataset_info(trial.data.val_shards)
    classes = train_info.classes
    run = training_setup(trial, len(classes), train_info.num_samples, rank=rank, world_size=world_size,
                         device=device)
    start_epoch = 0
    # Every epoch's metrics travel with the checkpoints, so a resumed trial can hand the
    # tracker epochs the driver may never have logged (it can die after a checkpoint).
    history: list[tuple[int, dict[str, float]]] = []
    if resume is not None:
        for part in ("model", "optimizer", "scheduler"):
            getattr(run, part).load_state_dict(resume[part])
        start_epoch, history = resume["epoch"] + 1, list(resume["history"])

    validation = val_loader(
        val_info, rank=rank, world_size=world_size, loader_workers=trial.data.loader_workers,
        edges=run.options.needs_edges, on_bad_sample=train.on_bad_sample,
    )
    for epoch in range(start_epoch, train.epochs):
        epoch_start = time.time()
        loader = epoch_loader(trial, train_info, run, epoch, rank=rank, world_size=world_size)
        stats = train_one_epoch(run.net, loader, run.optimizer, run.scheduler, run.options, epoch)
        train_time = time.time() - epoch_start
        scores, pictures = _evaluate(run, validation, classes, recipe.eval, epoch == train.epochs - 1, rank)
        counts = all_reduce_sum(torch.tensor(
            [loader.num_skipped, validation.num_skipped, stats.skipped_steps, stats.void_steps], dtype=torch.int64,
            device=device,
        ))
        metrics = {
            **scores,
            "train_loss": all_reduce_mean(stats.mean_loss, device),
            "lr": train.lr * lr_factor(train, run.scheduler.last_epoch - 1, run.steps_per_epoch),  # the last step's
            "skipped_train_samples": int(counts[0]),
            "skipped_val_samples": int(counts[1]),
            "skipped_nan_steps": int(counts[2]),
            "skipped_void_steps": int(counts[3]) // world_size,  # every rank counts the same steps
            "train_images_per_s": run.steps_per_epoch * train.batch_size * world_size / train_time,
            "epoch_time_s": time.time() - epoch_start,
        }
        first = rank == 0 and epoch == start_epoch
        epoch_report = EpochReport(epoch, metrics, facts=run.facts if first else {},
                                   history=history if first else [], worker_started_at=started,
                                   pictures=pictures is not None)
        history = [*history, (epoch, metrics)]
        state = _checkpoint(run, trial, epoch, classes, history, pictures) if rank == 0 else None
        report(epoch_report, state)


def report_final_again(resume: dict[str, Any], rank: int, started: float, report: Report) -> None:
    """A trial resumed from the checkpoint of its last epoch (its driver died after that
    checkpoint, before the trial's end was recorded): report that epoch again, from the
    checkpoint's history, so that Tune and the tracker get the trial's final result (a trial
    that never reports is an error to Tune). Rank 0 sends the earlier epochs as history and
    the checkpoint once more (`resume`, with its `pictures` if the loader read them back),
    other ranks the metrics alone."""
    (epoch, metrics), earlier = resume["history"][-1], list(resume["history"][:-1])
    if rank != 0:
        report(EpochReport(epoch, metrics, worker_started_at=started), None)
        return
    report(EpochReport(epoch, metrics, history=earlier, worker_started_at=started,
                       pictures=bool(resume.get("pictures"))), dict(resume))


def read_resume_state(checkpoint, rank: int) -> dict[str, Any] | None:
    """The `_checkpoint` dict in a Ray checkpoint, with the pictures saved beside it (bytes by
    file name, or None), or None when it cannot be read (a truncated or deleted file on the
    storage): then the trial trains again from epoch 0, which gives the same epochs (the seed
    fixes the data order) and logs none twice, and rank 0 says so in one warning line naming
    the file. Failing the trial instead would lose it for good: its study would end, and a
    finished study cannot be resumed."""
    with checkpoint.as_directory() as directory:
        path = Path(directory) / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a torn file raises RuntimeError, EOFError, pickle errors...
            if rank == 0:
                reason = str(err).splitlines()[0].split(". ")[0][:200] if str(err) else type(err).__name__
                where = f"{checkpoint.path}/{CHECKPOINT_FILE}"
                # sys.stderr itself: Ray Train's patched print would say it twice (tee + log).
                sys.stderr.write(f"segdist: warning: checkpoint {where} cannot be read ({reason}); "
                                 "training this trial again from epoch 0\n")
                sys.stderr.flush()
            return None
        pictures = Path(directory) / PICTURES_DIR
        state["pictures"] = {p.name: p.read_bytes() for p in pictures.iterdir()} if pictures.is_dir() else None
    return state


def quiet_train_reports() -> None:
    """Keep Ray Train's "Reporting training result ..." line (every report of every worker,
    about 1,000 characters) off the console: its logger is named after its file, not under
    `ray.train`, so RunConfig's LoggingConfig level does not reach it (Ray 2.60)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: resume from Ray's checkpoint, report through Ray. A
    diverged trial ends with a report that says so (EpochReport.diverged), not an error: Ray
    Train would retry an error from the last checkpoint, where the same data diverges again."""
    import ray.train
    import ray.train.torch

    quiet_train_reports()
    trial = trial_from_dict(config["trial"])
    torch.set_num_threads(trial.recipe.resources.cpus_per_worker)
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    resume = None if checkpoint is None else read_resume_state(checkpoint, context.get_world_rank())

    def report(epoch_report: EpochReport, state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(epoch_report.result())
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, png in (state.pop("pictures", None) or {}).items():
                (Path(directory) / PICTURES_DIR).mkdir(exist_ok=True)
                (Path(directory) / PICTURES_DIR / name).write_bytes(png)
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(epoch_report.result(), checkpoint=ray.train.Checkpoint.from_directory(directory))

    try:
        fit(trial, rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=ray.train.torch.get_device(), report=report, resume=resume)
    except TrainingDiverged as err:  # every rank raises it at the same step: every rank reports
        report(EpochReport(err.epoch, {"val_miou": math.nan, "train_loss": math.nan}, diverged=str(err)), None)
