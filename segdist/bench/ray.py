"""bench ray: the quick start's training loop under Ray Tune + Train and under plain
torch.distributed, in turns (segdist.bench.runners): steady-state throughput ratio and
trial start-up time, phase by phase (segdist.bench.startup). Both run the same loop, segdist's own set-up and step
(segdist.train.training_setup, epoch_loader, train_one_epoch) for a fixed number of steps."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from segdist.bench.common import median, synthetic_shards
from segdist.bench.runners import (
    add_dist_args,
    dist_spec,
    kind_figures,
    loop_facts,
    run_plain,
    run_ray_trials,
)
from segdist.bench.startup import PLAIN_MARKS, RAY_MARKS, breakdown_table, phases, ray_marks, task_events

HELP = "Ray Train vs plain torch.distributed: throughput ratio and trial start-up"
DESCRIPTION = (
    "The quick start's training loop (tune_spaces/quickstart.yaml: ResNet-18 width 16, "
    "OS 8, crop 96, batch 8 per worker, 1 thread and its loader workers per worker; set up as a "
    "trial is, by segdist.train.training_setup) on the generated synthetic shards, a fixed "
    "number of steps on --workers workers, in turns: under plain torch.distributed (gloo, "
    "spawned processes, no Ray, with the OMP_NUM_THREADS Ray gives its workers; loader "
    "processes fork as under torchrun) and as two Ray Tune trials one after the other, each a "
    "Ray Train run (TorchTrainer, Train V2, gloo) built by segdist.tune.make_trainer under Tune "
    "as segdist.tune runs trials, the second on the first one's trial actor. "
    "ray_throughput_ratio = Ray / plain steady-state images/s (after the warm-up steps; the "
    "best run of each kind, since load from other processes only slows a run; the median of "
    "the pairs and the CPU seconds per step are reported too). Start-up = from the launch "
    "(tuner.fit(), or the end of the trial before; mp.spawn for plain) to the first step on "
    "rank 0, cut into phases (segdist.bench.startup; Ray's own from its task events, which "
    "the dashboard serves) and printed as a table on stderr: startup_plain_s, "
    "startup_ray_first_s, startup_ray_next_s, the phases as startup_<kind>.<phase>_s and "
    "ray_startup_ratio_{first,next}_trial = Ray / plain (medians of the rounds)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dist_args(p, steps=100, warmup=10, rounds=3)
    p.add_argument("--workers", type=int, default=2)


def _start_ray(workers: int, threads: int) -> tuple[float, str]:
    """A local Ray for the section (segdist.cluster.start_local_ray, as segdist.tune starts
    one): (seconds ray.init took, its dashboard's URL, whose State API serves the task events)."""
    from segdist.cluster import start_local_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    # Enough logical CPUs for the workers even on a machine with fewer cores (the plain
    # runner oversubscribes the same way); both runners get the same processes and threads.
    dashboard = start_local_ray(num_cpus=max(os.cpu_count() or 1, workers * threads), log_to_driver=False,
                                configure_logging=False)
    return time.perf_counter() - started, dashboard


def _startup_figures(kind: str, runs: list[dict]) -> dict[str, float]:
    """Medians over `runs` of the start-up and of each phase, keyed startup_<kind>_*."""
    order = PLAIN_MARKS if kind == "plain" else RAY_MARKS
    per_run = [phases(r["launched"], r["marks"], order) for r in runs]
    out = {f"startup_{kind}_s": round(median([r["startup_s"] for r in runs]), 2)}
    for phase, _ in order:
        values = [p[phase] for p in per_run if phase in p]
        if values:
            out[f"startup_{kind}.{phase}_s"] = round(median(values), 2)
    return out


def _table(figures: dict[str, float], kinds: list[str]) -> str:
    rows = {}
    for kind in kinds:
        prefix = f"startup_{kind}."
        rows[kind] = {k[len(prefix):-2]: v for k, v in figures.items() if k.startswith(prefix)}
    return breakdown_table(rows)


def run(args) -> dict:
    import ray

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        spec = dist_spec(args, synthetic_shards(tmp, args.samples, 96, 128))
        ray_init_s, dashboard = _start_ray(args.workers, spec["threads"])
        plain, first, following = [], [], []
        try:
            for _ in range(args.rounds):
                plain.append(run_plain(spec, args.workers))
                since = time.time()
                trials = run_ray_trials(spec, args.workers, os.path.join(tmp, "ray_results"), trials=2)
                events = task_events(since, dashboard)
                for trial in trials:
                    trial["marks"] = ray_marks(trial["launched"], trial["marks"], events)
                first.append(trials[0])
                following.append(trials[1])
        finally:
            ray.shutdown()
    under_ray = first + following
    startup = {**_startup_figures("plain", plain), **_startup_figures("ray_first", first),
               **_startup_figures("ray_next", following)}
    sys.stderr.write("start-up, seconds (medians of the rounds):\n"
                     + _table(startup, ["plain", "ray_first", "ray_next"]) + "\n")
    best_ray = max(r["img_per_s"] for r in under_ray)
    best_plain = max(p["img_per_s"] for p in plain)
    ratios = [r["img_per_s"] / p["img_per_s"] for r, p in zip(first, plain, strict=True)]
    return {
        # best steady-state run of each kind: load from other processes only ever slows a run
        "ray_throughput_ratio": round(best_ray / best_plain, 3),
        "ray_throughput_ratio_median_of_pairs": round(median(ratios), 3),
        # CPU seconds of the training process per step (rank 0): Ray's own threads included
        "ray_cpu_per_step_ratio": round(
            median([r["cpu_s_per_step"] for r in under_ray]) / median([p["cpu_s_per_step"] for p in plain]), 3
        ),
        "ray_startup_ratio_first_trial": round(startup["startup_ray_first_s"] / startup["startup_plain_s"], 2),
        "ray_startup_ratio_next_trial": round(startup["startup_ray_next_s"] / startup["startup_plain_s"], 2),
        **startup,
        **kind_figures(under_ray, "ray_{}".format),
        **kind_figures(plain, "plain_{}".format),
        "ray_init_s": round(ray_init_s, 2),
        "workers": args.workers,
        **loop_facts(args, spec),
        "data": "synthetic shards (generated)",
        "backend": "gloo",
    }
