"""bench train: the training step on the CPU.

    precisions   DeepLabv2 ResNet-101 `naked` at 321x321, batch 2 (the DeepLab protocol's
                 recipe) in fp32, bf16 autocast and bf16 autocast + channels_last: images/s,
                 FLOPs per image (torch.utils.flop_counter), achieved GFLOP/s against a matmul
                 roofline measured in the same run
    quick start  the quick start's step (its model, crop, batch, one thread): on a fixed batch
                 in fp32 and in bf16, and with the real loader (its loader_workers); the data
                 wait, and what one core of the pipeline delivers for this config

Every step is segdist's own: the set-up comes from segdist.train.training_setup (the
recipe's model, optimizer, schedule, L2 term, NaN rule; the precision the section names)
and the step is segdist.train.train_one_epoch; the real loader is segdist.train.epoch_loader.
What differs from a trial, and why: the fixed batch is one random in-memory batch (every
pixel labelled) repeated, so that the step is timed without data cost; the precisions are
set per run rather than by the recipe (`auto` is fp32 on a CPU), as comparing them is the point.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

from segdist.bench.common import (
    bench_setup,
    big_trial,
    cpu_timed_rounds,
    fixed_batches,
    median,
    quickstart_trial,
    run_steps,
    synthetic_shards,
    train_flops_per_image,
    with_train,
)
from segdist.bench.machine import cpu_flags

if TYPE_CHECKING:
    from segdist.train import Setup

# name -> (precision, channels_last) of the ResNet-101 runs
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16_channels_last": ("bf16", True)}


HELP = "training step: ResNet-101 fp32 vs bf16, FLOPs, roofline; the quick start's step"
DESCRIPTION = (
    "DeepLabv2 ResNet-101 `naked` (width 64, output stride 8, 21 classes) at "
    "321x321, batch 2: segdist's training step (segdist.train.training_setup + train_one_epoch: "
    "forward, backward, the recipe's L2 term and SGD step) on a fixed in-memory batch, in fp32, "
    "bf16 autocast and bf16 autocast + channels_last; "
    "FLOPs per image (forward + backward, torch.utils.flop_counter); achieved GFLOP/s and "
    "its ratio to the best torch.mm GFLOP/s of the same dtype measured in the same run. "
    "Then the quick start's step (tune_spaces/quickstart.yaml: model, crop, batch, one "
    "thread per worker) on a fixed batch and with the real loader (its loader_workers): "
    "images/s and the fraction of step time spent waiting for data."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args) -> dict:
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result: dict[str, Any] = {
            "model": f"DeepLabv2 naked ResNet-{args.depth} width {args.width} OS 8, {args.classes} classes",
            "crop": args.crop,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "threads": torch.get_num_threads(),
            "step_statistic": "fastest timed step (as the best-of roofline), precisions alternating step by step; "
                              "median_step_s_* beside it",
        }
        result.update(_precisions(args))
        result["cpu_bf16_hardware"] = sorted(f for f in cpu_flags() if f in ("avx512_bf16", "amx_bf16", "amx_tile"))
        result.update(quickstart_step(args))
    finally:
        torch.set_num_threads(threads)
    return result


def _precisions(args) -> dict[str, Any]:
    """The ResNet-101 step in each precision: step times, FLOPs, the roofline and speed-ups."""
    trial = big_trial(quickstart_trial(), args.depth, args.width, args.batch_size, args.crop)
    names = [name for name in PRECISIONS if not (args.no_channels_last and name == "bf16_channels_last")]
    setups = {}
    for name in names:  # one set-up per precision, all from the same weights (the trial's seed)
        precision, channels_last = PRECISIONS[name]
        setups[name] = bench_setup(with_train(trial, precision=precision, channels_last=channels_last),
                                   args.classes, (args.warmup + args.steps) * args.batch_size)
    flops = train_flops_per_image(setups["fp32"].model, args.crop, args.classes)
    durations = _alternating_steps(setups, fixed_batches(args.batch_size, args.crop, args.classes, 1)[0],
                                   args.warmup, args.steps)
    del setups
    out: dict[str, Any] = {"gflops_per_image_fwd_bwd": round(flops / 1e9, 2)}
    for name, times in durations.items():
        # the fastest step, as for the best-of roofline: steps take seconds here, and other load
        # on the machine (threads preempted at a barrier) only slows some; the median beside it
        out[f"img_per_s_{name}"] = round(args.batch_size / min(times), 4)
        out[f"step_s_{name}"] = round(min(times), 3)
        out[f"median_step_s_{name}"] = round(statistics.median(times), 3)
    out.update(_roofline(args, flops, out))
    for name in names[1:]:
        out[f"{name}_speedup"] = round(out[f"img_per_s_{name}"] / out["img_per_s_fp32"], 3)
    return out


def _alternating_steps(setups: dict[str, Setup], batch, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed step of each set-up; their steps alternate (fp32, bf16, ...) so
    that load from other processes falls on all of them alike."""
    from segdist.train import train_one_epoch

    durations: dict[str, list[float]] = {name: [] for name in setups}
    for step in range(warmup + steps):
        for name, setup in setups.items():
            start = time.perf_counter()
            # one step, then a loss read
            train_one_epoch(setup.net, [batch], setup.optimizer, setup.scheduler, setup.options, epoch=0)
            if step >= warmup:
                durations[name].append(time.perf_counter() - start)
    return durations


def _roofline(args, flops: float, steps: dict[str, Any]) -> dict[str, Any]:
    """The matmul roofline of each dtype and each precision's achieved GFLOP/s against it."""
    out: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        ways = matmul_gflops(dtype, args.matmul_size, args.matmul_seconds)
        out[f"matmul_gflops_{dtype}_mm"] = round(ways["mm"], 1)
        out[f"matmul_gflops_{dtype}_conv1x1"] = round(ways["conv1x1"], 1)
        out[f"matmul_gflops_{dtype}"] = round(max(ways.values()), 1)  # the roofline
    for name, (dtype, _channels_last) in PRECISIONS.items():
        if f"img_per_s_{name}" not in steps:
            continue
        achieved = flops * steps[f"img_per_s_{name}"] / 1e9
        out[f"achieved_gflops_{name}"] = round(achieved, 1)
        out[f"roofline_ratio_{name}"] = round(achieved / out[f"matmul_gflops_{dtype}"], 3)
    return out


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


# ----------------------------------------------------------------------------- the quick start's step


def quickstart_step(args) -> dict:
    """The quick start's step on one worker with its thread count: fixed batch (compute only,
    fp32 and bf16) and the real loader (its loader_workers), plus the in-process loader rate
    for comparison."""
    import torch

    from segdist.data.stream import read_dataset_info
    from segdist.train import epoch_loader

    threads = torch.get_num_threads()
    warmup = args.quickstart_warmup
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        trial = quickstart_trial(synthetic_shards(tmp, args.samples, 96, 128))
        info = read_dataset_info(trial.data.train_shards)
        t = trial.recipe.train
        torch.set_num_threads(trial.recipe.resources.cpus_per_worker)
        try:
            fixed = _fixed_batch_runs(trial, info, warmup, args.quickstart_steps)
            setup = bench_setup(trial, info.num_classes, info.num_samples)
            batches = warmup + args.quickstart_steps
            loader = epoch_loader(trial, info, setup, 0, rank=0, world_size=1, batches=batches)
            real = run_steps(setup, loader, warmup, t.batch_size)
            loader_rate = _pipeline_per_core(trial, info, setup)
        finally:
            torch.set_num_threads(threads)
    # images/s from the median step (other load on the machine only slows some steps)
    rate, rate_bf16 = (t.batch_size / fixed[precision]["median_step_s"] for precision in ("fp32", "bf16"))
    m = trial.recipe.model
    return {
        "quickstart_model": f"naked ResNet-{m.depth} width {m.width} "
                            f"OS {m.output_stride}, crop {t.crop_size[0]}, batch {t.batch_size}",
        "quickstart_threads": trial.recipe.resources.cpus_per_worker,
        "quickstart_loader_workers": trial.data.loader_workers,
        "quickstart_steps": args.quickstart_steps,
        "quickstart_img_per_s_fixed_batch": round(rate, 2),
        "quickstart_img_per_s_fixed_batch_bf16": round(rate_bf16, 2),
        "quickstart_bf16_speedup": round(rate_bf16 / rate, 3),
        "quickstart_img_per_s_loader": round(t.batch_size / real["median_step_s"], 2),
        "quickstart_img_per_s_loader_window": round(real["img_per_s"], 2),
        "quickstart_data_wait_fraction": round(real["data_wait_fraction"], 4),
        "quickstart_loader_per_core_per_s": round(loader_rate, 1),
        # how many times what one quick-start worker's step consumes one core of the pipeline gives
        "data_vs_quickstart_step": round(loader_rate / rate, 2),
    }


def _fixed_batch_runs(trial, info, warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """run_steps figures of the quick start's step on a fixed batch, fp32 and bf16 (fresh
    set-ups from the same weights)."""
    t = trial.recipe.train
    runs = {}
    for precision in ("fp32", "bf16"):
        setup = bench_setup(with_train(trial, precision=precision), info.num_classes, info.num_samples)
        batches = fixed_batches(t.batch_size, t.crop_size, info.num_classes, warmup + steps)
        runs[precision] = run_steps(setup, batches, warmup, t.batch_size)
    return runs


def _pipeline_per_core(trial, info, setup: Setup) -> float:
    """Samples per CPU-second that one core of the quick start's pipeline delivers: its epoch
    loader in this process (no loader workers), one thread, every sample once."""
    import dataclasses

    from segdist.train import epoch_loader

    in_process = dataclasses.replace(trial, data=dataclasses.replace(trial.data, loader_workers=0))
    batches = max(1, info.num_samples // trial.recipe.train.batch_size)

    def pipeline() -> int:
        loader = epoch_loader(in_process, info, setup, 0, rank=0, world_size=1, batches=batches)
        return sum(images.shape[0] for images, _ in loader)

    return median(cpu_timed_rounds({"p": pipeline}, 3)["p"])
