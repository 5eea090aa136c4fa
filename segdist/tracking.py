"""MLflow: one parent run per study, one child run per trial.

Everything is logged from the Tune driver (a Tune callback), so only the driver has to
reach the tracking store; training workers never talk to MLflow.
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from segdist.errors import SegdistError

DEFAULT_STORE = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_KEY_TAG = "segdist.trial_key"  # config_id + seed: finds a trial's run again on resume
STUDY_TAG = "segdist.study"
# Result keys that are Tune/Ray bookkeeping, not training metrics.
_NOT_METRICS = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
                "time_since_restore", "iterations_since_restore", "worker_started_at", "done"}


def resolve_tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (absolute,
    so Ray processes with another working directory write to the same store)."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail with one line before any compute when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise SegdistError(f"MLflow server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SegdistError(f"MLflow server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SegdistError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a local sqlite store, artifacts go to ./mlartifacts; a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri, name))


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in result.items()
        if key not in _NOT_METRICS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not key.startswith("model_")
    }


class StudyTracker:
    """The study's parent run and its trials' child runs, addressed by run id."""

    def __init__(self, uri: str, experiment: str, study_name: str, params: dict[str, Any]):
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        run = self.client.create_run(
            self.experiment_id, run_name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={STUDY_TAG: study_name, "segdist.role": "study"},
        )
        self.parent_run_id = run.info.run_id
        self.log_params(self.parent_run_id, params)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        # MLflow caps a param value at 6000 characters; ours are short, but be safe.
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def start_trial(self, name: str, trial_key: str, params: dict[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={PARENT_TAG: self.parent_run_id, TRIAL_KEY_TAG: trial_key, "segdist.role": "trial"},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items() if not math.isnan(value)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifacts(self, run_id: str, directory: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, directory, artifact_path=artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, every epoch's metrics, the best
    checkpoint as an artifact, and the trial's final status."""

    def __init__(self, tracker: StudyTracker):
        self.tracker = tracker
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.best: dict[str, tuple[float, str | None]] = {}
        self.started_at: dict[str, float] = {}
        self.timings: dict[str, dict[str, float]] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        config = trial.config["trial"]
        params = dict(config["flat"])
        name = f"{config['model']['variant']}-{config['config_id']}-seed{config['train']['seed']}"
        self.runs[trial.trial_id] = self.tracker.start_trial(name, config["trial_key"], params)
        self.started_at[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs[trial.trial_id]
        epoch = int(result["epoch"])
        self.tracker.log_metrics(run_id, numeric_metrics(result), step=epoch)
        model_info = {key: value for key, value in result.items() if key.startswith("model_")}
        if model_info:
            self.tracker.log_params(run_id, model_info)
        if trial.trial_id not in self.timings and "worker_started_at" in result:
            # Seconds from trial start to the training function running on the workers.
            startup = result["worker_started_at"] - self.started_at[trial.trial_id]
            self.timings[trial.trial_id] = {"startup_s": startup}
            self.tracker.log_metrics(run_id, {"trial_startup_s": startup}, step=0)
        score = result.get("val_miou", float("nan"))
        best_score, _ = self.best.get(trial.trial_id, (-math.inf, None))
        if "checkpoint_path" in result and score > best_score:
            self.best[trial.trial_id] = (score, result["checkpoint_path"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs[trial.trial_id]
        _, checkpoint = self.best.get(trial.trial_id, (None, None))
        if checkpoint and Path(checkpoint).is_dir():
            self.tracker.log_artifacts(run_id, checkpoint, artifact_path="best_checkpoint")
        elapsed = time.time() - self.started_at[trial.trial_id]
        startup = self.timings.get(trial.trial_id, {}).get("startup_s", float("nan"))
        self.tracker.log_metrics(run_id, {"trial_wall_s": elapsed, "trial_train_s": elapsed - startup}, step=0)
        self.tracker.set_tags(run_id, {"segdist.status": "finished"})
        self.tracker.finish(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        error = str(getattr(trial, "error_msg", "") or "")
        status = "diverged" if "TrainingDiverged" in error else "failed"
        self.tracker.set_tags(run_id, {"segdist.status": status})
        self.tracker.finish(run_id, "FAILED")
