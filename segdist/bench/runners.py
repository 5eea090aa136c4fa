"""The quick start's training loop on several workers, for the `ray` and `scale` sections:
one rank's loop (`dist_loop`) and the two ways to start the ranks, plain torch.distributed
(`run_plain`: spawned processes, gloo, no Ray) and Ray Tune + Train (`run_ray_trials`: TorchTrainer,
Train V2, gloo). The functions handed to the processes live here, so that they are pickled
by reference whichever module runs as __main__."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segdist.bench.common import bench_setup, median, quickstart_trial, run_steps


def dist_loop(spec: dict[str, Any], rank: int, world_size: int, marks: dict[str, float]) -> dict[str, Any]:
    """One rank of the benchmark loop: the trial's set-up as `fit` makes it
    (segdist.train.training_setup: DDP when world_size > 1, the host flag group, the recipe's
    optimizer, schedule, L2 term and NaN rule), its epoch-0 loader (segdist.train.epoch_loader)
    cut to spec["steps"] batches, and segdist.train.train_one_epoch over them, timed. The
    process group must already be set up (by Ray, or by _plain_worker).

    `marks` (wall-clock seconds, time.time(), from the caller: "entered" at least) gets the
    start-up marks of segdist's own part: "imported" (segdist.train and its imports),
    "dataset_opened" (dataset.json read), "model_built" (training_setup), "loader_ready"
    (epoch_loader) and "first_batch" (the first batch handed to the step); the result
    carries them as "mark_<name>"."""
    import torch

    from segdist.config import trial_from_dict
    from segdist.data.stream import read_dataset_info
    from segdist.train import epoch_loader

    marks["imported"] = time.time()
    torch.set_num_threads(spec["threads"])
    trial = trial_from_dict(spec["trial"])
    info = read_dataset_info(trial.data.train_shards)
    marks["dataset_opened"] = time.time()
    run = bench_setup(trial, info.num_classes, info.num_samples, rank=rank, world_size=world_size)
    marks["model_built"] = time.time()
    loader = epoch_loader(trial, info, run, 0, rank=rank, world_size=world_size, batches=spec["steps"])
    marks["loader_ready"] = time.time()
    result = run_steps(run, loader, spec["warmup"], trial.recipe.train.batch_size * world_size)
    marks["first_batch"] = result["first_step_at"]
    result["rank"] = rank
    result.update({f"mark_{name}": at for name, at in marks.items()})
    return result


def _plain_worker(rank: int, world_size: int, spec: dict, rendezvous: str, queue) -> None:
    import multiprocessing

    import torch.distributed as dist

    marks = {"entered": time.time()}
    # Loader processes fork, as they do under torchrun or in a Ray worker: a child of
    # torch.multiprocessing.spawn would spawn them too (each re-importing torch and segdist).
    multiprocessing.set_start_method("fork", force=True)
    if world_size > 1:
        # a file rendezvous: no port to pick (and to lose to another process) beforehand
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    marks["process_group"] = time.time()
    try:
        result = dist_loop(spec, rank, world_size, marks)
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
    return _run_figures(results[0], launched)


def _run_figures(rank0: dict[str, Any], launched: float) -> dict[str, Any]:
    """One run's figures from rank 0's dist_loop result: steady-state throughput, CPU per
    step, the start-up (launch to the first step) and the start-up marks."""
    return {
        "img_per_s": rank0["img_per_s"],
        "data_wait_fraction": rank0["data_wait_fraction"],
        "cpu_s_per_step": rank0["cpu_s_per_step"],
        "startup_s": rank0["first_step_at"] - launched,
        "launched": launched,
        "marks": {k[len("mark_"):]: v for k, v in rank0.items() if k.startswith("mark_")},
        "timed_steps": rank0["timed_steps"],
    }


def _ray_worker(config: dict) -> None:
    import ray.train

    marks = {**config["spec"].get("trial_marks", {}), "entered": time.time()}
    context = ray.train.get_context()
    result = dist_loop(config["spec"], context.get_world_rank(), context.get_world_size(), marks)
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if context.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    # Train V2 keeps the metrics of reports that carry a checkpoint: a tiny one from rank 0
    # (written after the timed steps)
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "bench.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _ray_trial(params: dict[str, Any]) -> None:
    """The Tune trial function: segdist.tune.run_trial's TorchTrainer (segdist.tune.make_trainer)
    with the bench loop (_ray_worker) as its train function."""
    trial_started = time.time()
    from segdist.tune import make_trainer

    trainer = make_trainer(params, f"bench-{params['round']}-{time.time_ns()}", train_loop=_ray_worker)
    # the workers' config is `params` itself (make_trainer): they get the marks taken here
    params["spec"] = {**params["spec"], "trial_marks": {"trial_started": trial_started, "trainer_built": time.time()}}
    trainer.fit()


def run_ray_trials(spec: dict[str, Any], world_size: int, storage: str, trials: int) -> list[dict[str, Any]]:
    """spec's loop as `trials` Ray Tune trials one after the other, each a Ray Train run
    (TorchTrainer, Train V2, gloo, `world_size` workers of spec["threads"] CPUs) built by
    segdist.tune.make_trainer and run under Tune as segdist.tune.run_study runs trials
    (the trial function asks for a token of memory; segdist.tune.TRIAL_ACTOR_REUSE). A
    trial's launch is tuner.fit() for the first and the end of the one before for the others
    (Tune's own time between trials included). Each result: rank 0's figures, "launched",
    "startup_s" (launch to the first step) and "marks" (dist_loop's and the trial function's)."""
    import ray.tune

    from segdist.tune import TRIAL_ACTOR_REUSE

    ends: list[float] = []

    class _Ends(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ends.append(time.time())

    trial = copy.deepcopy(spec["trial"])
    trial["recipe"]["resources"].update(workers=world_size, cpus_per_worker=spec["threads"], gpus_per_worker=0)
    trial["trial_key"] = "bench"
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_ray_trial, {"memory": 1}),
        param_space={"trial": trial, "spec": spec, "storage": storage,
                     "round": ray.tune.grid_search(list(range(trials)))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=1, reuse_actors=TRIAL_ACTOR_REUSE),
        run_config=ray.tune.RunConfig(name=f"segdist-bench-{os.getpid()}-{time.time_ns()}", storage_path=storage,
                                      callbacks=[_Ends()], verbose=0),
    )
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's experiment box: stdout is the bench's figures
        results = tuner.fit()
    runs = []
    for result in sorted(results, key=lambda r: r.config["round"]):
        if result.error is not None:
            raise RuntimeError(f"bench trial failed: {result.error}")
        runs.append(_run_figures(result.metrics, started if not runs else ends[len(runs) - 1]))
    return runs


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
