"""python -m segdist.bench: performance figures as JSON, also logged to MLflow.

Subcommands (one function pair each: `_add_<name>(subparsers)` builds its parser,
`_run_<name>(args) -> dict` measures; add new ones to SUBCOMMANDS):

    data   samples per second per core: shards (read + decode + augment), the same samples
           from the raw VOC-layout folder with the same transforms, and bare JPEG + PNG
           decode of the same files (the limit)
    train  DeepLabv2 ResNet-101 `naked` at 321x321, batch 2, forward + backward + SGD step
           (segdist.train.train_one_epoch) in fp32 and bf16 autocast: images/s, FLOPs per
           image (torch.utils.flop_counter), achieved GFLOP/s against a matmul roofline
           measured in the same run; and the quick start's step (its own model, crop and
           batch, one thread) with the real loader: step rate and data-wait fraction
    ray    the quick start's training loop, same data, a fixed number of steps, under Ray
           Train (TorchTrainer, 2 workers, gloo) and under plain torch.distributed (gloo,
           2 processes, no Ray): steady-state throughput ratio and trial start-up time
    scale  the same loop on 1 and on 2 plain torch.distributed workers: scaling efficiency
    gpu    (CUDA only) ResNet-101 `naked` at 321 and 513: images/s, MFU against the
           device's peak from a table, peak memory, for fp32, bf16 + channels_last and
           bf16 + channels_last + torch.compile
    all    every section in one JSON object, with the targets checked

All figures are measured on this machine when the command runs; nothing is hard-coded
except the GPU peak table (vendor data sheet numbers, named in the output). Every run is
also an MLflow run of the experiment "segdist-bench" (params: versions, CPU, cores,
device, settings; metrics: the figures; the JSON as an artifact) unless --no-mlflow.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segdist.errors import SegdistError, exit_on_user_error

BENCH_EXPERIMENT = "segdist-bench"
QUICKSTART = Path(__file__).resolve().parent.parent / "tune_spaces" / "quickstart.yaml"

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the
# device name torch reports. fp32 = the CUDA-core FP32 peak; tf32 = the tensor-core
# TF32 peak (what cuDNN convolutions use in "fp32" while TF32 is allowed).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
}


def gpu_peak(name: str) -> tuple[str, dict[str, float]] | None:
    """(table row, peaks) for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    upper = name.upper()
    if "H200" in upper:
        return "H200", GPU_PEAK_TFLOPS["H200"]
    if "H100" in upper:
        row = "H100 PCIe" if "PCIE" in upper else "H100 NVL" if "NVL" in upper else "H100 SXM"
        return row, GPU_PEAK_TFLOPS[row]
    for row in ("A100", "L40S", "L4"):
        if row in upper.split() or f" {row}" in f" {upper}":
            return row, GPU_PEAK_TFLOPS[row]
    return None


def utilisation(flops_per_image: float, images_per_s: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s (flops per image x images/s) over a peak: MFU or a roofline ratio."""
    if peak_flops_per_s <= 0:
        raise ValueError("peak must be positive")
    return flops_per_image * images_per_s / peak_flops_per_s


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict[str, Any]:
    import torch

    flags = _cpu_flags()
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    from segdist.data.transforms import RESIZE_BACKEND, cv2

    info["resize_backend"] = RESIZE_BACKEND
    info["opencv"] = cv2.__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        info["segdist_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["segdist_commit"] = None
    return info


# ----------------------------------------------------------------------------- shared


def _synthetic_shards(tmp: str, n_train: int, min_size: int, max_size: int, name: str = "synthetic") -> str:
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


def quickstart_trial(train_shards: str | None = None):
    """The first trial of tune_spaces/quickstart.yaml (its model, crop, batch, loader
    workers, cpus per worker), reading `train_shards` when given."""
    from segdist.config import expand_trials, load_study

    trial = expand_trials(load_study(QUICKSTART))[0]
    if train_shards is not None:
        trial = dataclasses.replace(
            trial, data=dataclasses.replace(trial.data, train_shards=train_shards, val_shards=train_shards)
        )
    return trial


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


def optimizer_and_schedule(module, trial, total_steps: int):
    """The trial recipe's optimizer (segdist.optim.make_optimizer) with a poly schedule over
    `total_steps`: the bench times steps, whatever schedule the recipe names."""
    import torch

    from segdist.optim import make_optimizer

    optimizer = make_optimizer(module, trial.recipe.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps) ** 0.9)
    return optimizer, scheduler


def run_steps(model, loader, trial, options, warmup: int, images_per_step: int, total_steps: int | None = None):
    """segdist.train.train_one_epoch over `loader` (timed): the steady-state figures."""
    from segdist.train import train_one_epoch

    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    module = getattr(module, "module", module)  # DDP's
    optimizer, scheduler = optimizer_and_schedule(module, trial, total_steps or len(loader))
    timed = TimedLoader(loader)
    train_one_epoch(model, timed, optimizer, scheduler, options, epoch=0)
    end, end_cpu = time.perf_counter(), time.process_time()
    result = timed.steady(end, warmup, images_per_step, end_cpu)
    result["first_step_at"] = timed.first_at
    return result


def _fixed_batches(batch: int, size, classes: int, steps: int, device=None):
    """The same random batch `steps` times (a loader with no data cost), in train_loader's
    format (uint8 [B, h, w, 4] images, uint8 targets); size S or (h, w)."""
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


def matmul_gflops(dtype_name: str, n: int, seconds: float) -> dict[str, float]:
    """Best GFLOP/s of an n x n by n x n matrix product in `dtype_name`, each way torch runs
    one on this CPU, over about `seconds` each: torch.mm (MKL for fp32 where torch has it,
    oneDNN for bf16) and the same product as a 1x1 convolution (oneDNN; on some CPUs, e.g.
    AMD with MKL, far faster than torch.mm in fp32). The roofline is the larger."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    side = 32 if n % 32 == 0 else 1
    x = torch.randn(1, n, side, n // side, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)

    def best(fn) -> float:
        fn()
        top, reps = 0.0, 0
        deadline = time.perf_counter() + seconds
        while reps < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            fn()
            top = max(top, 2.0 * n**3 / (time.perf_counter() - start))
            reps += 1
        return top / 1e9

    return {"mm": best(lambda: torch.mm(a, b)), "conv1x1": best(lambda: F.conv2d(x, w))}


# ----------------------------------------------------------------------------- data


def _add_data(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "data",
        help="data pipeline throughput (samples/s per core)",
        description="Throughput of the data pipeline in one process with one thread (= per core): "
        "shards_per_s (train_loader: tar read + decode + validate + augment, in-process), "
        "folder_per_s (the same samples read with the VOC reader from the folder, same "
        "decode and transforms), decode_limit_per_s (bare JPEG + PNG decode of the same bytes, "
        "already in memory). The three are timed in turns, on this process's CPU time (so other "
        "load on the machine does not count), `--repeats` rounds; medians are reported. "
        "Default data: generated images in the VOC layout at VOC's sizes (sides 375-500) with "
        "the log's VOC augmentation (scale 0.5-1.5, crop 321); --min-size 96 --max-size 128 "
        "--crop 96 --scale-range 0.7 1.5 measures at the quick start's sizes.",
    )
    p.add_argument(
        "--root", default=None, help="VOC-layout folder to read (default: generate the synthetic set)"
    )
    p.add_argument("--split", default="train", help="split of --root (default train)")
    p.add_argument(
        "--dataset", default="synthetic", choices=["synthetic", "voc"], help="class list of --root"
    )
    p.add_argument("--samples", type=int, default=400, help="synthetic images to generate (default 400)")
    p.add_argument("--min-size", type=int, default=375, help="smallest synthetic image side (default 375)")
    p.add_argument("--max-size", type=int, default=500, help="largest synthetic image side (default 500)")
    p.add_argument("--crop", type=int, default=321, help="training crop size (default 321)")
    p.add_argument(
        "--scale-range", type=float, nargs=2, default=(0.5, 1.5), metavar=("LOW", "HIGH"),
        help="random resize range (default 0.5 1.5)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument(
        "--work-dir", default=None, help="where to put generated data and shards (default: a temp dir)"
    )
    return p


def _cpu_timed_rounds(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
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


def _run_data(args) -> dict:
    import torch

    if args.samples < args.batch_size or args.repeats < 1:
        raise SegdistError("--samples must be at least --batch-size and --repeats at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenCV is single-threaded already (segdist/data/__init__.py)
    try:
        return _measure_data(args)
    finally:
        torch.set_num_threads(threads)


def _measure_data(args) -> dict:
    import numpy as np

    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.sample import decode_image, decode_label_png, invalid_label_lut
    from segdist.data.shard_writer import build_from_source
    from segdist.data.stream import decode_sample, iter_shard, make_batches, read_dataset_info, train_loader
    from segdist.data.synthetic import write_synthetic_voc
    from segdist.data.transforms import TrainTransform
    from segdist.data.voc import VocSource

    classes = DATASET_CLASSES[args.dataset]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "synthetic")
            write_synthetic_voc(
                root, seed=0, n_train=args.samples, n_val=1, min_size=args.min_size, max_size=args.max_size
            )
        source = VocSource(root, args.split, classes)
        keys = source.keys()
        shard_dir = os.path.join(tmp, "shards", args.split)
        build_from_source(source, shard_dir, dataset=args.dataset, classes=classes, shard_size=64, workers=1)
        info = read_dataset_info(shard_dir)
        n_batches = info.num_samples // args.batch_size
        transform = TrainTransform(args.crop, tuple(args.scale_range))

        def shards() -> int:
            loader = train_loader(
                info,
                transform=transform,
                batch_size=args.batch_size,
                batches_per_epoch=n_batches,
                seed=0,
                epoch=0,
                rank=0,
                world_size=1,
                loader_workers=0,
            )
            return sum(images.shape[0] for images, _ in loader)

        def folder() -> int:
            def decoded():
                for key in keys[: n_batches * args.batch_size]:
                    sample = source.load(key)  # reads both files, decodes and checks the label
                    yield key, decode_image(sample.image_bytes, key), sample.label

            batches = make_batches(decoded(), transform, args.batch_size, np.random.default_rng(0))
            return sum(images.shape[0] for images, _ in batches)

        def shards_no_augment() -> int:
            lut = invalid_label_lut(info.num_classes)
            n = 0
            for url, size in zip(info.shards, info.shard_sizes, strict=True):
                for sample in iter_shard(url, size):
                    decode_sample(sample, info.num_classes, lut)
                    n += 1
            return n

        raw = [
            (source.image_path(k).read_bytes(), source.label_path(k).read_bytes())
            for k in keys[: n_batches * args.batch_size]
        ]

        def decode_limit() -> int:
            for image_bytes, label_bytes in raw:
                decode_image(image_bytes, "")
                decode_label_png(label_bytes, "")
            return len(raw)

        rates = _cpu_timed_rounds(
            {"shards": shards, "folder": folder, "decode_limit": decode_limit,
             "shards_no_augment": shards_no_augment},
            args.repeats,
        )
        result = {
            "shards_per_s": round(_median(rates["shards"]), 1),
            "folder_per_s": round(_median(rates["folder"]), 1),
            "decode_limit_per_s": round(_median(rates["decode_limit"]), 1),
            # not a target, a diagnosis: shard read + decode + label check, without augmentation
            "shards_no_augment_per_s": round(_median(rates["shards_no_augment"]), 1),
            # ratios per round (same load on the machine), then the median
            "shards_vs_folder": round(_median([a / b for a, b in zip(rates["shards"], rates["folder"], strict=True)]), 3),
            "shards_vs_decode_limit": round(
                _median([a / b for a, b in zip(rates["shards"], rates["decode_limit"], strict=True)]), 3
            ),
            "samples": n_batches * args.batch_size,
            "image_sizes": [args.min_size, args.max_size] if args.root is None else None,
            "crop": args.crop,
            "scale_range": list(args.scale_range),
            "batch_size": args.batch_size,
            "data": "synthetic (generated)" if args.root is None else os.path.abspath(root),
            "threads": 1,
            "timer": "process CPU time, one thread, rounds in turns",
            "repeats": args.repeats,
            "cpu": _cpu_name(),
        }
        return result


# ----------------------------------------------------------------------------- train


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="training step: ResNet-101 fp32 vs bf16, FLOPs, roofline; the quick start's step",
        description="DeepLabv2 ResNet-101 `naked` (width 64, output stride 8, 21 classes) at "
        "321x321, batch 2: forward + backward + SGD step through segdist.train.train_one_epoch "
        "on a fixed in-memory batch, in fp32, bf16 autocast and bf16 autocast + channels_last; "
        "FLOPs per image (forward + backward, torch.utils.flop_counter); achieved GFLOP/s and "
        "its ratio to the best torch.mm GFLOP/s of the same dtype measured in the same run. "
        "Then the quick start's step (tune_spaces/quickstart.yaml: model, crop, batch, one "
        "thread per worker) on a fixed batch and with the real loader (its loader_workers): "
        "images/s and the fraction of step time spent waiting for data.",
    )
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n roofline matmul")
    p.add_argument("--matmul-seconds", type=float, default=1.0)
    p.add_argument("--no-channels-last", action="store_true", help="skip the bf16 + channels_last run")
    p.add_argument("--quickstart-steps", type=int, default=60, help="timed quick-start steps (default 60)")
    p.add_argument("--quickstart-warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=256, help="synthetic training images (default 256)")
    p.add_argument("--work-dir", default=None, help="where to put generated shards (default: a temp dir)")
    return p


def _big_trial(base, depth: int, width: int, batch: int = 2, crop: int = 321):
    """`base` with the DeepLab-protocol naked ResNet (output stride 8) the bench measures."""
    from segdist.resolve import resolve_recipe

    recipe = resolve_recipe({
        "model.variant": "naked", "model.depth": depth, "model.width": width, "model.output_stride": 8,
        "train.batch_size": batch, "train.crop_size": (crop, crop), "train.lr": 2.5e-4,
    }, "deeplab", "bench")
    return dataclasses.replace(base, recipe=recipe)


def _run_train(args) -> dict:
    import torch

    from segdist.models import build_model
    from segdist.train import StepOptions, train_one_epoch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    result: dict[str, Any] = {
        "model": f"DeepLabv2 naked ResNet-{args.depth} width {args.width} OS 8, {args.classes} classes",
        "crop": args.crop,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "threads": threads,
        "step_statistic": "fastest timed step (as the best-of roofline), precisions alternating step by step; "
                          "median_step_s_* beside it",
    }
    trial = _big_trial(quickstart_trial(), args.depth, args.width, args.batch_size, args.crop)
    torch.manual_seed(0)
    model = build_model(trial.recipe.model, args.classes)
    flops = train_flops_per_image(model, args.crop, args.classes)
    result["gflops_per_image_fwd_bwd"] = round(flops / 1e9, 2)
    runs = [("fp32", False, False), ("bf16", True, False)]
    if not args.no_channels_last:
        runs.append(("bf16_channels_last", True, True))
    # One model, optimizer and schedule per precision, all from the same weights; their steps
    # alternate (fp32, bf16, ...) so that load from other processes falls on all of them alike.
    states = {}
    for name, bf16, channels_last in runs:
        net = copy.deepcopy(model)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer, scheduler = optimizer_and_schedule(net, trial, args.warmup + args.steps)
        states[name] = (net, optimizer, scheduler, StepOptions(device=cpu, bf16=bf16, channels_last=channels_last))
    model = None
    (batch,) = _fixed_batches(args.batch_size, args.crop, args.classes, 1)
    durations: dict[str, list[float]] = {name: [] for name in states}
    for step in range(args.warmup + args.steps):
        for name, (net, optimizer, scheduler, options) in states.items():
            start = time.perf_counter()
            train_one_epoch(net, [batch], optimizer, scheduler, options, epoch=0)  # one step, then a loss read
            if step >= args.warmup:
                durations[name].append(time.perf_counter() - start)
    states = None
    for name, times in durations.items():
        # the fastest step, as for the best-of roofline: steps take seconds here, and other load
        # on the machine (threads preempted at a barrier) only slows some; the median beside it
        result[f"img_per_s_{name}"] = round(args.batch_size / min(times), 4)
        result[f"step_s_{name}"] = round(min(times), 3)
        result[f"median_step_s_{name}"] = round(statistics.median(times), 3)
    for dtype in ("fp32", "bf16"):
        ways = matmul_gflops(dtype, args.matmul_size, args.matmul_seconds)
        result[f"matmul_gflops_{dtype}_mm"] = round(ways["mm"], 1)
        result[f"matmul_gflops_{dtype}_conv1x1"] = round(ways["conv1x1"], 1)
        result[f"matmul_gflops_{dtype}"] = round(max(ways.values()), 1)  # the roofline
    for name, dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_channels_last", "bf16")):
        if f"img_per_s_{name}" not in result:
            continue
        achieved = flops * result[f"img_per_s_{name}"] / 1e9
        result[f"achieved_gflops_{name}"] = round(achieved, 1)
        result[f"roofline_ratio_{name}"] = round(achieved / result[f"matmul_gflops_{dtype}"], 3)
    result["bf16_speedup"] = round(result["img_per_s_bf16"] / result["img_per_s_fp32"], 3)
    if "img_per_s_bf16_channels_last" in result:
        result["bf16_channels_last_speedup"] = round(
            result["img_per_s_bf16_channels_last"] / result["img_per_s_fp32"], 3
        )
    result["cpu_bf16_hardware"] = sorted(f for f in _cpu_flags() if f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    result.update(_quickstart_step(args))
    torch.set_num_threads(threads)
    return result


def _quickstart_step(args) -> dict:
    """The quick start's step on one worker with its thread count: fixed batch (compute only)
    and the real loader (its loader_workers), plus the in-process loader rate for comparison."""
    import torch

    from segdist.data.stream import read_dataset_info, train_loader
    from segdist.data.transforms import TrainTransform
    from segdist.models import build_model
    from segdist.train import StepOptions

    threads = torch.get_num_threads()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        shards = _synthetic_shards(tmp, args.samples, 96, 128)
        trial = quickstart_trial(shards)
        info = read_dataset_info(shards)
        qs_threads = trial.recipe.resources.cpus_per_worker
        torch.set_num_threads(qs_threads)
        t, m = trial.recipe.train, trial.recipe.model
        out.update({
            "quickstart_model": f"naked ResNet-{m.depth} width {m.width} "
                                f"OS {m.output_stride}, crop {t.crop_size[0]}, batch {t.batch_size}",
            "quickstart_threads": qs_threads,
            "quickstart_loader_workers": trial.data.loader_workers,
            "quickstart_steps": args.quickstart_steps,
        })
        n = args.quickstart_warmup + args.quickstart_steps
        torch.manual_seed(0)
        model = build_model(m, info.num_classes)
        transform = TrainTransform.from_recipe(t, info.num_classes, edges=False)
        initial = copy.deepcopy(model.state_dict())
        options = StepOptions(device=torch.device("cpu"))
        fixed = run_steps(model, _fixed_batches(t.batch_size, t.crop_size, info.num_classes, n), trial, options,
                          args.quickstart_warmup, t.batch_size)
        model.load_state_dict(initial)
        fixed_bf16 = run_steps(model, _fixed_batches(t.batch_size, t.crop_size, info.num_classes, n), trial,
                               StepOptions(device=torch.device("cpu"), bf16=True), args.quickstart_warmup,
                               t.batch_size)
        model.load_state_dict(initial)
        loader = train_loader(
            info, transform=transform, batch_size=t.batch_size, batches_per_epoch=n,
            seed=0, epoch=0, rank=0, world_size=1, loader_workers=trial.data.loader_workers,
            shuffle_buffer=trial.data.shuffle_buffer,
        )
        real = run_steps(model, loader, trial, options, args.quickstart_warmup, t.batch_size)
        # what one core of the pipeline delivers for this config (in-process, one thread)
        def pipeline() -> int:
            loader = train_loader(
                info, transform=transform, batch_size=t.batch_size,
                batches_per_epoch=max(1, info.num_samples // t.batch_size), seed=0, epoch=0, rank=0, world_size=1,
                loader_workers=0,
            )
            return sum(images.shape[0] for images, _ in loader)

        loader_rate = _median(_cpu_timed_rounds({"p": pipeline}, 3)["p"])
    torch.set_num_threads(threads)
    # images/s from the median step (other load on the machine only slows some steps)
    rate, rate_bf16 = t.batch_size / fixed["median_step_s"], t.batch_size / fixed_bf16["median_step_s"]
    out.update({
        "quickstart_img_per_s_fixed_batch": round(rate, 2),
        "quickstart_img_per_s_fixed_batch_bf16": round(rate_bf16, 2),
        "quickstart_bf16_speedup": round(rate_bf16 / rate, 3),
        "quickstart_img_per_s_loader": round(t.batch_size / real["median_step_s"], 2),
        "quickstart_img_per_s_loader_window": round(real["img_per_s"], 2),
        "quickstart_data_wait_fraction": round(real["data_wait_fraction"], 4),
        "quickstart_loader_per_core_per_s": round(loader_rate, 1),
        # how many times what one quick-start worker's step consumes one core of the pipeline gives
        "data_vs_quickstart_step": round(loader_rate / rate, 2),
    })
    return out


# ----------------------------------------------------------------------------- distributed runners


def dist_loop(spec: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """One rank of the benchmark loop: the trial's model (DDP when world_size > 1), its real
    train_loader, segdist.train.train_one_epoch for spec["steps"] steps. The process group
    must already be set up (by Ray, or by _plain_worker)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from segdist.config import trial_from_dict
    from segdist.data.stream import read_dataset_info, train_loader
    from segdist.data.transforms import TrainTransform
    from segdist.models import build_model
    from segdist.train import StepOptions

    torch.set_num_threads(spec["threads"])
    trial = trial_from_dict(spec["trial"])
    info = read_dataset_info(trial.data.train_shards)
    torch.manual_seed(trial.seed)
    model = build_model(trial.recipe.model, info.num_classes)
    net = DistributedDataParallel(model) if world_size > 1 else model
    t = trial.recipe.train
    loader = train_loader(
        info, transform=TrainTransform.from_recipe(t, info.num_classes, edges=False), batch_size=t.batch_size,
        batches_per_epoch=spec["steps"], seed=trial.seed, epoch=0, rank=rank, world_size=world_size,
        loader_workers=trial.data.loader_workers, shuffle_buffer=trial.data.shuffle_buffer,
    )
    result = run_steps(net, loader, trial, StepOptions(device=torch.device("cpu")), spec["warmup"],
                       t.batch_size * world_size)
    result["rank"] = rank
    return result


def _plain_worker(rank: int, world_size: int, spec: dict, rendezvous: str, queue) -> None:
    import torch.distributed as dist

    if world_size > 1:
        # a file rendezvous: no port to pick (and to lose to another process) beforehand
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        result = dist_loop(spec, rank, world_size)
        if world_size > 1:
            dist.barrier()  # neither rank tears down while the other still talks to it (gloo aborts)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    queue.put(result)


def run_plain(spec: dict[str, Any], world_size: int) -> dict[str, Any]:
    """spec's loop on `world_size` fresh processes (torch.multiprocessing, spawn), plain
    torch.distributed (gloo), no Ray. Rank 0's figures, plus the start-up time from the
    launch to the first step."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    # the environment Ray gives its workers (OMP_NUM_THREADS = CPUs per worker), so that the
    # comparison is of the frameworks, not of an environment variable
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    rendezvous_dir = tempfile.mkdtemp(prefix="segdist-bench-")
    launched = time.time()
    try:
        mp.spawn(_plain_worker, args=(world_size, spec, os.path.join(rendezvous_dir, "rendezvous"), queue),
                 nprocs=world_size, join=True)
    finally:
        shutil.rmtree(rendezvous_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    results = sorted((queue.get() for _ in range(world_size)), key=lambda r: r["rank"])
    first = results[0]
    return {
        "img_per_s": first["img_per_s"],
        "data_wait_fraction": first["data_wait_fraction"],
        "cpu_s_per_step": first["cpu_s_per_step"],
        "startup_s": min(r["first_step_at"] for r in results) - launched,
        "timed_steps": first["timed_steps"],
    }


def _ray_worker(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    result = dist_loop(config["spec"], context.get_world_rank(), context.get_world_size())
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if context.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    # Train V2 keeps the metrics of reports that carry a checkpoint: a tiny one from rank 0
    # (written after the timed steps)
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "bench.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_ray(spec: dict[str, Any], world_size: int, storage: str) -> dict[str, Any]:
    """spec's loop under Ray Train (TorchTrainer, Train V2, gloo, 1 CPU per worker) on the
    running Ray; start-up = from trainer.fit() to the first step on rank 0."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=world_size, use_gpu=False, resources_per_worker={"CPU": spec["threads"]}
        ),
        run_config=ray.train.RunConfig(name=f"segdist-bench-{os.getpid()}-{time.time_ns()}", storage_path=storage),
    )
    launched = time.time()
    result = trainer.fit()
    metrics = result.metrics
    return {
        "img_per_s": metrics["img_per_s"],
        "data_wait_fraction": metrics["data_wait_fraction"],
        "cpu_s_per_step": metrics["cpu_s_per_step"],
        "startup_s": metrics["first_step_at"] - launched,
        "fit_s": time.time() - launched,
        "timed_steps": metrics["timed_steps"],
    }


def _dist_spec(args, shards: str) -> dict[str, Any]:
    trial = quickstart_trial(shards)
    return {
        "trial": dataclasses.asdict(trial),
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "threads": trial.recipe.resources.cpus_per_worker,
    }


def _add_dist_args(p: argparse.ArgumentParser, steps: int, warmup: int, rounds: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps per run (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"runs of each kind, in turns; medians (default {rounds})")
    p.add_argument("--samples", type=int, default=256, help="synthetic training images (default 256)")
    p.add_argument("--work-dir", default=None, help="where to put generated shards (default: a temp dir)")


# ----------------------------------------------------------------------------- ray


def _add_ray(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ray",
        help="Ray Train vs plain torch.distributed: throughput ratio and trial start-up",
        description="The quick start's training loop (tune_spaces/quickstart.yaml: ResNet-18 width 16, "
        "OS 8, crop 96, batch 8 per worker, 1 thread and its loader workers per worker) on the "
        "generated synthetic shards, a fixed number of steps on 2 workers, under Ray Train "
        "(TorchTrainer, Train V2, gloo) and under plain torch.distributed (gloo, 2 spawned "
        "processes, no Ray, with the OMP_NUM_THREADS Ray gives its workers), in turns. "
        "ray_throughput_ratio = Ray / plain steady-state images/s (after the warm-up steps; the "
        "best run of each kind, since load from other processes only slows a run; the median of "
        "the pairs and the CPU seconds per step are reported too); trial_startup_s = from "
        "trainer.fit() to the first step on rank 0.",
    )
    _add_dist_args(p, steps=100, warmup=10, rounds=3)
    p.add_argument("--workers", type=int, default=2)
    return p


def _start_ray(workers: int, threads: int) -> float:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    # Enough logical CPUs for the workers even on a machine with fewer cores (the plain
    # runner oversubscribes the same way); both runners get the same processes and threads.
    # The dashboard (127.0.0.1) serves the State API that Train's placement-group cleaner
    # asks whether the controller is alive (as segdist.tune starts a local Ray).
    ray.init(num_cpus=max(os.cpu_count() or 1, workers * threads), include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    return time.perf_counter() - started


def _run_ray(args) -> dict:
    import ray

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        shards = _synthetic_shards(tmp, args.samples, 96, 128)
        spec = _dist_spec(args, shards)
        ray_init_s = _start_ray(args.workers, spec["threads"])
        plain, under_ray = [], []
        try:
            for _ in range(args.rounds):
                plain.append(run_plain(spec, args.workers))
                under_ray.append(run_ray(spec, args.workers, os.path.join(tmp, "ray_results")))
        finally:
            ray.shutdown()
    ratios = [r["img_per_s"] / p["img_per_s"] for r, p in zip(under_ray, plain, strict=True)]
    best_ray = max(r["img_per_s"] for r in under_ray)
    best_plain = max(p["img_per_s"] for p in plain)
    trial = quickstart_trial()
    return {
        # best steady-state run of each kind: load from other processes only ever slows a run
        "ray_throughput_ratio": round(best_ray / best_plain, 3),
        "ray_throughput_ratio_median_of_pairs": round(_median(ratios), 3),
        # CPU seconds of the training process per step (rank 0): Ray's own threads included
        "ray_cpu_per_step_ratio": round(
            _median([r["cpu_s_per_step"] for r in under_ray]) / _median([p["cpu_s_per_step"] for p in plain]), 3
        ),
        "trial_startup_s": round(_median([r["startup_s"] for r in under_ray]), 2),
        "plain_startup_s": round(_median([p["startup_s"] for p in plain]), 2),
        "ray_img_per_s": round(best_ray, 2),
        "plain_img_per_s": round(best_plain, 2),
        "ray_img_per_s_runs": [round(r["img_per_s"], 1) for r in under_ray],
        "plain_img_per_s_runs": [round(p["img_per_s"], 1) for p in plain],
        "ray_data_wait_fraction": round(_median([r["data_wait_fraction"] for r in under_ray]), 4),
        "plain_data_wait_fraction": round(_median([p["data_wait_fraction"] for p in plain]), 4),
        "ray_fit_s": round(_median([r["fit_s"] for r in under_ray]), 2),
        "ray_init_s": round(ray_init_s, 2),
        "workers": args.workers,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "model": f"naked ResNet-{trial.recipe.model.depth} width {trial.recipe.model.width} "
                 f"OS {trial.recipe.model.output_stride}",
        "crop": trial.recipe.train.crop_size[0],
        "batch_size_per_worker": trial.recipe.train.batch_size,
        "threads_per_worker": spec["threads"],
        "loader_workers_per_worker": trial.data.loader_workers,
        "data": "synthetic shards (generated)",
        "backend": "gloo",
    }


# ----------------------------------------------------------------------------- scale


def _add_scale(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "scale",
        help="1 vs 2 plain torch.distributed workers: scaling efficiency",
        description="The quick start's loop (as in `ray`) on 1 and on 2 plain torch.distributed "
        "workers (gloo), the same batch per worker, in turns: scaling_efficiency = "
        "images/s(2) / (2 x images/s(1)) (best run of each kind). On a machine with 2 cores the 2 workers and their "
        "loader processes share those cores, so this measures the machine as much as the code.",
    )
    _add_dist_args(p, steps=60, warmup=10, rounds=3)
    return p


def _run_scale(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        shards = _synthetic_shards(tmp, args.samples, 96, 128)
        spec = _dist_spec(args, shards)
        one, two = [], []
        for _ in range(args.rounds):
            one.append(run_plain(spec, 1))
            two.append(run_plain(spec, 2))
    effs = [b["img_per_s"] / (2 * a["img_per_s"]) for a, b in zip(one, two, strict=True)]
    best_one = max(a["img_per_s"] for a in one)
    best_two = max(b["img_per_s"] for b in two)
    trial = quickstart_trial()
    processes = 2 * (1 + trial.data.loader_workers)
    return {
        # best run of each kind (load from other processes only ever slows a run)
        "scaling_efficiency": round(best_two / (2 * best_one), 3),
        "scaling_efficiency_median_of_pairs": round(_median(effs), 3),
        "img_per_s_1_worker": round(best_one, 2),
        "img_per_s_2_workers": round(best_two, 2),
        "img_per_s_1_worker_runs": [round(a["img_per_s"], 1) for a in one],
        "img_per_s_2_workers_runs": [round(b["img_per_s"], 1) for b in two],
        "cpu_s_per_step_1_worker": round(_median([a["cpu_s_per_step"] for a in one]), 4),
        "cpu_s_per_step_2_workers": round(_median([b["cpu_s_per_step"] for b in two]), 4),
        "data_wait_fraction_1_worker": round(_median([a["data_wait_fraction"] for a in one]), 4),
        "data_wait_fraction_2_workers": round(_median([b["data_wait_fraction"] for b in two]), 4),
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "runner": "plain torch.distributed (gloo, spawned processes)",
        "model": f"naked ResNet-{trial.recipe.model.depth} width {trial.recipe.model.width} "
                 f"OS {trial.recipe.model.output_stride}",
        "crop": trial.recipe.train.crop_size[0],
        "batch_size_per_worker": trial.recipe.train.batch_size,
        "threads_per_worker": spec["threads"],
        "loader_workers_per_worker": trial.data.loader_workers,
        "cores": os.cpu_count(),
        "note": f"2 workers run {processes} busy processes (training + loader) on {os.cpu_count()} cores",
    }


# ----------------------------------------------------------------------------- gpu


def _add_gpu(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "gpu",
        help="(CUDA) ResNet-101 images/s, MFU, peak memory: fp32, bf16 + channels_last, torch.compile",
        description="On a CUDA device: DeepLabv2 ResNet-101 `naked` (OS 8, 21 classes) training steps "
        "(segdist.train.train_one_epoch, SGD) at 321x321 and 513x513 for fp32, bf16 autocast + "
        "channels_last, and bf16 autocast + channels_last + torch.compile: images/s, MFU = "
        "FLOPs per image (forward + backward, torch.utils.flop_counter) x images/s / the "
        "device's peak from a data-sheet table (bf16 tensor-core peak for bf16; the TF32 "
        "tensor-core peak for fp32 while cuDNN may use TF32, else the FP32 peak), and peak "
        "memory. Without CUDA: {\"gpu\": \"no CUDA device\"}.",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 4],
                   help="batch per size, in the order of --sizes (default 8 4)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16_channels_last", "bf16_channels_last_compile"],
                   choices=["fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"])
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--classes", type=int, default=21)
    return p


def _tf32_convs() -> bool:
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None) if conv is not None else None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def measure_mode(cpu_model, trial, mode: str, size: int, batch: int, steps: int, warmup: int, classes: int,
                 device) -> dict[str, float]:
    """Training steps of a copy of `cpu_model` on `device` in one mode (fp32 | bf16 |
    bf16_channels_last | bf16_channels_last_compile): images/s over `steps` after `warmup`
    untimed steps (torch.compile compiles there), and the peak memory (CUDA)."""
    import torch

    from segdist.train import StepOptions

    cuda = device.type == "cuda"
    bf16 = mode.startswith("bf16")
    channels_last = "channels_last" in mode
    model = copy.deepcopy(cpu_model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if mode.endswith("compile") else model
    train = dataclasses.replace(trial.recipe.train, batch_size=batch, crop_size=(size, size))
    step_trial = dataclasses.replace(trial, recipe=dataclasses.replace(trial.recipe, train=train))
    options = StepOptions(device=device, bf16=bf16, channels_last=channels_last)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run_steps(net, _fixed_batches(batch, size, classes, max(warmup, 1), device), step_trial, options, 0, batch)
        if cuda:
            torch.cuda.synchronize()
        timed = _fixed_batches(batch, size, classes, steps, device)
        start = time.perf_counter()
        run_steps(net, timed, step_trial, options, 0, batch)  # ends with a host read of the loss
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    finally:
        net = model = None
    return {
        "img_per_s": steps * batch / elapsed,
        "peak_memory_bytes": float(torch.cuda.max_memory_allocated()) if cuda else float("nan"),
    }


def _run_gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device"}
    from segdist.models import build_model

    if len(args.batch_sizes) != len(args.sizes):
        raise SegdistError("--batch-sizes needs one batch size per --sizes entry")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak(name)
    tf32 = _tf32_convs()
    base = quickstart_trial()
    trial = _big_trial(base, args.depth, 64)
    result: dict[str, Any] = {
        "gpu": name,
        "peak_table_row": peak[0] if peak else None,
        "peak_tflops": peak[1] if peak else None,
        "fp32_peak_used": ("tf32" if tf32 else "fp32") if peak else None,
        "cudnn_tf32": tf32,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "model": f"DeepLabv2 naked ResNet-{args.depth} width 64 OS 8, {args.classes} classes",
    }
    torch.backends.cudnn.benchmark = True
    for size, batch in zip(args.sizes, args.batch_sizes, strict=True):
        torch.manual_seed(0)
        cpu_model = build_model(trial.recipe.model, args.classes)
        flops = train_flops_per_image(cpu_model, size, args.classes)
        result[f"gflops_per_image_fwd_bwd_{size}"] = round(flops / 1e9, 2)
        for mode in args.modes:
            key = f"{mode}_{size}"
            try:
                measured = measure_mode(cpu_model, trial, mode, size, batch, args.steps, args.warmup,
                                        args.classes, device)
            except torch.cuda.OutOfMemoryError:
                result[f"{key}_error"] = "out of memory"
                continue
            except Exception as err:  # noqa: BLE001 - e.g. torch.compile failing: report, go on
                result[f"{key}_error"] = f"{type(err).__name__}: {err}"[:300]
                continue
            img_per_s = measured["img_per_s"]
            result[f"img_per_s_{key}"] = round(img_per_s, 2)
            result[f"peak_memory_gib_{key}"] = round(measured["peak_memory_bytes"] / 2**30, 2)
            result[f"achieved_tflops_{key}"] = round(flops * img_per_s / 1e12, 1)
            if peak:
                dtype = "bf16" if mode.startswith("bf16") else ("tf32" if tf32 else "fp32")
                result[f"mfu_{key}"] = round(utilisation(flops, img_per_s, peak[1][dtype] * 1e12), 4)
            result[f"batch_size_{size}"] = batch
    return result


# ----------------------------------------------------------------------------- all


def _add_all(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "all",
        help="every section (data, train, ray, scale, gpu) with their defaults, and the targets",
        description="Runs data, train, ray, scale and gpu with their default settings (a few "
        "minutes on 2 cores) and checks the targets: shards >= 0.8 x the decode limit and >= the "
        "folder, ray_throughput_ratio >= 0.95, CPU bf16 >= 1.5 x fp32, the data pipeline >= 5 x "
        "the quick start's step consumption, GPU bf16 MFU >= 0.4 (where measured).",
    )
    p.add_argument("--sections", nargs="+", default=["data", "train", "ray", "scale", "gpu"],
                   choices=["data", "train", "ray", "scale", "gpu"])
    p.add_argument("--work-dir", default=None)
    return p


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target of the performance issues that the measured figures allow to check."""
    out: dict[str, Any] = {}
    data, train, ray_ = result.get("data", {}), result.get("train", {}), result.get("ray", {})
    if "shards_vs_decode_limit" in data:
        out["data_vs_decode_limit"] = data["shards_vs_decode_limit"]
        out["data_vs_decode_limit_met"] = data["shards_vs_decode_limit"] >= 0.8
        out["shards_vs_folder_met"] = data["shards_vs_folder"] >= 1.0
    if "ray_throughput_ratio" in ray_:
        out["ray_throughput_ratio_met"] = ray_["ray_throughput_ratio"] >= 0.95
    if "bf16_speedup" in train:
        out["cpu_bf16_speedup"] = max(train["bf16_speedup"], train.get("bf16_channels_last_speedup", 0))
        out["cpu_bf16_speedup_met"] = out["cpu_bf16_speedup"] >= 1.5
    if "quickstart_img_per_s_fixed_batch" in train:
        # the loader at the quick start's sizes (the data section's default is VOC's sizes)
        per_core = train.get("quickstart_loader_per_core_per_s", data.get("shards_per_s"))
        out["data_vs_quickstart_step"] = round(per_core / train["quickstart_img_per_s_fixed_batch"], 2)
        out["data_vs_quickstart_step_met"] = out["data_vs_quickstart_step"] >= 5
    mfu = {k: v for k, v in result.get("gpu", {}).items() if k.startswith("mfu_bf16") and k.endswith("_321")}
    if mfu:
        out["gpu_bf16_mfu_321"] = max(mfu.values())
        out["gpu_bf16_mfu_321_met"] = out["gpu_bf16_mfu_321"] >= 0.4
    return out


def _section_args(name: str, work_dir: str | None) -> argparse.Namespace:
    parser = build_parser()
    argv = [name] + (["--work-dir", work_dir] if work_dir and name != "gpu" else [])
    return parser.parse_args(argv)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load_note(before: float | None) -> str | None:
    """A warning when other processes kept the machine busy just before a measurement
    (1-minute load average above its cores). Only the load before is judged: the load after
    includes the benchmark's own processes (ray and scale run 4 busy ones)."""
    cores = os.cpu_count() or 1
    if before is None or before <= cores:
        return None
    return (f"the machine was busy before this ran (1-minute load average {before} on {cores} cores): "
            "other processes may have taken CPU time, so these figures may understate this code")


def _run_all(args) -> dict:
    result: dict[str, Any] = {}
    for name in args.sections:
        _add, run = SUBCOMMANDS[name]
        started, load_before = time.perf_counter(), _loadavg()
        result[name] = run(_section_args(name, args.work_dir))
        load_after = _loadavg()
        result[name]["section_seconds"] = round(time.perf_counter() - started, 1)
        result[name]["loadavg_before"], result[name]["loadavg_after"] = load_before, load_after
        note = load_note(load_before)
        if note:
            result[name]["load_warning"] = note
    result["targets"] = targets(result)
    return result


# ----------------------------------------------------------------------------- MLflow


def _flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "peak_tflops":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_to_mlflow(result: dict[str, Any], command: str, uri: str, machine: dict[str, Any]) -> str:
    """One run of the experiment "segdist-bench": params = machine + settings, metrics =
    the numeric figures, bench.json = the whole result. Returns the run id."""
    from mlflow.entities import Metric, Param

    from segdist.tracking import client_for, get_or_create_experiment, mlflow_key

    client = client_for(uri)  # several bench runs may open a new store at once
    experiment = get_or_create_experiment(client, BENCH_EXPERIMENT, uri)
    run = client.create_run(experiment, run_name=f"bench-{command}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"segdist.role": "bench", "segdist.bench.command": command})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics, params = [], [Param("command", command)]
    params += [Param(mlflow_key(f"machine.{k}"), str(v)[:6000]) for k, v in machine.items()]
    for name, value in _flatten(result).items():
        key = mlflow_key(name)  # keys MLflow refuses (a name with a quote or colon) get a safe one
        if isinstance(value, bool):
            params.append(Param(key, str(value)))
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                metrics.append(Metric(key, float(value), now, 0))
        else:
            params.append(Param(key, (value if isinstance(value, str) else json.dumps(value))[:6000]))
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    client.log_text(run_id, json.dumps({"command": command, "machine": machine, **result}, indent=1), "bench.json")
    client.set_terminated(run_id)
    return run_id


# ----------------------------------------------------------------------------- CLI

# name -> (add parser, run)
SUBCOMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], dict]]] = {
    "data": (_add_data, _run_data),
    "train": (_add_train, _run_train),
    "ray": (_add_ray, _run_ray),
    "scale": (_add_scale, _run_scale),
    "gpu": (_add_gpu, _run_gpu),
    "all": (_add_all, _run_all),
}


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print one JSON object (default: key = value lines)")
    p.add_argument("--tracking-uri", default=default,
                   help="MLflow tracking URI for the bench run; default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///./mlflow.db")
    p.add_argument("--no-mlflow", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="do not log the figures to MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.bench",
        description="Measure segdist's performance figures on this machine, print them (JSON with "
        "--json) and log them to MLflow as a run of the experiment 'segdist-bench'.",
    )
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _run in SUBCOMMANDS.values():
        _add_common(add(sub), top=False)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = None
    if not args.no_mlflow:
        from segdist.tracking import check_reachable, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)  # one line and exit 2 before anything is measured
    _add, run = SUBCOMMANDS[args.command]
    machine = machine_info()
    load_before = _loadavg()
    result = run(args)
    load_after = _loadavg()
    machine["loadavg_before"], machine["loadavg_after"] = load_before, load_after
    note = load_note(load_before)
    if note and args.command != "all":
        result["load_warning"] = note
        print(f"segdist: warning: {note}", file=sys.stderr)
    result["machine"] = machine
    if uri is not None:
        figures = {k: v for k, v in result.items() if k != "machine"}
        run_id = log_to_mlflow(figures, args.command, uri, machine)
        result["mlflow_run_id"] = run_id
        print(f"segdist: bench figures logged to {uri} (experiment {BENCH_EXPERIMENT}, run {run_id})",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in _flatten(result).items():
            print(f"{key} = {value}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that the functions handed to Ray and to spawned
    # processes are segdist.bench's (pickled by reference), not copies from __main__.
    from segdist.bench import main as _main

    sys.exit(_main())
