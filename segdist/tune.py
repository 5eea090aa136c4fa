"""`python -m segdist.tune`: run a study (configurations x seeds) as Ray Tune trials, each
trial one Ray Train TorchTrainer with N DDP workers, everything recorded in MLflow.

With no --address and no RAY_ADDRESS it starts a local Ray; otherwise it joins the
cluster, so `ray job submit -- python -m segdist.tune ...` works unchanged.

Resume: MLflow holds which trials of a study finished. `--resume` reopens the latest
unfinished run of the study, skips its finished trials, and re-creates every other
trial's TorchTrainer with the same RunConfig(name, storage_path), so Ray Train continues
it from its last checkpoint and its MLflow run gets only the epochs it lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from segdist.cluster import check_resources_fit, connect_ray, ray_logs_dir
from segdist.config import (
    StudyConfig,
    TrialConfig,
    expand_configs,
    load_study,
    read_study_file,
    smoke_study,
    trial_key,
)
from segdist.errors import SegdistError, exit_on_user_error
from segdist.outcome import FAILED, FINISHED, STOPPED_EARLY, trial_outcome
from segdist.recipe import show

STORAGE_ENV = "SEGDIST_STORAGE"  # where checkpoints and Tune state go when --storage is not given
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit`
# Tune-level retries of a trial; its worker group's own are train.max_failures. Tune cannot tell
# a dead task from a worker error that used up max_failures, which it retries too: an error
# that persists costs (max_failures + 1) x (TRIAL_RETRIES + 1) attempts, so this stays at 1.
TRIAL_RETRIES = 1
# Tune hands a finished trial's actor (its process, with segdist, torch and Ray Train already
# imported) to the next trial instead of starting a new one: every trial after a slot's first
# starts that much sooner (segdist.bench ray measures it). All trials ask for the same token
# resources, which reuse requires.
TRIAL_ACTOR_REUSE = True
DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "tune_spaces" / "quickstart.yaml"
SMOKE_SHARDS = ("shards/smoke/train", "shards/smoke/val")


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
                        help="checkpoints and trial state: a local or NFS path, or an s3:// / gs:// "
                        "URI (default: SEGDIST_STORAGE, else ./ray_results); every node must reach it")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest unfinished run of this study")
    parser.add_argument("--smoke", action="store_true",
                        help="run the study at tiny width, size and length on CPU, one seed per "
                        "configuration, on the generated data set")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials the study would start with and exit")
    parser.add_argument("--explain", action="store_true",
                        help="print every configuration's resolved recipe (what each configuration trains, "
                        "with which data and evaluation) as a table, then run (with --dry-run: then exit)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------- study preparation


def absolute_paths(study: StudyConfig) -> StudyConfig:
    """Ray runs trials in other working directories: pin relative data paths to the cwd."""
    data = study.data
    fixed = {
        key: str(Path(value).resolve())
        for key, value in dataclasses.asdict(data).items()
        if key in ("train_shards", "val_shards", "synthetic_root")
        and isinstance(value, str) and "://" not in value
    }
    return dataclasses.replace(study, data=dataclasses.replace(data, **fixed))


def prepare_data(study: StudyConfig) -> None:
    """Make the generated data set and its shards if the study asks for them, then check
    that every configuration's splits are readable and are what its recipe trains on (data
    set, image list) — before any Ray process starts."""
    from segdist.data.prepare import prepare_synthetic
    from segdist.data.stream import read_dataset_info

    data = study.data
    if data.synthetic_root:  # one generated set; a {train_list} placeholder names its train split
        first = next(iter(expand_configs(study)))
        prepare_synthetic(data.synthetic_root, first.data.train_shards, data.val_shards)
    val_info = read_dataset_info(data.val_shards)
    for config in expand_configs(study):
        info = read_dataset_info(config.data.train_shards)
        train, variant = config.recipe.train, config.recipe.model.variant
        if study.smoke or train.dataset is None:
            continue  # smoke runs every variant on the generated set, `cs` ones too
        for split in (info, val_info):
            if split.dataset != train.dataset:
                raise SegdistError(f"{study.path}: variant {variant!r} is for {train.dataset} but "
                                   f"{split.root} holds {split.dataset} shards")
        if info.split in ("train", "train_aug") and info.split != train.train_list:
            raise SegdistError(f"{study.path}: variant {variant!r} trains on the {train.train_list} list but "
                               f"{info.root} holds split {info.split} (use data.train_shards: "
                               f".../{{train_list}})")


def prepare_weights(study: StudyConfig) -> None:
    """Every configuration's ImageNet weights, fetched here once (a wrong hash, a missing file
    or an unreachable URL is one line before any training; workers on other nodes fetch their
    own copy once per node)."""
    from segdist.models.pretrained import check_pretrained_spec, fetch_pretrained

    for spec, depth in sorted({(c.recipe.model.pretrained, c.recipe.model.depth) for c in expand_configs(study)
                               if c.recipe.model.pretrained}):
        check_pretrained_spec(spec, depth, f"{study.path}: model.pretrained")
        fetch_pretrained(spec, depth)


def smoke_shards() -> tuple[str, str]:
    """The generated data set of --smoke (data/smoke, 16 + 4 images), sharded if it is not yet."""
    from segdist.data.prepare import prepare_synthetic

    train, val = (str(Path(p).resolve()) for p in SMOKE_SHARDS)
    prepare_synthetic(str(Path("data/smoke").resolve()), train, val, n_train=16, n_val=4)
    return train, val


def prepare_smoke(study: StudyConfig) -> StudyConfig:
    return smoke_study(study, *smoke_shards())


SMOKE_CRF_VARIANT = "voc.size512"  # the model whose probabilities the log's CRF rows searched over
SMOKE_CRF_PROBABILITIES = "data/smoke/probs"


def prepare_crf_smoke(grid):
    """--smoke for a CRF grid (segdist.crf.CrfGrid): the probabilities of an untrained
    smoke-size SMOKE_CRF_VARIANT over the generated validation set, with its recipe's
    evaluation (scales, flip, tiles), written afresh to SMOKE_CRF_PROBABILITIES; returns the
    grid pointed at them (name suffixed -smoke, one CRF process per trial)."""
    import shutil

    import torch

    from segdist.data.stream import read_dataset_info, val_loader
    from segdist.evaluation.loop import save_probabilities
    from segdist.models import build_model
    from segdist.resolve import resolve_recipe

    info = read_dataset_info(smoke_shards()[1])
    recipe = resolve_recipe({"model.variant": SMOKE_CRF_VARIANT, "model.pretrained": None}, "original",
                            grid.path, smoke=True)
    torch.manual_seed(0)
    model = build_model(recipe.model, info.num_classes, load_pretrained=False).eval()
    folder = Path(SMOKE_CRF_PROBABILITIES).resolve()
    shutil.rmtree(folder, ignore_errors=True)  # no samples of an earlier run left beside the new ones
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0, with_keys=True)
    e = recipe.eval
    save_probabilities(model, loader, folder, info.classes, torch.device("cpu"), scales=e.scales, flip=e.flip,
                       tile_size=e.tile, meta={"variant": SMOKE_CRF_VARIANT, "smoke": True})
    return dataclasses.replace(grid, name=f"{grid.name}-smoke", probabilities=str(folder), workers=1)


def resolve_stores(tracking_uri: str | None, storage: str | None) -> tuple[str, str]:
    """(MLflow tracking URI, storage for checkpoints and Tune state) from --tracking-uri and
    --storage, else the environment (MLFLOW_TRACKING_URI, SEGDIST_STORAGE: what the cluster
    YAMLs give the head's Ray processes, so a `ray job submit` without flags finds them),
    else ./mlflow.db and ./ray_results. Each checked before any compute: unreachable or not
    writable, or, inside a Ray job, under the job's working directory (a temporary copy Ray
    deletes with the job), raises SegdistError."""
    from segdist.mlflow_store import check_reachable, local_store_path, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri)
    storage = storage or os.environ.get(STORAGE_ENV) or None
    if RAY_JOB_ENV in os.environ:
        local_storage = None if storage and "://" in storage else Path(storage or "ray_results").resolve()
        lost = [name for name, path in (("MLflow store", local_store_path(tracking_uri)), ("storage", local_storage))
                if path is not None and path.resolve().is_relative_to(Path.cwd().resolve())]
        if lost:
            raise SegdistError(
                f"inside a Ray job the working directory {Path.cwd()} is a temporary copy that Ray deletes: the "
                f"{' and the '.join(lost)} would be lost with it; start the head's Ray with MLFLOW_TRACKING_URI "
                f"and {STORAGE_ENV} in its environment (cluster/*.yaml do) or pass --tracking-uri and --storage")
    check_reachable(tracking_uri)
    return tracking_uri, resolve_storage(storage)


def resolve_storage(storage: str | None) -> str:
    """A local/NFS folder (created) or a pyarrow URI (s3://, gs://, ...); checked before any
    training: a URI must take a small probe object from this process (its bucket exists, the
    environment's credentials are accepted, the server answers), else SegdistError naming it."""
    if storage and "://" in storage:
        from segdist.storage import check_writable

        check_writable(storage)
        return storage
    folder = Path(storage or "ray_results").resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegdistError(f"storage {folder}: cannot create it: {err.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise SegdistError(f"storage {folder}: not writable")
    return str(folder)


def check_stores_from_nodes(study: StudyConfig, storage: str) -> None:
    """After connecting to Ray: every alive node must write the storage and read every
    split's dataset.json when they are URIs (s3://...): the driver reaching them says nothing
    of nodes with other credentials or networks. SegdistError naming the node and URI."""
    from segdist.data.sample import DATASET_JSON
    from segdist.storage import check_from_nodes

    splits = {study.data.val_shards, *(config.data.train_shards for config in expand_configs(study))}
    check_from_nodes([storage], [f"{split.rstrip('/')}/{DATASET_JSON}" for split in sorted(splits)])


@functools.cache
def _num_classes(train_shards: str) -> int:
    """The class count of a split's dataset.json, read once per driver (the searcher asks for
    it with every trial it suggests; on object storage each read is a request)."""
    from segdist.data.stream import read_dataset_info

    return read_dataset_info(train_shards).num_classes


def trial_params(trial: TrialConfig, storage: str) -> dict[str, Any]:
    """One Tune trial's config: the trial plus what the MLflow callback needs (its params:
    the flat recipe and the model's static facts, computed here in the driver)."""
    from segdist.train import model_facts

    values = dataclasses.asdict(trial)
    values["flat"] = trial.flat()
    values["model_facts"] = model_facts(trial, _num_classes(trial.data.train_shards))
    values["trial_key"] = trial_key(trial)
    return {"trial": values, "storage": storage}


def describe_trials(study: StudyConfig) -> str:
    configs = expand_configs(study)
    seeds = study.seeds
    how = (f"adaptive seeds: {len(seeds.initial)} to {seeds.max_seeds} per configuration, "
           f"until the 95% CI half-width <= {seeds.ci_halfwidth:g} points"
           if seeds.adaptive else f"seeds {list(seeds.initial)}")
    lines = [f"{len(configs) * len(seeds.initial)} trials ({len(configs)} configurations x seeds; {how}; "
             f"protocol {study.protocol}):"]
    for config in configs:
        r = config.recipe
        chosen = " ".join(f"{key}={value}" for key, value in config.overrides.items() if key != "model.variant")
        lines.append(
            f"  {config.config_id} variant={r.model.variant} crop={show('train.crop_size', r.train.crop_size)} "
            f"batch={r.train.batch_size}x{r.resources.workers} passes={r.passes_per_epoch:g}x{r.train.epochs} "
            f"{chosen}".rstrip()
        )
    return "\n".join(lines)


def explain(study: StudyConfig) -> str:
    """Every configuration's resolved recipe as a table (segdist.recipe.explain_table)."""
    from segdist.recipe import explain_table

    configs = expand_configs(study)
    head = (f"Recipes of study {study.name!r} ({study.path}): protocol {study.protocol}, "
            f"{len(configs)} configurations")
    labels = [f"{c.config_id} {c.recipe.model.variant}" for c in configs]
    return head + "\n\n" + explain_table([c.recipe for c in configs], labels) + "\n"


# ----------------------------------------------------------------- Ray


RESTARTED = ".restarted"  # a trial's Ray Train run name after its checkpoint was found gone


def run_trial(params: dict[str, Any]) -> None:
    """One Tune trial = one Ray Train run (Train V2: build and fit a TorchTrainer here).
    Its RunConfig name is the trial key under the study run's storage, so re-creating it
    (worker restart, --resume) continues from the last checkpoint.

    A checkpoint deleted from the storage makes Ray Train refuse the run (its record names
    it): the trial then goes on under the name key + RESTARTED (from epoch 0, or from that
    run's checkpoint on a later resume), with one warning line naming the checkpoint (failing it would lose it: a study that ended cannot
    be resumed). An unreadable checkpoint file is train.read_resume_state's."""
    import ray.exceptions

    name = params["trial"]["trial_key"]
    try:
        make_trainer(params, name).fit()
    except ray.exceptions.RayActorError as err:
        if not (err.actor_init_failed and "CheckpointManagerInitializationError" in str(err)):
            raise
        found = re.search(r"path=([^,)\s]+)", str(err))
        where = found.group(1) if found else f"{params['storage']}/{name}"
        print(f"segdist: warning: checkpoint {where} is gone from the storage; trial {name} goes on as "
              f"{name}{RESTARTED}, from that run's own checkpoint or else from epoch 0", file=sys.stderr, flush=True)
        make_trainer(params, name + RESTARTED).fit()


def make_trainer(params: dict[str, Any], name: str, train_loop=None):
    """The trial's TorchTrainer, its Ray Train run called `name` under params["storage"].
    Each worker runs `train_loop(params)` (default: segdist.train.ray_train_loop; the bench
    passes its own loop to time a trial's start-up as segdist runs it)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from segdist.train import ray_train_loop

    trial = params["trial"]
    res = trial["recipe"]["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    worker_resources = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        worker_resources["GPU"] = res["gpus_per_worker"]
    return TorchTrainer(
        train_loop or ray_train_loop,
        train_loop_config=params,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=worker_resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=params["storage"],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=trial["recipe"]["train"]["max_failures"]),
            callbacks=[TuneReportCallback()],
            # Ray Train's INFO lines (each worker's report, each checkpoint, the worker group's
            # start) stay in its log files on each node; warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def make_searcher(scheduler, storage: str):
    """Tune asks this for the next trial; it hands out the seed scheduler's trials."""
    from ray.tune.search import Searcher

    from segdist.stats import HEADLINE_METRIC

    class SeedSearcher(Searcher):
        def __init__(self):
            super().__init__()
            self.live: dict[str, TrialConfig] = {}

        def suggest(self, trial_id: str):
            trial = scheduler.next_trial()
            if trial is None:
                return Searcher.FINISHED if scheduler.done() else None
            self.live[trial_id] = trial
            return trial_params(trial, storage)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            trial = self.live.pop(trial_id, None)
            if trial is None:
                return
            outcome = trial_outcome(result, trial.recipe.train.epochs, "error" if error else None)
            scheduler.record(trial, result.get(HEADLINE_METRIC) if outcome == FINISHED else None,
                             fault=outcome == FAILED)

    return SeedSearcher()


def find_study_to_resume(uri: str, study: StudyConfig) -> str:
    from mlflow.entities import LifecycleStage, ViewType

    from segdist.mlflow_store import ROLE_TAG, STUDY_TAG, client_for, experiment_by_name, quote_filter_value

    client = client_for(uri)
    experiment = experiment_by_name(client, study.name)
    deleted = experiment is not None and experiment.lifecycle_stage == LifecycleStage.DELETED
    run = None
    if experiment is not None:
        # The study's name is the user's: it goes into the filter only where MLflow's grammar
        # can quote it, and is compared here in any case.
        quoted = quote_filter_value(study.name)
        filter_string = f"tags.`{ROLE_TAG}` = 'study'" + (f" and tags.`{STUDY_TAG}` = {quoted}" if quoted else "")
        page_token = None
        while run is None:
            page = client.search_runs(
                [experiment.experiment_id], filter_string=filter_string,
                # A deleted experiment's runs are deleted with it; the tracker restores both.
                run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
                order_by=["attributes.start_time DESC"], max_results=200, page_token=page_token,
            )
            run = next((r for r in page if r.data.tags.get(STUDY_TAG) == study.name), None)
            page_token = page.token
            if not page_token:
                break
    if run is None:
        where = f" (its MLflow experiment, id {experiment.experiment_id}, is deleted)" if deleted else ""
        raise SegdistError(f"--resume: no earlier run of study {study.name!r} in {uri}{where}")
    if run.info.status == "FINISHED":
        raise SegdistError(f"--resume: the latest run of study {study.name!r} ({run.info.run_id}) already finished")
    return run.info.run_id


def ended_trials(existing: dict[str, Any]) -> dict[str, tuple[float | None, bool]]:
    """Of a resumed study's trial runs (trial key -> MLflow run), those that ended: the ones
    with a status tag (finished, stopped_early, diverged or failed: the tag is the callback's
    last write of a trial), as (final metric or None, failed for good) for the seed scheduler,
    the same as the searcher recorded them. A run without the tag did not end as far as MLflow
    knows: its trial runs again, from its checkpoint (one of its last epoch reports that epoch
    again, train.fit)."""
    from segdist.mlflow_store import STATUS_TAG
    from segdist.stats import HEADLINE_METRIC

    ended = {}
    for key, run in existing.items():
        status = run.data.tags.get(STATUS_TAG)
        if status:
            ended[key] = (run.data.metrics.get(HEADLINE_METRIC) if status == FINISHED else None, status == FAILED)
    return ended


def end_runs_left_running(tracker, existing: dict[str, Any], ended: dict[str, Any]) -> None:
    """Ended trials whose MLflow run is still RUNNING (the driver died between the trial's
    status tag and its run's end) are ended now, as the callback would have: FAILED for a
    diverged or failed trial, FINISHED otherwise."""
    from segdist.mlflow_store import STATUS_TAG

    for key in ended:
        run = existing[key]
        if run.info.status == "RUNNING":
            tracker.start_trial(key, key, {}, run_id=run.info.run_id)
            tracker.finish(key, "FINISHED" if run.data.tags[STATUS_TAG] in (FINISHED, STOPPED_EARLY) else "FAILED")


def run_study(study: StudyConfig, args: argparse.Namespace, tracking_uri: str, storage_root: str):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from segdist.mlflow_callback import MlflowTrialCallback
    from segdist.report import collect_rows, seeds_figure, study_table
    from segdist.seeds import SeedScheduler
    from segdist.stats import HEADLINE_METRIC
    from segdist.tracking import StudyTracker

    parent = find_study_to_resume(tracking_uri, study) if args.resume else None
    tracker = StudyTracker(tracking_uri, study.name, study.name, parent_run_id=parent)
    existing = tracker.existing_trials() if parent else {}
    if parent is None:
        tracker.log_params("study", {
            "study.path": study.path, "study.seeds": dataclasses.asdict(study.seeds),
            "study.configurations": len(expand_configs(study)), "study.smoke": study.smoke,
            "study.baseline": study.baseline or "",
        })
        tracker.log_text("study", Path(study.path).read_text(), "study.yaml")
    # One folder per study run: a fresh study never resumes an old one's checkpoints.
    storage = f"{storage_root.rstrip('/')}/{study.name}/{tracker.parent_run_id}"
    ended = ended_trials(existing)
    end_runs_left_running(tracker, existing, ended)
    scheduler = SeedScheduler(expand_configs(study), study.seeds, ended=ended)
    callback = MlflowTrialCallback(tracker, storage, existing=existing, baseline=study.baseline, progress=sys.stdout)
    screening = study.screening
    tuner = ray.tune.Tuner(
        # The trial function only waits on its TorchTrainer, whose workers hold the CPUs.
        # Tune refuses an empty request and its default (1 CPU) would starve the workers
        # on a small machine, so it asks for a token byte of memory instead.
        ray.tune.with_resources(run_trial, {"memory": 1}),
        tune_config=ray.tune.TuneConfig(
            search_alg=make_searcher(scheduler, storage),
            num_samples=-1,  # until the searcher says FINISHED
            max_concurrent_trials=study.max_concurrent_trials,
            reuse_actors=TRIAL_ACTOR_REUSE,
            # The metric is ASHA's alone: set here, Tune would print the best trial's whole
            # config (every recipe field) in each status update.
            # max_t past the last epoch: a trial's own end must not be an ASHA stop.
            scheduler=ASHAScheduler(
                metric="val_miou", mode="max", time_attr="training_iteration",
                max_t=max(c.recipe.train.epochs for c in expand_configs(study)) + 1,
                grace_period=screening.grace_period, reduction_factor=screening.reduction_factor,
            ) if screening else None,
        ),
        run_config=ray.tune.RunConfig(
            # verbose=0: Tune's own tables print every trial's whole config; the callback says
            # one line per trial epoch and per trial end instead.
            name="tune", storage_path=storage, callbacks=[callback], verbose=0,
            # A trial whose own task died (its node lost before its Train controller started,
            # or the controller itself): run_trial again, which continues from the checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=TRIAL_RETRIES),
        ),
    )
    results = tuner.fit()
    # A diverged trial is a result (the table says so), not a failure of the study.
    errors = sum(1 for result in results if result.error is not None and trial_outcome(None, 1, result.error) == FAILED)
    decisions = scheduler.decisions()
    tracker.log_text("study", json.dumps(decisions, indent=2), "seed_decisions.json")
    table = "(no table: MLflow was unreachable at the end of the study)"
    if tracker.drain():
        table = study_table(tracker.client, tracker.experiment_id, tracker.parent_run_id, HEADLINE_METRIC,
                            baseline=study.baseline, decisions=decisions)
        tracker.log_text("study", table, "report.md")
        rows = collect_rows(tracker.client, tracker.experiment_id, tracker.parent_run_id, HEADLINE_METRIC)
        tracker.log_image("study", seeds_figure(rows, HEADLINE_METRIC), "seeds.png")
        tracker.finish("study", "FINISHED")
    unsent = tracker.save_pending(Path(storage_root) if "://" not in storage_root else Path.cwd())
    return table, errors, callback, unsent


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _study_kind(args.space) == "crf_grid":
        return run_crf_study(args)
    study = absolute_paths(load_study(args.space))
    if args.explain:
        print(explain(smoke_study(study, *SMOKE_SHARDS) if args.smoke else study), flush=True)
    if args.dry_run:
        print(describe_trials(smoke_study(study, *SMOKE_SHARDS) if args.smoke else study))
        return 0

    tracking_uri, storage_root = resolve_stores(args.tracking_uri, args.storage)
    study = prepare_smoke(study) if args.smoke else study
    prepare_data(study)
    prepare_weights(study)
    started = time.time()
    connect_ray(args.address)
    check_resources_fit(study)
    check_stores_from_nodes(study, storage_root)
    print(describe_trials(study), flush=True)
    print(f"Ray's logs (each worker's output, Ray Train's reports): {ray_logs_dir()}", flush=True)
    table, errors, callback, unsent = run_study(study, args, tracking_uri, storage_root)
    print()
    print(table)
    startup = [t["startup_s"] for t in callback.timings.values()]
    if startup:
        print(f"\nmean trial startup (Ray worker group up to the training function): "
              f"{sum(startup) / len(startup):.1f} s")
    print(f"study wall time: {time.time() - started:.0f} s; MLflow: {tracking_uri} "
          f"(experiment {study.name!r}, parent run {callback.tracker.parent_run_id})")
    if unsent:
        print(f"segdist: error: some MLflow writes were not sent (MLflow refused them, their files were "
              f"gone, or the store did not come back); they are listed in {unsent}", file=sys.stderr)
        return 1
    if errors:
        print(f"segdist: {errors} trial(s) failed; see the table and the MLflow runs",
              file=sys.stderr)
        return 1
    return 0


def run_crf_study(args: argparse.Namespace) -> int:
    """A DenseCRF grid over saved probabilities (no training): one Tune trial per
    parameter set, each an MLflow child run of the study's parent run."""
    from segdist.crf import load_crf_grid, run_crf_grid
    from segdist.epoch_report import EpochReport
    from segdist.mlflow_store import STATUS_TAG
    from segdist.tracking import StudyTracker

    grid = load_crf_grid(args.space)
    if args.smoke and not (args.dry_run or args.explain):
        grid = prepare_crf_smoke(grid)
    if args.dry_run or args.explain:  # a grid's recipe is its parameter sets
        combos = grid.combinations()
        print(f"{len(combos)} CRF trials over {grid.probabilities}:")
        for params in combos:
            print("  " + " ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(params).items()), flush=True)
    if args.dry_run:
        return 0
    tracking_uri, storage = resolve_stores(args.tracking_uri, args.storage)
    connect_ray(args.address)
    tracker = StudyTracker(tracking_uri, grid.name, grid.name)
    tracker.log_text("study", Path(grid.path).read_text(), "study.yaml")
    results = run_crf_grid(grid, storage_path=storage)
    rows = []
    for index, result in enumerate(results):
        params = {k: v for k, v in result.config.items() if k not in ("probabilities", "limit", "workers")}
        handle = tracker.start_trial(f"crf-{index}", f"crf-{index}", params)
        failed = result.error is not None or not result.metrics
        if not failed:
            tracker.log_metrics(handle, EpochReport.from_result(result.metrics).metrics, step=0)
            rows.append((result.metrics["val_miou"], params))
        tracker.set_tags(handle, {STATUS_TAG: FAILED if failed else FINISHED})
        tracker.finish(handle, "FAILED" if failed else "FINISHED")
    table = "\n".join(["| CRF parameters | val_miou (%) |", "|---|---|"] + [
        f"| {' '.join(f'{k}={v:g}' for k, v in p.items())} | {100 * miou:.2f} |"
        for miou, p in sorted(rows, key=lambda r: -r[0])])
    tracker.log_text("study", table, "report.md")
    tracker.finish("study", "FINISHED")
    print(table)
    tracker.drain()
    unsent = tracker.save_pending(Path.cwd())
    if unsent:
        print(f"segdist: error: some MLflow writes were not sent; they are listed in {unsent}", file=sys.stderr)
    return 0 if len(rows) == len(results) and not unsent else 1


def _study_kind(path: str) -> str:
    """Training studies have no `kind`; other kinds (crf_grid) have their own runner."""
    raw = read_study_file(path)
    return raw.get("kind", "training") if isinstance(raw, dict) else "training"


if __name__ == "__main__":
    sys.exit(main())
