"""segdist.tracking and segdist.mlflow_callback without Ray (issue 15, point 7): the tracker's
ordered retry queue, and the Tune callback's epoch de-duplication, resume, outcomes and best
checkpoint. Real MLflow (a sqlite store in tmp_path, or a real `mlflow server` on loopback that
a test takes away and brings back); Ray's Trial is played by a small stand-in and its hooks are
called directly."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segdist.config import expand_configs, parse_study, with_seed
from segdist.epoch_report import EpochReport
from segdist.mlflow_callback import MlflowTrialCallback
from segdist.mlflow_store import PARENT_TAG, STATUS_TAG, STUDY_RUN_TAG, TRIAL_KEY_TAG
from segdist.outcome import DIVERGED, FAILED, FINISHED, STOPPED_EARLY
from segdist.tracking import StudyTracker
from segdist.train import PICTURES_DIR
from segdist.tune import find_study_to_resume, trial_params
from tests.conftest import free_port, wait_http


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


SHARDS: list[str] = []  # the tiny data set's (train, val) shard folders: trial_params reads dataset.json


@pytest.fixture(autouse=True)
def shards(tiny_shards):
    SHARDS[:] = [str(path) for path in tiny_shards]


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (seconds each time): tests start from copies."""
    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path, blank_db) -> str:
    shutil.copy(blank_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def segdist_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("segdist:")]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- stand-ins for Ray


def trial_config(storage: str, epochs: int = 3, seed: int = 0) -> dict:
    """A trial's Tune config exactly as segdist.tune builds it (trial_params)."""
    train_shards, val_shards = SHARDS
    study = parse_study({"name": "track", "train": {"epochs": epochs}, "seeds": [seed],
                         "data": {"train_shards": train_shards, "val_shards": val_shards}}, "study.yaml")
    return trial_params(with_seed(expand_configs(study)[0], seed), storage)


class FakeTrial:
    """What the callback reads of ray.tune.experiment.Trial."""

    def __init__(self, trial_id: str, config: dict, error_msg: str | None = None, error_file: str | None = None):
        self.trial_id, self.config = trial_id, config
        self.error_msg, self.error_file = error_msg, error_file


def metrics(epoch: int, val_miou: float) -> dict[str, float]:
    return {"val_miou": val_miou, "train_loss": 2.0 - epoch / 10, "lr": 0.01}


def result(epoch: int, val_miou: float, started_at: float = 1000.0, facts: dict | None = None,
           history: list | None = None, pictures: bool = False, checkpoint_path: str | None = None,
           **more_metrics: float) -> dict:
    """One epoch's report as segdist.train sends it (EpochReport.result()), plus Tune's own
    bookkeeping (and the checkpoint's path, where one was saved)."""
    report = EpochReport(epoch, {**metrics(epoch, val_miou), **more_metrics}, facts=facts or {},
                         history=history or [], worker_started_at=started_at, pictures=pictures)
    tune = {"training_iteration": epoch + 1, "time_this_iter_s": 1.5, "done": False}
    return {**report.result(), **tune, **({"checkpoint_path": checkpoint_path} if checkpoint_path else {})}


def history_entry(epoch: int, val_miou: float) -> tuple[int, dict[str, float]]:
    """One epoch of the history a checkpoint carries: (epoch, that epoch's metrics)."""
    return epoch, metrics(epoch, val_miou)


def study(tmp_path: Path, uri: str, name: str = "track") -> tuple[str, StudyTracker, MlflowTrialCallback, dict]:
    storage = str(tmp_path / "storage")
    tracker = StudyTracker(uri, name, name)
    return uri, tracker, MlflowTrialCallback(tracker, storage), trial_config(storage)


# ----------------------------------------------------------------------------- 1: the retry queue


class Recorder:
    """The tracker's real client, with every call that reached MLflow and came back written
    down (what, run or experiment, which keys): a write sent twice shows up twice."""

    def __init__(self, client: MlflowClient):
        self.client, self.done, self.failed = client, [], 0

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                answer = method(*args, **kwargs)
            except Exception:
                self.failed += 1
                raise
            self.done.append(self.describe(name, args, kwargs))
            return answer

        return call

    @staticmethod
    def describe(name, args, kwargs):
        if name == "create_run":
            return name, kwargs["tags"][TRIAL_KEY_TAG]
        if name == "log_batch":
            items = (tuple((m.key, m.step, m.value) for m in kwargs.get("metrics", ()))
                     + tuple(p.key for p in kwargs.get("params", ())) + tuple(t.key for t in kwargs.get("tags", ())))
            return name, args[0], items
        return name, args[0], kwargs.get("status")


class Server:
    """A real `mlflow server` on 127.0.0.1 that a test can take away (SIGKILL to its own
    process group: the uvicorn and job-runner children it starts) and start again on the
    same port and store."""

    def __init__(self, folder: Path, blank_db: Path):
        self.folder, self.port, self.process = folder, free_port(), None
        folder.mkdir()
        shutil.copy(blank_db, folder / "mlflow.db")
        self.store = f"sqlite:///{folder / 'mlflow.db'}"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.folder / "artifacts"),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_http(self.uri + "/health", timeout_s=120)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group: pgid == its pid
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
        for _ in range(150):  # the children die with the group, but not at the same instant
            if not self.answers():
                return
            time.sleep(0.2)
        raise AssertionError("the killed MLflow server still answers")


@pytest.fixture
def server(tmp_path, monkeypatch, blank_db):
    # Fail fast while the server is away: the tracker's queue does the waiting, not MLflow's HTTP retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = Server(tmp_path / "server", blank_db)
    server.start()
    try:
        yield server
    finally:
        server.kill()


A, B = "c0-seed0", "c0-seed1"


def queue_while_away(tracker: StudyTracker) -> None:
    """What a study writes while the store is away: trial A goes on, trial B starts and both end."""
    tracker.log_metrics(A, {"val_miou": 0.2}, step=1)
    tracker.start_trial("naked-c0-seed1", B, {"config_id": "c0", "train.seed": 1})
    tracker.log_metrics(B, {"val_miou": 0.5}, step=0)
    tracker.log_metrics(A, {"val_miou": 0.3}, step=2)
    tracker.set_tags(A, {STATUS_TAG: FINISHED})
    tracker.finish(A)
    tracker.set_tags(B, {STATUS_TAG: FINISHED})
    tracker.finish(B)


QUEUED = [f"metrics step 1 of {A}", f"create run of {B}", f"params of {B}", f"metrics step 0 of {B}",
          f"metrics step 2 of {A}", f"tags of {A}", f"end of {A}", f"tags of {B}", f"end of {B}"]


def tracker_with_trial_a(server: Server) -> tuple[StudyTracker, Recorder]:
    tracker = StudyTracker(server.uri, "away", "away")
    recorder = Recorder(tracker.client)
    tracker.client = recorder
    tracker.start_trial("naked-c0-seed0", A, {"config_id": "c0", "train.seed": 0})
    tracker.log_metrics(A, {"val_miou": 0.1}, step=0)
    assert not tracker.pending
    return tracker, recorder


@pytest.mark.integration
def test_writes_queued_while_the_server_is_away_are_sent_once_in_order_when_it_returns(server, capsys):
    tracker, recorder = tracker_with_trial_a(server)
    run_a = tracker.run_ids[A]
    capsys.readouterr()
    server.kill()
    tracker.RETRY_EVERY_S = 3600.0  # while away, one attempt: later writes queue without a request each
    queue_while_away(tracker)
    assert [what for what, _ in tracker.pending] == QUEUED
    assert recorder.failed == 1 and B not in tracker.run_ids
    assert not tracker.flush()  # not before the retry time
    assert recorder.failed == 1

    server.start()  # the same port and store
    tracker.RETRY_EVERY_S = 0.5
    assert tracker.drain(timeout_s=60)
    run_b = tracker.run_ids[B]
    assert recorder.done == [
        ("create_run", A), ("log_batch", run_a, ("config_id", "train.seed")),
        ("log_batch", run_a, (("val_miou", 0, 0.1),)),
        # every queued write once, in the order it was made, B's run created before B's writes
        ("log_batch", run_a, (("val_miou", 1, 0.2),)),
        ("create_run", B), ("log_batch", run_b, ("config_id", "train.seed")),
        ("log_batch", run_b, (("val_miou", 0, 0.5),)),
        ("log_batch", run_a, (("val_miou", 2, 0.3),)),
        ("log_batch", run_a, (STATUS_TAG,)), ("set_terminated", run_a, "FINISHED"),
        ("log_batch", run_b, (STATUS_TAG,)), ("set_terminated", run_b, "FINISHED"),
    ]
    client = MlflowClient(tracking_uri=server.store)
    trials = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.parent_run_id}'")
    assert sorted(run.data.tags[TRIAL_KEY_TAG] for run in trials) == [A, B]  # B's run made once
    assert steps_of(client, run_a, "val_miou") == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert steps_of(client, run_b, "val_miou") == [(0, 0.5)]
    for run_id, seed in ((run_a, "0"), (run_b, "1")):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == FINISHED
        assert run.data.params["train.seed"] == seed
    lines = segdist_lines(capsys.readouterr().err)
    assert len(lines) == 2
    assert lines[0].startswith(f"segdist: warning: MLflow write failed (metrics step 1 of {A}): ")
    assert lines[0].endswith("writes are queued (1 now) and retried, training goes on")
    assert lines[1] == "segdist: MLflow is reachable again; queued writes sent"
    assert tracker.save_pending(server.folder / "unsent") is None


@pytest.mark.integration
def test_writes_never_sent_are_listed_in_order_in_the_unsent_file(server, tmp_path):
    tracker, recorder = tracker_with_trial_a(server)
    sent = list(recorder.done)
    server.kill()
    tracker.RETRY_EVERY_S = 0.2
    queue_while_away(tracker)
    assert not tracker.drain(timeout_s=1.0)
    assert recorder.done == sent  # nothing of the queue reached MLflow
    path = tracker.save_pending(tmp_path / "out")
    assert path.parent == tmp_path / "out" and re.fullmatch(r"mlflow-unsent-\d+\.jsonl", path.name)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"write": what} for what in QUEUED]
    # The store holds what was sent before the server went away, and nothing after.
    client = MlflowClient(tracking_uri=server.store)
    assert steps_of(client, tracker.run_ids[A], "val_miou") == [(0, 0.1)]
    assert client.get_run(tracker.run_ids[A]).info.status == "RUNNING"


# ----------------------------------------------------------------------------- 2: each epoch once


def test_a_restarted_worker_group_logs_no_epoch_twice_and_the_first_value_stays(tmp_path, uri):
    """Epochs 0 and 1, then the worker group dies before epoch 1's checkpoint; the new group,
    restored from epoch 0's checkpoint, reports 1 again (a new value: it trained again) and 2.
    MLflow gets each epoch at its step once: the first value seen, since the callback drops
    any epoch it has logged ("never log an epoch twice")."""
    uri, tracker, callback, config = study(tmp_path, uri)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, result(0, 0.10, facts={"precision": "fp32"}))
    callback.on_trial_result(2, [], trial, result(1, 0.20))
    callback.on_trial_result(3, [], trial, result(1, 0.25, started_at=2000.0, facts={"precision": "fp32"},
                                                    history=[history_entry(0, 0.10)]))
    callback.on_trial_result(4, [], trial, result(2, 0.30, started_at=2000.0))
    callback.on_trial_complete(5, [], trial)
    assert not tracker.pending
    client = MlflowClient(tracking_uri=uri)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    assert steps_of(client, run_id, "val_miou") == [(0, 0.10), (1, 0.20), (2, 0.30)]
    assert steps_of(client, run_id, "train_loss") == [(0, 2.0), (1, 1.9), (2, 1.8)]
    assert [m.step for m in client.get_metric_history(run_id, "trial_startup_s")] == [0]
    run = client.get_run(run_id)
    assert run.data.metrics["worker_restarts"] == 1
    # the model's static facts come from the driver's trial config, the device's from the worker
    assert run.data.params["model_params"] == str(config["trial"]["model_facts"]["params"]) != "0"
    assert run.data.params["model_precision"] == "fp32" and run.data.params["train.seed"] == "0"
    # readable: the run says what it is, and MLflow's "Group by" can use the configuration param
    variant = config["trial"]["recipe"]["model"]["variant"]
    assert run.data.params["configuration"] == variant and run.info.run_name == f"{variant} · seed 0"
    assert set(run.data.metrics) == {"val_miou", "train_loss", "lr", "trial_startup_s", "trial_train_s", "trial_wall_s",
                                     "worker_restarts"}
    assert run.data.tags[STATUS_TAG] == FINISHED
    assert "segdist.resumed_at_epoch" not in run.data.tags  # a restart within the study is no resume


def test_the_history_of_a_restarted_worker_fills_epochs_the_callback_never_saw(tmp_path, uri):
    """A report the driver never received (epoch 1) reaches MLflow through the history the
    next worker's checkpoint carries; an epoch already logged keeps its value."""
    uri, tracker, callback, config = study(tmp_path, uri)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, result(0, 0.10))
    history = [history_entry(0, 0.11), history_entry(1, 0.20)]
    callback.on_trial_result(2, [], trial, result(2, 0.30, started_at=2000.0, history=history))
    callback.on_trial_complete(3, [], trial)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    client = MlflowClient(tracking_uri=uri)
    assert steps_of(client, run_id, "val_miou") == [(0, 0.10), (1, 0.20), (2, 0.30)]
    assert client.get_run(run_id).data.tags[STATUS_TAG] == FINISHED


# ----------------------------------------------------------------------------- 3: --resume


def test_resume_reopens_the_trials_run_and_logs_only_the_epochs_it_lacks(tmp_path, uri):
    storage = str(tmp_path / "storage")
    unfinished, done = trial_config(storage, epochs=4, seed=0), trial_config(storage, epochs=4, seed=1)
    # The first driver: seed 1 finishes, seed 0 reports epoch 0, then the driver dies.
    first = StudyTracker(uri, "resumable", "resumable")
    callback = MlflowTrialCallback(first, storage)
    for trial_id, config in (("a", unfinished), ("b", done)):
        callback.on_trial_start(0, [], FakeTrial(trial_id, config))
    callback.on_trial_result(1, [], FakeTrial("a", unfinished), result(0, 0.10))
    for epoch in range(4):
        callback.on_trial_result(1, [], FakeTrial("b", done), result(epoch, 0.5 + epoch / 100))
    callback.on_trial_complete(2, [], FakeTrial("b", done))
    run_a = first.run_ids[unfinished["trial"]["trial_key"]]
    first.client.set_terminated(run_a, status="KILLED")

    # --resume, as segdist.tune.run_study does it.
    parent = find_study_to_resume(uri, SimpleNamespace(name="resumable"))
    assert parent == first.parent_run_id
    tracker = StudyTracker(uri, "resumable", "resumable", parent_run_id=parent)
    existing = tracker.existing_trials()
    assert {key: run.info.run_id for key, run in existing.items()} == {
        unfinished["trial"]["trial_key"]: run_a, done["trial"]["trial_key"]: first.run_ids[done["trial"]["trial_key"]]}
    callback = MlflowTrialCallback(tracker, storage, existing=existing)
    trial = FakeTrial("a2", unfinished)  # a new Tune trial id for the same trial key
    callback.on_trial_start(0, [], trial)
    assert tracker.run_ids[unfinished["trial"]["trial_key"]] == run_a
    assert tracker.client.get_run(run_a).info.status == "RUNNING"
    # Ray Train continues from the epoch-2 checkpoint: its history holds epochs 0-2, of which
    # MLflow has only 0 (the first driver died before it saw 1 and 2).
    history = [history_entry(0, 0.11), history_entry(1, 0.20), history_entry(2, 0.30)]
    callback.on_trial_result(1, [], trial, result(3, 0.40, started_at=2000.0, history=history))
    callback.on_trial_complete(2, [], trial)
    assert not tracker.pending

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{STUDY_RUN_TAG}` = '{parent}' "
                              "and tags.`segdist.role` = 'trial'")
    assert len(runs) == 2  # reopened, not duplicated
    assert steps_of(client, run_a, "val_miou") == [(0, 0.10), (1, 0.20), (2, 0.30), (3, 0.40)]
    run = client.get_run(run_a)
    assert run.data.tags["segdist.resumed_at_epoch"] == "3"
    assert run.data.tags[STATUS_TAG] == FINISHED and run.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "RUNNING"  # the study's run is reopened too


def test_a_resumed_trial_whose_worker_reports_an_epoch_mlflow_has_skips_it(tmp_path, uri):
    """Ray Train continues from an older checkpoint than MLflow's last epoch: the epochs MLflow
    already has are not logged again, and the resume is recorded at the first new epoch."""
    storage = str(tmp_path / "storage")
    config = trial_config(storage, epochs=4)
    first = StudyTracker(uri, "again", "again")
    callback = MlflowTrialCallback(first, storage)
    callback.on_trial_start(0, [], FakeTrial("a", config))
    for epoch, value in enumerate((0.1, 0.2, 0.3)):
        callback.on_trial_result(1, [], FakeTrial("a", config), result(epoch, value))
    tracker = StudyTracker(uri, "again", "again", parent_run_id=first.parent_run_id)
    callback = MlflowTrialCallback(tracker, storage, existing=tracker.existing_trials())
    trial = FakeTrial("a2", config)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, result(1, 0.9, started_at=2000.0, history=[history_entry(0, 0.9)]))
    callback.on_trial_result(2, [], trial, result(2, 0.9, started_at=2000.0))
    callback.on_trial_result(3, [], trial, result(3, 0.4, started_at=2000.0))
    callback.on_trial_complete(4, [], trial)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    client = MlflowClient(tracking_uri=uri)
    assert steps_of(client, run_id, "val_miou") == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)]
    assert client.get_run(run_id).data.tags["segdist.resumed_at_epoch"] == "3"


class GoneAway:
    """A client whose every request fails as one to an unreachable server does, while `away`."""

    def __init__(self, client: MlflowClient):
        self.client, self.away = client, True

    def __getattr__(self, name):
        if self.away:
            def unreachable(*args, **kwargs):
                raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs failed with "
                                      "exception HTTPConnectionPool: Max retries exceeded (Connection refused)")
            return unreachable
        return getattr(self.client, name)


def test_a_resumed_trial_that_starts_while_the_store_is_away_still_gets_its_status(tmp_path, uri, capsys):
    """On --resume the callback asks MLflow which epochs the reopened run has; if the store is
    away just then, the trial must still be timed, tagged and ended once it is back (before:
    the lookup's failure skipped `started_at`, so on_trial_complete died on a KeyError and the
    run stayed RUNNING with no status)."""
    storage = str(tmp_path / "storage")
    config = trial_config(storage, epochs=3)
    first = StudyTracker(uri, "away", "away")
    callback = MlflowTrialCallback(first, storage)
    callback.on_trial_start(0, [], FakeTrial("a", config))
    callback.on_trial_result(1, [], FakeTrial("a", config), result(0, 0.10))
    run_id = first.run_ids[config["trial"]["trial_key"]]

    tracker = StudyTracker(uri, "away", "away", parent_run_id=first.parent_run_id)
    callback = MlflowTrialCallback(tracker, storage, existing=tracker.existing_trials())
    tracker.client = gone = GoneAway(tracker.client)
    tracker.RETRY_EVERY_S = 0.0  # retry at every write
    trial = FakeTrial("a2", config)
    callback.on_trial_start(0, [], trial)
    assert [what for what, _ in tracker.pending] == [f"reopen configuration {config['trial']['config_id']}",
                                                     f"reopen {config['trial']['trial_key']}"]
    gone.away = False
    callback.on_trial_result(1, [], trial, result(1, 0.20, started_at=2000.0, history=[history_entry(0, 0.10)]))
    callback.on_trial_result(2, [], trial, result(2, 0.30, started_at=2000.0))
    callback.on_trial_complete(3, [], trial)
    assert not tracker.pending
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == FINISHED
    assert run.data.tags["segdist.resumed_at_epoch"] == "1"
    assert "trial_wall_s" in run.data.metrics
    # Epochs 1 and 2 once each. Which epochs MLflow held could not be asked: the history's
    # epoch 0 may be sent again (here with the same value).
    steps = steps_of(client, run_id, "val_miou")
    assert [s for s in steps if s[0] > 0] == [(1, 0.20), (2, 0.30)] and (0, 0.10) in steps
    warning = [line for line in segdist_lines(capsys.readouterr().err) if "on_trial_start" in line]
    assert len(warning) == 1 and "trial a2" in warning[0]


# ----------------------------------------------------------------------------- 4: outcomes


@pytest.mark.parametrize("epochs_reported, outcome", [([0], STOPPED_EARLY), ([0, 1], STOPPED_EARLY),
                                                      ([0, 1, 2], FINISHED), ([], STOPPED_EARLY)])
def test_a_completed_trial_is_finished_only_after_its_last_epoch(tmp_path, uri, epochs_reported, outcome):
    uri, tracker, callback, config = study(tmp_path, uri)  # 3 epochs
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    for epoch in epochs_reported:
        callback.on_trial_result(epoch + 1, [], trial, result(epoch, 0.5))
    callback.on_trial_complete(9, [], trial)
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_ids[config["trial"]["trial_key"]])
    assert run.data.tags[STATUS_TAG] == outcome
    assert run.info.status == "FINISHED"
    assert "segdist.error" not in run.data.tags


DIVERGED_TEXT = ("ray.exceptions.RayTaskError(TrainingDiverged): segdist.train.TrainingDiverged: "
                 "non-finite loss at epoch 1, step 3")


@pytest.mark.parametrize("error_msg, file_text, outcome", [
    (DIVERGED_TEXT, None, DIVERGED),
    (None, DIVERGED_TEXT, DIVERGED),  # Ray left the message in the trial's error file only
    ("RuntimeError: CUDA out of memory", None, FAILED),
    (None, "ray.exceptions.RayActorError: The actor died unexpectedly", FAILED),
    (None, None, FAILED),
])
def test_an_errored_trial_is_diverged_or_failed(tmp_path, uri, error_msg, file_text, outcome):
    uri, tracker, callback, config = study(tmp_path, uri)
    error_file = None
    if file_text is not None:
        error_file = tmp_path / "error.txt"
        error_file.write_text(file_text)
    trial = FakeTrial("t0", config, error_msg=error_msg, error_file=str(error_file or tmp_path / "none.txt"))
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, result(0, 0.5))
    callback.on_trial_result(2, [], trial, result(1, 0.5))
    callback.on_trial_result(3, [], trial, result(2, 0.5))  # even after the last epoch
    callback.on_trial_error(4, [], trial)
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_ids[config["trial"]["trial_key"]])
    assert run.data.tags[STATUS_TAG] == outcome
    assert run.info.status == "FAILED"
    assert run.data.tags["segdist.error"] == (error_msg or file_text or "")


def test_a_diverged_trial_ends_as_diverged_from_its_last_report(tmp_path, uri):
    """segdist.train.ray_train_loop reports a divergence instead of raising it (Ray Train would
    retry an error from the checkpoint): the run is FAILED, tagged diverged with the reason,
    and keeps the epochs before."""
    uri, tracker, callback, config = study(tmp_path, uri)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(1, [], trial, result(0, 0.5))
    reason = "loss is not finite in epoch 1 by step 10"
    diverged = EpochReport(1, {"val_miou": math.nan, "train_loss": math.nan}, worker_started_at=1000.0,
                           diverged=reason)
    callback.on_trial_result(2, [], trial, diverged.result())
    callback.on_trial_complete(3, [], trial)
    client = MlflowClient(tracking_uri=uri)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    run = client.get_run(run_id)
    assert run.data.tags[STATUS_TAG] == DIVERGED and run.info.status == "FAILED"
    assert run.data.tags["segdist.error"] == reason
    assert steps_of(client, run_id, "val_miou") == [(0, 0.5)]


def test_a_trial_tune_runs_again_keeps_its_run_and_its_start(tmp_path, uri):
    """Tune's FailureConfig restarts a trial whose task died: on_trial_start comes again for
    the same trial. One run, its wall time from the first start, the restart counted."""
    uri, tracker, callback, config = study(tmp_path, uri)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    started = callback.started_at["t0"]
    callback.on_trial_result(1, [], trial, result(0, 0.5))
    callback.on_trial_start(2, [], trial)
    callback.on_trial_result(3, [], trial, result(1, 0.6, started_at=2000.0, history=[history_entry(0, 0.5)]))
    callback.on_trial_result(4, [], trial, result(2, 0.7, started_at=2000.0))
    callback.on_trial_complete(5, [], trial)
    assert callback.started_at["t0"] == started and not tracker.pending
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{STUDY_RUN_TAG}` = "
                              f"'{tracker.parent_run_id}' and tags.`segdist.role` = 'trial'")
    assert len(runs) == 1
    assert steps_of(client, runs[0].info.run_id, "val_miou") == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert runs[0].data.metrics["worker_restarts"] == 1 and runs[0].data.tags[STATUS_TAG] == FINISHED


def test_an_error_message_reaches_mlflow_without_secrets_and_shortened(tmp_path, uri, monkeypatch):
    monkeypatch.setenv("SEGDIST_TEST_API_TOKEN", "s3cr3t-value-123")
    uri, tracker, callback, config = study(tmp_path, uri)
    message = "x" * 1000 + " could not reach s3 with s3cr3t-value-123\n"
    trial = FakeTrial("t0", config, error_msg=message)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_error(1, [], trial)
    tag = MlflowClient(tracking_uri=uri).get_run(tracker.run_ids[config["trial"]["trial_key"]]).data.tags["segdist.error"]
    assert tag.endswith("could not reach s3 with ***") and "s3cr3t" not in tag
    assert tag == ("x" * 1000 + " could not reach s3 with s3cr3t-value-123")[-500:].replace("s3cr3t-value-123", "***")


def test_a_failing_hook_warns_and_does_not_raise(tmp_path, uri, capsys):
    """A callback that raises would mark the trial errored in Tune: tracking trouble must not."""
    _, tracker, callback, config = study(tmp_path, uri)
    callback.on_trial_result(0, [], FakeTrial("never-started", config), result(0, 0.5))
    (line,) = segdist_lines(capsys.readouterr().err)
    assert line.startswith("segdist: warning: MLflow logging for trial never-started failed in on_trial_result")


# ----------------------------------------------------------------------------- the best checkpoint


def checkpoint(storage: Path, name: str, text: str, pictures: bool = False) -> str:
    folder = storage / name
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_text(text)
    if pictures:
        (folder / PICTURES_DIR).mkdir()
        (folder / PICTURES_DIR / "confusion.png").write_bytes(b"png")
    return str(folder)


@pytest.mark.parametrize("ray_deleted, best", [((), "epoch 1"), (("e1",), "epoch 0"), (("e0", "e1"), "epoch 2")])
def test_the_best_checkpoint_ray_still_keeps_is_logged(tmp_path, uri, ray_deleted, best):
    uri, tracker, callback, config = study(tmp_path, uri)
    storage = tmp_path / "storage"
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    paths = {f"e{epoch}": checkpoint(storage, f"e{epoch}", f"epoch {epoch}", pictures=epoch == 2) for epoch in range(3)}
    callback.on_trial_result(1, [], trial, result(0, 0.3, checkpoint_path=paths["e0"]))
    callback.on_trial_result(2, [], trial, result(1, 0.6, checkpoint_path=paths["e1"]))
    # The last epoch: a non-finite score never wins; its evaluation pictures are logged.
    callback.on_trial_result(3, [], trial, result(2, math.nan, checkpoint_path=paths["e2"], final_miou=0.55,
                                                    pictures=True))
    for name in ray_deleted:  # Ray keeps only the best and the latest
        for file in Path(paths[name]).iterdir():
            file.unlink()
        Path(paths[name]).rmdir()
    callback.on_trial_complete(4, [], trial)
    assert not tracker.pending
    client = MlflowClient(tracking_uri=uri)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    logged = {a.path for a in client.list_artifacts(run_id, "best_checkpoint")}
    assert logged == {"best_checkpoint/checkpoint.pt"} | ({f"best_checkpoint/{PICTURES_DIR}"} if best == "epoch 2" else set())
    assert Path(client.download_artifacts(run_id, "best_checkpoint/checkpoint.pt", str(tmp_path / "dl"))).read_text() == best
    assert [a.path for a in client.list_artifacts(run_id, PICTURES_DIR)] == [f"{PICTURES_DIR}/confusion.png"]
    run = client.get_run(run_id)
    assert run.data.metrics["final_miou"] == 0.55 and run.data.tags[STATUS_TAG] == FINISHED


def test_a_configuration_label_names_the_variant_and_the_searched_values():
    from segdist.mlflow_callback import configuration_label

    assert configuration_label("naked", {}) == "naked"
    assert configuration_label("naked.fpn", {"model.variant": "naked.fpn", "train.lr": 0.01,
                                             "train.crop_size": [321, 321]}) == "naked.fpn crop_size=[321, 321] lr=0.01"
