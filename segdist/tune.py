"""`python -m segdist.tune`: run a study (configurations x seeds) as Ray Tune trials, each
trial one Ray Train TorchTrainer with N DDP workers, everything recorded in MLflow.

With no --address and no RAY_ADDRESS it starts a local Ray; otherwise it joins the
cluster, so `ray job submit -- python -m segdist.tune ...` works unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from segdist.config import StudyConfig, TrialConfig, expand_trials, load_study
from segdist.errors import SegdistError, exit_on_user_error

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "tune_spaces" / "quickstart.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.tune",
        description="Run a study: every configuration of the search space, repeated over the "
        "study's seeds, as Ray Tune trials of distributed Ray Train runs, logged to MLflow.",
    )
    parser.add_argument("--space", default=str(DEFAULT_SPACE),
                        help="study YAML (default: tune_spaces/quickstart.yaml)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or HOST:PORT); default: RAY_ADDRESS, "
                        "else start a local Ray")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else "
                        "sqlite:///./mlflow.db")
    parser.add_argument("--storage", default=None,
                        help="where Ray keeps checkpoints and trial state (default: ./ray_results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials the study would run and exit")
    return parser.parse_args(argv)


# ----------------------------------------------------------------- study preparation


def absolute_paths(study: StudyConfig) -> StudyConfig:
    """Ray runs trials in other working directories: pin relative data paths to the cwd."""
    data = study.base.data
    fixed = {
        key: str(Path(value).resolve())
        for key, value in dataclasses.asdict(data).items()
        if key in ("train_shards", "val_shards", "synthetic_root")
        and isinstance(value, str) and "://" not in value
    }
    base = dataclasses.replace(study.base, data=dataclasses.replace(data, **fixed))
    return dataclasses.replace(study, base=base)


def prepare_data(study: StudyConfig) -> None:
    """Make the synthetic data set and its shards if the study asks for them, then check
    that both splits are readable — before any Ray process starts."""
    from segdist.data.prepare import prepare_synthetic
    from segdist.data.stream import read_dataset_info

    data = study.base.data
    if data.synthetic_root:
        prepare_synthetic(data.synthetic_root, data.train_shards, data.val_shards)
    for split in (data.train_shards, data.val_shards):
        read_dataset_info(split)


def trial_params(trial: TrialConfig) -> dict[str, Any]:
    """One entry of Tune's grid: the trial's config plus what the MLflow callback needs."""
    values = dataclasses.asdict(trial)
    values["flat"] = trial.flat()
    values["trial_key"] = f"{trial.config_id}-seed{trial.train.seed}"
    return values


def describe_trials(trials: list[TrialConfig]) -> str:
    lines = [f"{len(trials)} trials ({len({t.config_id for t in trials})} configurations x seeds):"]
    for trial in trials:
        chosen = " ".join(f"{key}={value}" for key, value in trial.overrides.items())
        lines.append(
            f"  {trial.config_id} seed={trial.train.seed} variant={trial.model.variant} "
            f"lr={trial.train.lr:g} head_lr_mult={trial.train.head_lr_mult:g} "
            f"epochs={trial.train.epochs} workers={trial.resources.workers} {chosen}".rstrip()
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- Ray


def connect_ray(address: str | None, study: StudyConfig) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # Workers find the package through the working directory on a cluster (ray job submit
    # uploads it); locally the driver's sys.path is inherited.
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def check_resources_fit(study: StudyConfig) -> None:
    """A trial that cannot be placed would wait forever: refuse it with one line instead."""
    import ray

    res = study.resources
    need_cpu = res.workers * res.cpus_per_worker
    need_gpu = res.workers * res.gpus_per_worker
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    largest_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
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
        raise SegdistError(f"{study.path}: resources do not fit the cluster: " + "; ".join(problems))


def run_trial(params: dict[str, Any]) -> None:
    """One Tune trial = one Ray Train run (Train V2: build and fit a TorchTrainer here)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from segdist.train import ray_train_loop

    trial = params["trial"]
    res = trial["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    worker_resources = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        worker_resources["GPU"] = res["gpus_per_worker"]
    context = ray.tune.get_context()
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"trial": trial},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=worker_resources
        ),
        run_config=ray.train.RunConfig(
            name=f"{context.get_experiment_name()}-{trial['trial_key']}",
            storage_path=params["storage"],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
            ),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def run_study(study: StudyConfig, trials: list[TrialConfig], args: argparse.Namespace, tracking_uri: str):
    import ray.tune

    from segdist.report import study_table
    from segdist.tracking import MlflowTrialCallback, StudyTracker

    storage = str(Path(args.storage or "ray_results").resolve()) if "://" not in (args.storage or "") else args.storage
    tracker = StudyTracker(tracking_uri, study.name, study.name, {"study.path": study.path, "study.seeds": list(study.seeds),
                                                                  "study.trials": len(trials)})
    tracker.log_text(tracker.parent_run_id, Path(study.path).read_text(), "study.yaml")
    callback = MlflowTrialCallback(tracker)
    tuner = ray.tune.Tuner(
        # The trial function only waits on its TorchTrainer, whose workers hold the CPUs.
        # Tune refuses an empty request and its default (1 CPU) would starve the workers
        # on a small machine, so it asks for a token byte of memory instead.
        ray.tune.with_resources(run_trial, {"memory": 1}),
        param_space={
            "trial": ray.tune.grid_search([trial_params(t) for t in trials]),
            "storage": storage,
        },
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=study.resources.max_concurrent_trials),
        run_config=ray.tune.RunConfig(
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            callbacks=[callback],
            verbose=1,
        ),
    )
    results = tuner.fit()
    failed = sum(1 for r in results if r.error is not None)
    table = study_table(tracker.client, tracker.experiment_id, tracker.parent_run_id)
    tracker.log_text(tracker.parent_run_id, table, "report.md")
    tracker.finish(tracker.parent_run_id, "FAILED" if failed == len(trials) else "FINISHED")
    return table, failed, callback


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = absolute_paths(load_study(args.space))
    trials = expand_trials(study)
    if args.dry_run:
        print(describe_trials(trials))
        return 0

    from segdist.tracking import check_reachable, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(tracking_uri)
    prepare_data(study)
    started = time.time()
    connect_ray(args.address, study)
    check_resources_fit(study)
    print(describe_trials(trials), flush=True)
    table, failed, callback = run_study(study, trials, args, tracking_uri)
    print()
    print(table)
    startup = [t["startup_s"] for t in callback.timings.values()]
    if startup:
        print(f"\nmean trial startup (Ray worker group + data): {sum(startup) / len(startup):.1f} s")
    print(f"study wall time: {time.time() - started:.0f} s; MLflow: {tracking_uri} "
          f"(experiment {study.name!r}, parent run {callback.tracker.parent_run_id})")
    if failed:
        print(f"segdist: {failed} of {len(trials)} trials failed; see the MLflow runs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
