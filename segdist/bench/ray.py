"""bench ray: the quick start's training loop under Ray Train and under plain
torch.distributed, in turns (segdist.bench.runners): steady-state throughput ratio and
trial start-up time. Both run the same loop, segdist's own set-up and step
(segdist.train.training_setup, epoch_loader, train_one_epoch) for a fixed number of steps."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from segdist.bench.common import median, synthetic_shards
from segdist.bench.runners import add_dist_args, dist_spec, kind_figures, loop_facts, run_plain, run_ray

HELP = "Ray Train vs plain torch.distributed: throughput ratio and trial start-up"
DESCRIPTION = (
    "The quick start's training loop (tune_spaces/quickstart.yaml: ResNet-18 width 16, "
    "OS 8, crop 96, batch 8 per worker, 1 thread and its loader workers per worker; set up as a "
    "trial is, by segdist.train.training_setup) on the "
    "generated synthetic shards, a fixed number of steps on 2 workers, under Ray Train "
    "(TorchTrainer, Train V2, gloo) and under plain torch.distributed (gloo, 2 spawned "
    "processes, no Ray, with the OMP_NUM_THREADS Ray gives its workers), in turns. "
    "ray_throughput_ratio = Ray / plain steady-state images/s (after the warm-up steps; the "
    "best run of each kind, since load from other processes only slows a run; the median of "
    "the pairs and the CPU seconds per step are reported too); trial_startup_s = from "
    "trainer.fit() to the first step on rank 0."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dist_args(p, steps=100, warmup=10, rounds=3)
    p.add_argument("--workers", type=int, default=2)


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


def run(args) -> dict:
    import ray

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        spec = dist_spec(args, synthetic_shards(tmp, args.samples, 96, 128))
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
    return {
        # best steady-state run of each kind: load from other processes only ever slows a run
        "ray_throughput_ratio": round(best_ray / best_plain, 3),
        "ray_throughput_ratio_median_of_pairs": round(median(ratios), 3),
        # CPU seconds of the training process per step (rank 0): Ray's own threads included
        "ray_cpu_per_step_ratio": round(
            median([r["cpu_s_per_step"] for r in under_ray]) / median([p["cpu_s_per_step"] for p in plain]), 3
        ),
        "trial_startup_s": round(median([r["startup_s"] for r in under_ray]), 2),
        "plain_startup_s": round(median([p["startup_s"] for p in plain]), 2),
        **kind_figures(under_ray, "ray_{}".format),
        **kind_figures(plain, "plain_{}".format),
        "ray_fit_s": round(median([r["fit_s"] for r in under_ray]), 2),
        "ray_init_s": round(ray_init_s, 2),
        "workers": args.workers,
        **loop_facts(args, spec),
        "data": "synthetic shards (generated)",
        "backend": "gloo",
    }
