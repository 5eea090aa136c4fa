"""No MLflow write lost across an outage, whatever its kind (issue 17, point 3): params,
metrics, tags, run creation, text, pictures and artifact folders (checkpoints and evaluation
pictures whose source Ray or the caller deletes while the write waits), writes that fail
half-way (a folder partly uploaded, a run created whose answer was lost, a batch MLflow
refuses for one item), and what is never sent listed with its files. A real `mlflow server`
on loopback that the tests kill (SIGKILL to its process group) and start again, and a real
sqlite store where the point is MLflow's refusals."""

import io
import json
import shutil
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.tracking import MlflowClient
from PIL import Image

from segdist.mlflow_callback import MlflowTrialCallback
from segdist.mlflow_store import KEY_NAMES_ARTIFACT, PARENT_TAG, STATUS_TAG, mlflow_key
from segdist.tracking import StudyTracker
from segdist.train import PICTURES_DIR
from tests import test_tracking
from tests.test_tracking import FakeTrial, Server, checkpoint, result, segdist_lines, steps_of, trial_config


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def shards(tiny_shards):
    test_tracking.SHARDS[:] = [str(path) for path in tiny_shards]  # trial_config reads their dataset.json


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made: tests start from copies."""
    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def server(tmp_path, monkeypatch, blank_db):
    """A real `mlflow server` on loopback (test_tracking.Server) the test may kill and start."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's queue does the waiting
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = Server(tmp_path / "server", blank_db)
    server.start()
    try:
        yield server
    finally:
        server.kill()


A, B = "c0-seed0", "c0-seed1"
POTTED = "val_iou_potted plant (indoor)"  # MLflow refuses parentheses in a metric name


def png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def folder(path: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return str(path)


CHECKPOINT = {"checkpoint.pt": "weights", "extra/state.json": "{}"}
PICTURES = {"confusion.png": "matrix", "overlays/0.png": "overlay"}


def tracker_with_trial_a(uri: str) -> StudyTracker:
    tracker = StudyTracker(uri, "outage", "outage")
    tracker.start_trial("naked-c0-seed0", A, {"config_id": "c0", "train.seed": 0})
    tracker.log_metrics(A, {"val_miou": 0.1}, step=0)
    assert not tracker.pending
    return tracker


def write_every_kind(tracker: StudyTracker, first: str, scratch: Path) -> None:
    """One write of each kind, `first` first (the one whose failure finds the server gone);
    the sources of the artifact writes are deleted as soon as the call returns, as Ray
    deletes an old checkpoint folder and a caller its scratch folder."""
    writes = {
        "run": lambda: tracker.start_trial("naked-c0-seed1", B, {"config_id": "c0", "train.seed": 1}),
        "params": lambda: tracker.log_params(A, {"lr": "0.1", "crop": "321"}),
        "metrics": lambda: tracker.log_metrics(A, {"val_miou": 0.2, POTTED: 0.3}, step=1),
        "tags": lambda: tracker.set_tags(A, {STATUS_TAG: "finished"}),
        "text": lambda: tracker.log_text(A, "hello", "notes/readme.txt"),
        "image": lambda: tracker.log_image(A, png(200), "seeds.png"),
        "checkpoint": lambda: tracker.log_artifacts(A, folder(scratch / "ckpt", CHECKPOINT), "best_checkpoint"),
        "pictures": lambda: tracker.log_artifacts(A, folder(scratch / "pics", PICTURES), PICTURES_DIR),
        "end": lambda: tracker.finish(A),
    }
    for kind in [first] + [kind for kind in writes if kind != first]:
        writes[kind]()
        shutil.rmtree(scratch / "ckpt", ignore_errors=True)
        shutil.rmtree(scratch / "pics", ignore_errors=True)


KINDS = ["run", "params", "metrics", "tags", "text", "image", "checkpoint", "pictures", "end"]


def artifact_text(client: MlflowClient, run_id: str, path: str, into: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(into))).read_text()


def assert_every_kind_arrived(uri: str, tracker: StudyTracker, into: Path) -> None:
    client = MlflowClient(tracking_uri=uri)
    run_a = tracker.run_ids[A]
    run = client.get_run(run_a)
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
    assert {"lr": "0.1", "crop": "321", "train.seed": "0"}.items() <= run.data.params.items()
    assert steps_of(client, run_a, "val_miou") == [(0, 0.1), (1, 0.2)]
    assert run.data.metrics[mlflow_key(POTTED)] == 0.3
    into.mkdir()
    names = json.loads(artifact_text(client, run_a, KEY_NAMES_ARTIFACT, into))
    assert names == {mlflow_key(POTTED): POTTED}
    assert artifact_text(client, run_a, "notes/readme.txt", into) == "hello"
    seeds = Image.open(client.download_artifacts(run_a, "seeds.png", str(into)))
    assert seeds.size == (4, 3) and seeds.getpixel((0, 0))[:3] == (200, 0, 0)
    for name, text in CHECKPOINT.items():
        assert artifact_text(client, run_a, f"best_checkpoint/{name}", into) == text
    for name, text in PICTURES.items():
        assert artifact_text(client, run_a, f"{PICTURES_DIR}/{name}", into) == text
    trials = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.parent_run_id}'")
    assert sorted(run.info.run_name for run in trials) == ["naked-c0-seed0", "naked-c0-seed1"]  # B made once
    assert client.get_run(tracker.run_ids[B]).data.params["train.seed"] == "1"


@pytest.mark.integration
@pytest.mark.parametrize("first", KINDS)
def test_every_kind_of_write_made_while_the_server_is_away_reaches_it_when_back(server, tmp_path, first, capsys):
    tracker = tracker_with_trial_a(server.uri)
    tracker.spool = tmp_path / "spool"
    server.kill()
    tracker.RETRY_EVERY_S = 3600.0  # one attempt (the first write's), then every write queues
    write_every_kind(tracker, first, tmp_path)
    assert len(tracker.pending) >= len(KINDS) and not (tmp_path / "ckpt").exists()
    server.start()
    tracker.RETRY_EVERY_S = 0.5
    assert tracker.drain(timeout_s=60)
    assert_every_kind_arrived(server.uri, tracker, tmp_path / "downloaded")
    assert tracker.save_pending(tmp_path / "unsent") is None and not (tmp_path / "unsent").exists()
    assert not tracker.spool.exists()  # the kept copies go once sent
    assert segdist_lines(capsys.readouterr().err)[-1] == "segdist: MLflow is reachable again; queued writes sent"


@pytest.mark.integration
def test_a_folder_the_server_died_in_the_middle_of_is_sent_whole_when_it_is_back(server, tmp_path, monkeypatch):
    tracker = tracker_with_trial_a(server.uri)
    upload = HttpArtifactRepository.log_artifact
    uploaded = []

    def dies_after_the_first_file(repo, local_file, artifact_path=None):
        upload(repo, local_file, artifact_path)
        uploaded.append(local_file)
        if len(uploaded) == 1:
            server.kill()

    monkeypatch.setattr(HttpArtifactRepository, "log_artifact", dies_after_the_first_file)
    tracker.log_artifacts(A, folder(tmp_path / "ckpt", CHECKPOINT), "best_checkpoint")
    assert len(uploaded) == 1 and len(tracker.pending) == 1
    shutil.rmtree(tmp_path / "ckpt")
    server.start()
    assert tracker.drain(timeout_s=60)
    client = MlflowClient(tracking_uri=server.uri)
    for name, text in CHECKPOINT.items():
        assert artifact_text(client, tracker.run_ids[A], f"best_checkpoint/{name}", tmp_path / "dl") == text


class AnswerLost:
    """The tracker's real client, except that the first run creation reaches the server and
    the server dies before it answers (the run exists, the tracker does not know it)."""

    def __init__(self, client: MlflowClient, server: Server):
        self.client, self.server, self.lost = client, server, False

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if name != "create_run" or self.lost:
            return method

        def create_then_die(*args, **kwargs):
            method(*args, **kwargs)
            self.lost = True
            self.server.kill()
            raise MlflowException("API request to /api/2.0/mlflow/runs/create failed with exception "
                                  "ConnectionResetError(104, 'Connection reset by peer')")

        return create_then_die


@pytest.mark.integration
def test_a_run_created_whose_answer_was_lost_is_not_created_twice(server, tmp_path):
    tracker = tracker_with_trial_a(server.uri)
    tracker.client = AnswerLost(tracker.client, server)
    tracker.start_trial("naked-c0-seed1", B, {"config_id": "c0", "train.seed": 1})
    assert tracker.client.lost and B not in tracker.run_ids
    server.start()
    assert tracker.drain(timeout_s=60)
    client = MlflowClient(tracking_uri=server.store)
    trials = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.parent_run_id}'")
    assert sorted(run.info.run_name for run in trials) == ["naked-c0-seed0", "naked-c0-seed1"]
    assert client.get_run(tracker.run_ids[B]).data.params["train.seed"] == "1"


# ----------------------------------------------------------------------------- refused writes


@pytest.fixture(params=["sqlite", "server"])
def store_uri(request, tmp_path, blank_db) -> str:
    """A sqlite store, and a real server (whose refusals come back as HTTP 400s)."""
    if request.param == "server":
        return request.getfixturevalue("server").uri
    shutil.copy(blank_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.integration
def test_a_refused_write_holds_up_nothing_and_only_its_refused_items_are_lost(store_uri, tmp_path, capsys):
    """A class named `potted plant (indoor)` reaches a metric key through the Tune callback;
    a param whose value changed is refused, its batch is sent again item by item so only
    that param is lost; every later write goes on; the refusal is listed in the unsent file."""
    storage = str(tmp_path / "storage")
    tracker = StudyTracker(store_uri, "refused", "refused")
    callback = MlflowTrialCallback(tracker, storage)
    config = trial_config(storage, epochs=2)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    handle = config["trial"]["trial_key"]
    callback.on_trial_result(1, [], trial, result(0, 0.5, **{POTTED: 0.4}))
    tracker.log_params(handle, {"model_precision": "fp32"})
    tracker.log_params(handle, {"model_precision": "bf16", "model_note": "restarted", "model_gpus": "0"})
    callback.on_trial_result(2, [], trial, result(1, 0.6, **{POTTED: 0.45}))
    callback.on_trial_complete(3, [], trial)
    assert not tracker.pending
    client = MlflowClient(tracking_uri=store_uri)
    run_id = tracker.run_ids[handle]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "finished"
    assert steps_of(client, run_id, mlflow_key(POTTED)) == [(0, 0.4), (1, 0.45)]
    assert {"model_precision": "fp32", "model_note": "restarted", "model_gpus": "0"}.items() <= run.data.params.items()
    (line,) = segdist_lines(capsys.readouterr().err)
    assert line.startswith(f"segdist: warning: MLflow refused param model_precision of {handle}: ")
    path = tracker.save_pending(tmp_path / "out")
    (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["write"] == f"param model_precision of {handle}" and "Changing param values is not allowed" in entry["refused"]


@pytest.mark.integration
def test_refusals_among_the_queued_writes_are_counted_when_the_server_is_back(server, tmp_path, capsys):
    tracker = tracker_with_trial_a(server.uri)
    tracker.log_params(A, {"lr": "0.1"})
    server.kill()
    tracker.RETRY_EVERY_S = 3600.0
    tracker.log_params(A, {"lr": "0.2"})  # refused when it is sent
    tracker.log_metrics(A, {"val_miou": 0.2}, step=1)
    server.start()
    tracker.RETRY_EVERY_S = 0.5
    assert tracker.drain(timeout_s=60)
    assert steps_of(MlflowClient(tracking_uri=server.store), tracker.run_ids[A], "val_miou") == [(0, 0.1), (1, 0.2)]
    assert segdist_lines(capsys.readouterr().err)[-1] == (
        "segdist: MLflow is reachable again; queued writes sent, except 1 that MLflow refused (left out; "
        "listed at the end)")
    assert [json.loads(line)["write"] for line in tracker.save_pending(tmp_path).read_text().splitlines()] == [
        f"params of {A}"]


# ----------------------------------------------------------------------------- never sent


@pytest.mark.integration
def test_writes_never_sent_are_listed_with_their_files_and_contents(server, tmp_path):
    tracker = tracker_with_trial_a(server.uri)
    tracker.spool = tmp_path / "spool"
    server.kill()
    tracker.RETRY_EVERY_S = 0.2
    tracker.log_artifacts(A, folder(tmp_path / "ckpt", CHECKPOINT), "best_checkpoint")
    shutil.rmtree(tmp_path / "ckpt")  # Ray deletes the checkpoint: the kept copy stays
    tracker.log_text(A, "# table", "report.md")
    tracker.log_image(A, png(7), "plots/seeds.png")
    tracker.finish(A)
    assert not tracker.drain(timeout_s=1.0)
    path = tracker.save_pending(tmp_path / "out")
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["write"] for e in entries] == [f"best_checkpoint of {A}", f"report.md of {A}",
                                             f"plots/seeds.png of {A}", f"end of {A}"]
    saved = [Path(e["files"]) for e in entries[:3]]
    assert all(p.is_relative_to(path.with_suffix("")) for p in saved) and "files" not in entries[3]
    assert {str(p.relative_to(saved[0])): p.read_text() for p in saved[0].rglob("*") if p.is_file()} == CHECKPOINT
    assert saved[1].read_text() == "# table" and saved[2].read_bytes() == png(7)
    assert not tracker.spool.exists()


@pytest.mark.integration
def test_a_trials_pictures_and_best_checkpoint_survive_ray_deleting_them_while_the_server_is_away(server, tmp_path):
    """The callback's own artifact writes: the last epoch's pictures, beside its checkpoint,
    and the best checkpoint, queued while the server is away; Ray then deletes the trial's
    checkpoint folders. Both arrive whole when the server is back; the kept copies (hard
    links beside the checkpoints) go once sent."""
    storage = tmp_path / "storage"
    tracker = StudyTracker(server.uri, "pictures", "pictures")
    callback = MlflowTrialCallback(tracker, str(storage))
    config = trial_config(str(storage), epochs=2)
    trial = FakeTrial("t0", config)
    callback.on_trial_start(0, [], trial)
    first = checkpoint(storage, "e0", "epoch 0")
    callback.on_trial_result(1, [], trial, result(0, 0.3, checkpoint_path=first))
    server.kill()
    tracker.RETRY_EVERY_S = 3600.0
    last = checkpoint(storage, "e1", "epoch 1", pictures=True)
    callback.on_trial_result(2, [], trial, result(1, 0.6, checkpoint_path=last, pictures=True))
    shutil.rmtree(first)  # Ray keeps the best and the latest only
    callback.on_trial_complete(3, [], trial)
    shutil.rmtree(last)
    assert (storage / "mlflow-queue").is_dir()
    server.start()
    tracker.RETRY_EVERY_S = 0.5
    assert tracker.drain(timeout_s=60)
    client = MlflowClient(tracking_uri=server.uri)
    run_id = tracker.run_ids[config["trial"]["trial_key"]]
    assert artifact_text(client, run_id, "best_checkpoint/checkpoint.pt", tmp_path / "dl") == "epoch 1"
    assert artifact_text(client, run_id, f"{PICTURES_DIR}/confusion.png", tmp_path / "dl") == "png"
    assert client.get_run(run_id).data.tags[STATUS_TAG] == "finished"
    assert tracker.save_pending(tmp_path / "unsent") is None and not (storage / "mlflow-queue").exists()
