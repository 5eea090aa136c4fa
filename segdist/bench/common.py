"""What more than one section of the bench uses: the quick start's trial and generated
shards, the set-up every training section measures (segdist.train.training_setup), its
timed steps (segdist.train.train_one_epoch) and a fixed in-memory batch."""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segdist.config import TrialConfig
    from segdist.train import Setup

QUICKSTART = Path(__file__).resolve().parent.parent.parent / "tune_spaces" / "quickstart.yaml"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_timed_rounds(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Samples per CPU-second of each fn, in turns (a warm-up pass each first)."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            n = fn()
            rates[name].append(n / max(time.process_time() - start, 1e-9))
    return rates


def synthetic_shards(tmp: str, n_train: int, min_size: int, max_size: int, name: str = "synthetic") -> str:
    """Generate the synthetic VOC-layout set in tmp and shard its train split; the shard dir."""
    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.shard_writer import build_from_source
    from segdist.data.synthetic import write_synthetic_voc
    from segdist.data.voc import VocSource

    root = os.path.join(tmp, name)
    write_synthetic_voc(root, seed=0, n_train=n_train, n_val=1, min_size=min_size, max_size=max_size)
    shard_dir = os.path.join(tmp, f"{name}-shards", "train")
    classes = DATASET_CLASSES["synthetic"]
    build_from_source(VocSource(root, "train", classes), shard_dir, dataset="synthetic", classes=classes,
                      shard_size=64, workers=1)
    return shard_dir


def quickstart_trial(train_shards: str | None = None) -> TrialConfig:
    """The first trial of tune_spaces/quickstart.yaml (its model, crop, batch, loader
    workers, cpus per worker), reading `train_shards` when given."""
    from segdist.config import expand_trials, load_study

    trial = expand_trials(load_study(QUICKSTART))[0]
    if train_shards is not None:
        trial = dataclasses.replace(
            trial, data=dataclasses.replace(trial.data, train_shards=train_shards, val_shards=train_shards)
        )
    return trial


def big_trial(base: TrialConfig, depth: int, width: int, batch: int = 2, crop: int = 321) -> TrialConfig:
    """`base` with the DeepLab-protocol naked ResNet (output stride 8) the bench measures."""
    from segdist.resolve import resolve_recipe

    recipe = resolve_recipe({
        "model.variant": "naked", "model.depth": depth, "model.width": width, "model.output_stride": 8,
        "train.batch_size": batch, "train.crop_size": (crop, crop), "train.lr": 2.5e-4,
    }, "deeplab", "bench")
    return dataclasses.replace(base, recipe=recipe)


def with_train(trial: TrialConfig, **changes: Any) -> TrialConfig:
    """`trial` with fields of its recipe's train part replaced (precision, channels_last,
    batch_size, crop_size, ...)."""
    train = dataclasses.replace(trial.recipe.train, **changes)
    return dataclasses.replace(trial, recipe=dataclasses.replace(trial.recipe, train=train))


def bench_setup(trial: TrialConfig, num_classes: int, num_samples: int, *, device=None, rank: int = 0,
                world_size: int = 1) -> Setup:
    """segdist.train.training_setup of `trial` as `fit` makes it (torch seeded with the trial's
    seed first, so every set-up of one trial starts from the same weights): the recipe's model,
    optimizer, schedule (over `num_samples` per epoch), precision, L2 term, NaN rule and host
    flag group."""
    import torch

    from segdist.train import training_setup

    torch.manual_seed(trial.seed)
    return training_setup(trial, num_classes, num_samples, rank=rank, world_size=world_size,
                          device=device or torch.device("cpu"))


class TimedLoader:
    """Wraps a loader: when each batch was handed to the step (`starts`, perf_counter), how
    long the step loop waited for it (`waits`), and the wall clock of the first hand-out."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.starts: list[float] = []
        self.cpu: list[float] = []  # this process's CPU time (all its threads) at each hand-out
        self.waits: list[float] = []
        self.first_at: float | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            got = time.perf_counter()
            if self.first_at is None:
                self.first_at = time.time()
            self.waits.append(got - asked)
            self.starts.append(got)
            self.cpu.append(time.process_time())
            yield batch

    def steady(self, end: float, warmup: int, images_per_step: int, end_cpu: float | None = None) -> dict[str, float]:
        """Throughput from the hand-out of batch `warmup` to `end` (after the last step):
        images/s over the whole window, the median step time, the data-wait fraction and,
        with `end_cpu`, this process's CPU seconds per step."""
        n = len(self.starts)
        if n == 0:
            raise RuntimeError("the loader gave no batch")
        w = min(max(warmup, 0), n - 1)
        elapsed = end - self.starts[w]
        steps = n - w
        bounds = self.starts[w:] + [end]
        durations = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        out = {
            "img_per_s": steps * images_per_step / elapsed,
            "step_s": elapsed / steps,
            "median_step_s": statistics.median(durations),
            "min_step_s": min(durations),
            "data_wait_fraction": sum(self.waits[w + 1 :]) / elapsed,
            "timed_steps": steps,
        }
        if end_cpu is not None and self.cpu:
            out["cpu_s_per_step"] = (end_cpu - self.cpu[w]) / steps
        return out


def run_steps(run: Setup, loader, warmup: int, images_per_step: int) -> dict[str, Any]:
    """segdist.train.train_one_epoch of `run` (bench_setup) over `loader`, timed: the
    steady-state figures after `warmup` steps, and the wall clock of the first step."""
    from segdist.train import train_one_epoch

    timed = TimedLoader(loader)
    train_one_epoch(run.net, timed, run.optimizer, run.scheduler, run.options, epoch=0)
    end, end_cpu = time.perf_counter(), time.process_time()
    result = timed.steady(end, warmup, images_per_step, end_cpu)
    result["first_step_at"] = timed.first_at
    return result


def fixed_batches(batch: int, size, classes: int, steps: int, device=None):
    """The same random batch `steps` times (a loader with no data cost), in train_loader's
    format (uint8 [B, h, w, 4] images, uint8 targets, every pixel labelled); size S or (h, w)."""
    import torch

    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, h, w, 4), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, classes, (batch, h, w), generator=g, dtype=torch.uint8)
    if device is not None:
        images, targets = images.to(device), targets.to(device)
    return [(images, targets)] * steps


def train_flops_per_image(model, size: int, classes: int) -> float:
    """FLOPs of one forward + backward (loss included) of a 1x3xSxS image, counted by
    torch.utils.flop_counter on a meta-device copy (nothing is computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segdist.train import segmentation_loss

    module = getattr(model, "module", model)
    meta = copy.deepcopy(module).to("meta").train()
    images = torch.zeros(1, 3, size, size, device="meta")
    targets = torch.zeros(1, size, size, dtype=torch.int64, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss = segmentation_loss(meta(images), targets)
        loss.backward()
    return float(counter.get_total_flops())
