"""The Ray cluster a study runs on: connecting to it (or starting a local one) and checking,
before any trial starts, that every configuration's resources fit it."""

from __future__ import annotations

import os

from segdist.config import StudyConfig, expand_configs
from segdist.errors import SegdistError


def connect_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group
        # cleaner needs: without it, a trial stopped early (ASHA) leaks its CPUs for good.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def check_resources_fit(study: StudyConfig) -> None:
    """A trial that cannot be placed would wait forever: refuse it with one line instead. Each
    configuration is checked with its own resources (a 4gpu variant asks for 4 workers)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    largest_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    for config in expand_configs(study):
        res = config.recipe.resources
        need_cpu, need_gpu = res.workers * res.cpus_per_worker, res.workers * res.gpus_per_worker
        problems = []
        if total.get("CPU", 0) < need_cpu:
            problems.append(f"{need_cpu:g} CPUs per trial but the cluster has {total.get('CPU', 0):g}")
        if total.get("GPU", 0) < need_gpu:
            problems.append(f"{need_gpu:g} GPUs per trial but the cluster has {total.get('GPU', 0):g}")
        if res.cpus_per_worker > largest_cpu:
            problems.append(f"{res.cpus_per_worker} CPUs per worker but the largest node has {largest_cpu:g}")
        if res.gpus_per_worker > largest_gpu:
            problems.append(f"{res.gpus_per_worker:g} GPUs per worker but the largest node has {largest_gpu:g}")
        if problems:
            raise SegdistError(f"{study.path}: resources of {config.recipe.model.variant} ({res.workers} workers) "
                               "do not fit the cluster: " + "; ".join(problems))
