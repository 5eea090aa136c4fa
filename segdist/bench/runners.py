"""The quick start's training loop on several workers, for the `ray` and `scale` sections:
one rank's loop (`dist_loop`) and the two ways to start the ranks, plain torch.distributed
(`run_plain`: spawned processes, gloo, no Ray) and Ray Train (`run_ray`: TorchTrainer,
Train V2, gloo). The functions handed to the processes live here, so that they are pickled
by reference whichever module runs as __main__."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segdist.bench.common import bench_setup, median, quickstart_trial, run_steps


def dist_loop(spec: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """One rank of the benchmark loop: the trial's set-up as `fit` makes it
    (segdist.train.training_setup: DDP when world_size > 1, the host flag group, the recipe's
    optimizer, schedule, L2 term and NaN rule), its epoch-0 loader (segdist.train.epoch_loader)
    cut to spec["steps"] batches, and segdist.train.train_one_epoch over them, timed. The
    process group must already be set up (by Ray, or by _plain_worker)."""
    import torch

    from segdist.config import trial_from_dict
    from segdist.data.stream import read_dataset_info
    from segdist.train import epoch_loader

    torch.set_num_threads(spec["threads"])
    trial = trial_from_dict(spec["trial"])
    info = read_dataset_info(trial.data.train_shards)
    run = bench_setup(trial, info.num_classes, info.num_samples, rank=rank, world_size=world_size)
    loader = epoch_loader(trial, info, run, 0, rank=rank, world_size=world_size, batches=spec["steps"])
    result = run_steps(run, loader, spec["warmup"], trial.recipe.train.batch_size * world_size)
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


def dist_spec(args, shards: str) -> dict[str, Any]:
    trial = quickstart_trial(shards)
    return {
        "trial": dataclasses.asdict(trial),
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "threads": trial.recipe.resources.cpus_per_worker,
    }


def add_dist_args(p: argparse.ArgumentParser, steps: int, warmup: int, rounds: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps per run (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"runs of each kind, in turns; medians (default {rounds})")
    p.add_argument("--samples", type=int, default=256, help="synthetic training images (default 256)")
    p.add_argument("--work-dir", default=None, help="where to put generated shards (default: a temp dir)")


def loop_facts(args, spec: dict[str, Any]) -> dict[str, Any]:
    """What the ray and scale sections ran: steps, rounds, and spec's model, crop, batch,
    threads and loader workers."""
    from segdist.config import trial_from_dict

    trial = trial_from_dict(spec["trial"])
    model = trial.recipe.model
    return {
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "model": f"naked ResNet-{model.depth} width {model.width} OS {model.output_stride}",
        "crop": trial.recipe.train.crop_size[0],
        "batch_size_per_worker": trial.recipe.train.batch_size,
        "threads_per_worker": spec["threads"],
        "loader_workers_per_worker": trial.data.loader_workers,
    }


def kind_figures(runs: list[dict[str, Any]], name: Callable[[str], str]) -> dict[str, Any]:
    """The rounds of one kind of run (a list of run_plain or run_ray results), keyed by
    name(figure): the best images/s (load from other processes only ever slows a run) and
    every run's, the medians of the CPU seconds per step and of the data-wait fraction."""
    best = name("img_per_s")
    return {
        best: round(max(r["img_per_s"] for r in runs), 2),
        f"{best}_runs": [round(r["img_per_s"], 1) for r in runs],
        name("cpu_s_per_step"): round(median([r["cpu_s_per_step"] for r in runs]), 4),
        name("data_wait_fraction"): round(median([r["data_wait_fraction"] for r in runs]), 4),
    }
