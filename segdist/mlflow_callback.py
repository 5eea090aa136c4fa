"""The Tune callback that records a study in MLflow (MlflowTrialCallback): it runs in the
Tune driver and turns each trial's events (start, epoch results, completion, error) into
writes of the study's tracker (segdist.tracking): a seed run per trial under its
configuration's run, every epoch's metrics exactly once, the best checkpoint as an artifact,
and the trial's final status.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from segdist.configuration_runs import CONFIGURATION_ROLE, ConfigurationRuns, finished_values
from segdist.epoch_report import EpochReport, Fact
from segdist.mlflow_store import CONFIGURATION_PARAM, STATUS_TAG, redact, warn
from segdist.outcome import DIVERGED, FINISHED, trial_outcome
from segdist.stats import HEADLINE_METRIC
from segdist.tracking import StudyTracker


def copy_best_checkpoint(candidates: list[tuple[float, str]], storage: str, into: Path) -> Path | None:
    """The best-scoring checkpoint that Ray still keeps (it deletes all but the best and the
    latest, and breaks ties its own way), copied from the storage (local, NFS or s3://)."""
    import pyarrow.fs

    filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
    for _, path in sorted(candidates, key=lambda c: -c[0]):
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
            if Path(path).is_dir():
                return Path(path)
            pyarrow.fs.copy_files(path, str(into), source_filesystem=filesystem)
            return into
    return None


def never_raises(hook):
    """A Tune callback that raises marks the trial as errored: tracking trouble must not."""

    @functools.wraps(hook)
    def wrapper(self, iteration, trials, trial, *args, **kwargs):
        try:
            return hook(self, iteration, trials, trial, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warn(f"MLflow logging for trial {trial.trial_id} failed in {hook.__name__}: {err}")

    return wrapper


def model_params(facts: dict[str, Fact]) -> dict[str, Fact]:
    """Model facts (train.model_facts, EpochReport.facts) as MLflow params: model_<name>."""
    return {f"model_{name}": value for name, value in facts.items()}


def configuration_label(variant: str, overrides: dict[str, Any]) -> str:
    """A configuration as a person reads it: its variant and the values the search chose
    (by their last key part), e.g. `naked lr=0.01 crop_size=[321, 321]`."""
    chosen = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sorted(overrides.items())
              if key != "model.variant"]
    return " ".join([variant, *chosen])


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, every epoch's metrics exactly
    once, the best checkpoint as an artifact, and the trial's final status."""

    def __init__(self, tracker: StudyTracker, storage: str, existing: dict[str, Any] | None = None,
                 baseline: str | None = None, progress: TextIO | None = None):
        """`existing`: trial key -> seed run of a resumed study (its configuration runs are
        looked up too); `baseline`: the study's, for the configuration runs' deltas;
        `progress`: where to print one line per trial epoch and per trial end (None: nowhere)."""
        self.progress = progress
        self.names: dict[str, str] = {}  # Tune trial id -> its run's name, for the progress lines
        self.tracker = tracker
        self.storage = storage
        self.existing = existing or {}
        self.configurations = ConfigurationRuns(
            tracker, existing=tracker.existing_trials(CONFIGURATION_ROLE) if self.existing else {},
            finished=finished_values(self.existing), baseline=baseline)
        self.runs: dict[str, str] = {}  # Tune trial id -> tracker handle (the trial key)
        self.last_epoch: dict[str, int] = {}
        self.last_result: dict[str, dict] = {}
        self.checkpoints: dict[str, list[tuple[float, str]]] = {}
        self.started_at: dict[str, float] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.worker_starts: dict[str, set[float]] = {}  # a new value = the worker group restarted
        self.reopened: set[str] = set()  # trials of a resumed study that already had a run
        if tracker.spool is None and "://" not in storage:
            # Beside the checkpoints: the files of a waiting artifact write are hard links there.
            tracker.spool = Path(storage) / "mlflow-queue"

    @never_raises
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:  # Tune restarted it after an error (its FailureConfig): same run
            return
        config = trial.config["trial"]
        key = config["trial_key"]
        previous = self.existing.get(key)
        label = configuration_label(config["recipe"]["model"]["variant"], config["overrides"])
        run_id = previous.info.run_id if previous is not None else None
        params = {**config["flat"], **model_params(config["model_facts"]), CONFIGURATION_PARAM: label}
        name = self.names[trial.trial_id] = f"{label} · seed {config['seed']}"
        parent = self.configurations.start(config["config_id"], label, config["recipe"]["model"]["variant"],
                                           {k: v for k, v in params.items() if k != "train.seed"})
        self.runs[trial.trial_id] = self.tracker.start_trial(name, key, params, run_id=run_id, parent=parent)
        # Before the lookup below, which fails while the store is away: without them the
        # trial's later hooks would fail too, and its run never get its status or end.
        self.started_at[trial.trial_id] = time.time()
        if previous is not None:
            self.reopened.add(trial.trial_id)
            steps = [m.step for m in self.tracker.client.get_metric_history(run_id, "val_miou")]
            self.last_epoch[trial.trial_id] = max(steps, default=-1)

    @never_raises
    def on_trial_result(self, iteration, trials, trial, result, **info):
        handle = self.runs[trial.trial_id]
        report = EpochReport.from_result(result)
        epoch = report.epoch
        for earlier, metrics in report.history:
            # A resumed trial brings the epochs its checkpoint saw: log any MLflow lacks.
            if earlier > self.last_epoch.get(trial.trial_id, -1):
                self.tracker.log_metrics(handle, metrics, step=earlier)
                self.last_epoch[trial.trial_id] = earlier
        self.worker_starts.setdefault(trial.trial_id, set()).add(round(report.worker_started_at, 3))
        # A restarted worker group resumes after its last checkpoint: never log an epoch twice.
        if epoch <= self.last_epoch.get(trial.trial_id, -1):
            # Nothing to log, but the trial's outcome: a diverged report, or a trial resumed
            # from its last epoch's checkpoint reporting that epoch again (train.fit).
            self.last_result[trial.trial_id] = result
            return
        if trial.trial_id in self.reopened:  # its first new epoch
            self.reopened.discard(trial.trial_id)
            # Ray Train continued the trial from its checkpoint: record where.
            self.tracker.set_tags(handle, {"segdist.resumed_at_epoch": str(epoch)})
        self.last_epoch[trial.trial_id] = epoch
        self.last_result[trial.trial_id] = result
        self.tracker.log_metrics(handle, report.metrics, step=epoch)
        self._say(trial, f"epoch {epoch + 1}/{trial.config['trial']['recipe']['train']['epochs']}  "
                         + "  ".join(f"{key} {100 * report.metrics[key]:.2f}%"
                                     for key in ("val_miou", HEADLINE_METRIC) if key in report.metrics))
        if report.facts:
            self.tracker.log_params(handle, model_params(report.facts))
        if trial.trial_id not in self.timings:
            # Seconds from trial start to the training function running on the workers.
            startup = report.worker_started_at - self.started_at[trial.trial_id]
            self.timings[trial.trial_id] = {"startup_s": startup}
            self.tracker.log_metrics(handle, {"trial_startup_s": startup}, step=0)
        if "checkpoint_path" in result and report.pictures:
            self._log_pictures(handle, result["checkpoint_path"])
        if "checkpoint_path" in result:
            score = report.metrics.get("val_miou", math.nan)
            self.checkpoints.setdefault(trial.trial_id, []).append(
                (score if math.isfinite(score) else -math.inf, result["checkpoint_path"]))

    def _log_pictures(self, handle: str, checkpoint_path: str) -> None:
        """The final evaluation's confusion matrix and overlays, saved beside the checkpoint."""
        import pyarrow.fs

        from segdist.train import PICTURES_DIR

        source = f"{checkpoint_path}/{PICTURES_DIR}"
        if Path(source).is_dir():  # local or NFS storage: log from where it is
            self.tracker.log_artifacts(handle, source, artifact_path=PICTURES_DIR)
            return
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(self.storage)
        if filesystem.get_file_info(source).type != pyarrow.fs.FileType.Directory:
            return
        with tempfile.TemporaryDirectory() as scratch:
            pyarrow.fs.copy_files(source, scratch, source_filesystem=filesystem)
            self.tracker.log_artifacts(handle, scratch, artifact_path=PICTURES_DIR)  # copied if it must wait

    @never_raises
    def on_trial_complete(self, iteration, trials, trial, **info):
        handle = self.runs[trial.trial_id]
        config = trial.config["trial"]
        outcome = trial_outcome(self.last_result.get(trial.trial_id), config["recipe"]["train"]["epochs"])
        try:
            with tempfile.TemporaryDirectory() as scratch:
                local = copy_best_checkpoint(self.checkpoints.get(trial.trial_id, []), self.storage, Path(scratch))
                if local is not None:  # copied (hard links where it can) if it must wait
                    self.tracker.log_artifacts(handle, str(local), artifact_path="best_checkpoint")
        except Exception as err:  # noqa: BLE001 - a lost artifact must not fail a finished trial
            warn(f"best checkpoint of {handle} not logged: {err}")
        elapsed = time.time() - self.started_at[trial.trial_id]
        startup = self.timings.get(trial.trial_id, {}).get("startup_s", float("nan"))
        restarts = max(len(self.worker_starts.pop(trial.trial_id, ())) - 1, 0)
        self.checkpoints.pop(trial.trial_id, None)
        self.tracker.log_metrics(handle, {"trial_wall_s": elapsed, "trial_train_s": elapsed - startup,
                                          "worker_restarts": restarts}, step=0)
        tags = {STATUS_TAG: outcome}
        last = self.last_result.pop(trial.trial_id, None)  # (its epoch history: the driver keeps no trial's)
        if outcome == DIVERGED:  # its last report says why
            tags["segdist.error"] = EpochReport.from_result(last).diverged
        self.tracker.set_tags(handle, tags)
        self.tracker.finish(handle, "FAILED" if outcome == DIVERGED else "FINISHED")
        self._say(trial, outcome)
        value = EpochReport.from_result(last).metrics.get(HEADLINE_METRIC) if last else None
        if outcome == FINISHED and value is not None and math.isfinite(value):
            self.configurations.record(config["config_id"], config["seed"], value)

    def on_experiment_end(self, trials, **info):
        try:
            self.configurations.end()
        except Exception as err:  # noqa: BLE001 - as never_raises: the study's results stand
            warn(f"MLflow callback on_experiment_end failed: {err}")

    @never_raises
    def on_trial_error(self, iteration, trials, trial, **info):
        error = str(getattr(trial, "error_msg", "") or "")
        if not error and getattr(trial, "error_file", None) and Path(trial.error_file).exists():
            error = Path(trial.error_file).read_text()
        status = trial_outcome(self.last_result.get(trial.trial_id), 1, error or "failed")
        handle = self.runs.get(trial.trial_id)
        if handle is not None:
            self.tracker.set_tags(handle, {STATUS_TAG: status, "segdist.error": redact(error.strip()[-500:])})
            self.tracker.finish(handle, "FAILED")
        self._say(trial, f"{status} ({error.strip().splitlines()[-1][:200] if error.strip() else 'no message'})")

    def _say(self, trial, what: str) -> None:
        """One progress line of a trial (`<configuration> · seed N: what`), when asked for."""
        if self.progress is not None:
            print(f"{self.names.get(trial.trial_id, trial.trial_id)}: {what}", file=self.progress, flush=True)
