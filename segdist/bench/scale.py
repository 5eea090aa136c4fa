"""bench scale: the quick start's training loop (as in `ray`: segdist.bench.runners) on 1
and on 2 plain torch.distributed workers, in turns: scaling efficiency."""

from __future__ import annotations

import functools
import os
import tempfile

from segdist.bench.common import median, synthetic_shards
from segdist.bench.runners import add_dist_args, dist_spec, kind_figures, loop_facts, run_plain

HELP = "1 vs 2 plain torch.distributed workers: scaling efficiency"
DESCRIPTION = (
    "The quick start's loop (as in `ray`) on 1 and on 2 plain torch.distributed "
    "workers (gloo), the same batch per worker, in turns: scaling_efficiency = "
    "images/s(2) / (2 x images/s(1)) (best run of each kind). On a machine with 2 cores the 2 workers and their "
    "loader processes share those cores, so this measures the machine as much as the code."
)

# --steps, --warmup, --rounds, --samples and --work-dir, with this section's defaults
add_arguments = functools.partial(add_dist_args, steps=60, warmup=10, rounds=3)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        spec = dist_spec(args, synthetic_shards(tmp, args.samples, 96, 128))
        one, two = [], []
        for _ in range(args.rounds):
            one.append(run_plain(spec, 1))
            two.append(run_plain(spec, 2))
    effs = [b["img_per_s"] / (2 * a["img_per_s"]) for a, b in zip(one, two, strict=True)]
    best_one = max(a["img_per_s"] for a in one)
    best_two = max(b["img_per_s"] for b in two)
    facts = loop_facts(args, spec)
    processes = 2 * (1 + facts["loader_workers_per_worker"])
    return {
        # best run of each kind (load from other processes only ever slows a run)
        "scaling_efficiency": round(best_two / (2 * best_one), 3),
        "scaling_efficiency_median_of_pairs": round(median(effs), 3),
        **kind_figures(one, "{}_1_worker".format),
        **kind_figures(two, "{}_2_workers".format),
        "runner": "plain torch.distributed (gloo, spawned processes)",
        **facts,
        "cores": os.cpu_count(),
        "note": f"2 workers run {processes} busy processes (training + loader) on {os.cpu_count()} cores",
    }
