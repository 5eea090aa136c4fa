"""MLflow with the inputs users give it (issue 14, inputs 6 and 7 and their kind): relative
store URIs, a deleted experiment, names with quotes, spaces, parentheses and non-ASCII in
filters, metric keys and paths, and several processes creating one experiment at once.
Real MLflow, a sqlite store in tmp_path."""

import json
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import LifecycleStage
from mlflow.tracking import MlflowClient
from mlflow.utils.search_utils import SearchUtils
from mlflow.utils.validation import _validate_metric_name

from segdist import report
from segdist.errors import SegdistError
from segdist.mlflow_store import (
    KEY_NAMES_ARTIFACT,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    artifact_location,
    check_reachable,
    client_for,
    get_or_create_experiment,
    mlflow_key,
    quote_filter_value,
    resolve_tracking_uri,
)
from segdist.tracking import StudyTracker
from segdist.tune import find_study_to_resume

# Names a user may choose: a study name, a class name in dataset.json, a variant string.
AWKWARD = ["it's", 'say "hi"', "road (wet)", "Straße", "日本", "both ' and \"", "back\\slash", "x''y", "a/b"]


def segdist_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("segdist:")]


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ----------------------------------------------------------------------------- 6: relative URIs


@pytest.mark.parametrize("given, expected", [
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:///./sub/m.db?timeout=20", "sqlite:///{cwd}/sub/m.db?timeout=20"),
    ("sqlite:///../up.db", "sqlite:///{parent}/up.db"),
    ("mlruns", "{cwd}/mlruns"),
    ("./mlruns", "{cwd}/mlruns"),
    ("file:relative", "file://{cwd_url}/relative"),
    ("file:./mlruns", "file://{cwd_url}/mlruns"),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://mlflow.example.org/x", "https://mlflow.example.org/x"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("databricks", "databricks"),
])
def test_a_relative_store_resolves_against_the_working_directory(tmp_path, monkeypatch, given, expected):
    cwd = tmp_path / "my work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    want = expected.format(cwd=cwd, parent=tmp_path, cwd_url=str(cwd).replace(" ", "%20"))
    assert resolve_tracking_uri(given) == want  # --tracking-uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
    assert resolve_tracking_uri(None) == want  # MLFLOW_TRACKING_URI


def test_a_relative_sqlite_store_gets_its_experiment_and_artifacts_in_the_working_directory(tmp_path, monkeypatch):
    """Before: ValueError: relative path can't be expressed as a file URI (artifact_location)."""
    monkeypatch.chdir(tmp_path)
    assert artifact_location("sqlite:///mlflow.db", "rel") == (tmp_path / "mlartifacts" / "rel").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # the README's form
    uri = resolve_tracking_uri(None)
    check_reachable(uri)
    tracker = StudyTracker(uri, "rel", "rel")
    tracker.log_text("study", "hello", "note.txt")
    assert not tracker.pending
    assert (tmp_path / "mlflow.db").is_file()
    (note,) = (tmp_path / "mlartifacts" / "rel").glob("*/artifacts/note.txt")
    assert note.read_text() == "hello"
    # A Ray process works in another directory: the resolved URI still names this store.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("rel")
    assert experiment.experiment_id == tracker.experiment_id
    assert not (elsewhere / "mlflow.db").exists()


def test_bench_logs_to_a_relative_store_in_the_working_directory(tmp_path, monkeypatch, capsys):
    from segdist.bench.record import BENCH_EXPERIMENT, log_to_mlflow

    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri("sqlite:///bench.db")
    run_id = log_to_mlflow({"img_per_s_it's (fp32)": 2.5, "note": "x"}, "data", uri, {"host": "h"})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'bench.db'}")
    run = client.get_run(run_id)
    assert run.info.experiment_id == client.get_experiment_by_name(BENCH_EXPERIMENT).experiment_id
    assert run.data.metrics == {mlflow_key("img_per_s_it's (fp32)"): 2.5}
    assert run.data.params["machine.host"] == "h"


def test_report_takes_a_relative_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_study(resolve_tracking_uri("sqlite:///mlflow.db"), "rel", "naked")
    assert report.main(["--experiment", "rel", "--tracking-uri", "sqlite:///mlflow.db"]) == 0
    assert "55.00 ± 7.07" in capsys.readouterr().out


def test_a_folder_store_without_mlflows_consent_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(SegdistError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_reachable(resolve_tracking_uri("./mlruns"))


def test_a_relative_folder_store_works_where_mlflow_allows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for given, folder in (("mlruns", "mlruns"), ("file:other", "other")):
        uri = resolve_tracking_uri(given)
        check_reachable(uri)
        tracker = StudyTracker(uri, 'say "hi" (日本)', "s")
        tracker.log_text("study", "x", "x.txt")
        assert not tracker.pending
        assert list((tmp_path / folder).glob(f"{tracker.experiment_id}/*/artifacts/x.txt"))
    with pytest.raises(SegdistError, match="single quote"):  # MLflow's file store cannot look it up
        StudyTracker(resolve_tracking_uri("mlruns"), "it's", "it's")


# ----------------------------------------------------------------------------- 7: a deleted experiment


def test_a_deleted_experiment_is_restored_and_said_in_one_line(tmp_path, capsys):
    """Before: MlflowException: The experiment 1 must be in the 'active' state. Current state is deleted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = StudyTracker(uri, "study it's", "study it's")
    first.finish("study")
    first.client.delete_experiment(first.experiment_id)
    capsys.readouterr()
    again = StudyTracker(uri, "study it's", "study it's")
    assert again.experiment_id == first.experiment_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(again.experiment_id).lifecycle_stage == LifecycleStage.ACTIVE
    assert client.get_run(first.parent_run_id).info.lifecycle_stage == LifecycleStage.ACTIVE  # runs too
    assert segdist_lines(capsys.readouterr().err) == [
        f"segdist: MLflow experiment \"study it's\" (id {first.experiment_id}) was deleted; restored it, with its runs"
    ]
    StudyTracker(uri, "study it's", "study it's")  # active now: nothing more to say
    assert segdist_lines(capsys.readouterr().err) == []


def test_report_on_a_deleted_experiment_says_how_to_restore_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = fake_study(uri, "gone", "naked")
    MlflowClient(tracking_uri=uri).delete_experiment(experiment_id)
    capsys.readouterr()
    assert report.main(["--experiment", "gone", "--tracking-uri", uri]) == 2
    (line,) = segdist_lines(capsys.readouterr().err)
    assert "is deleted" in line and f"mlflow experiments restore --experiment-id {experiment_id}" in line


def test_resume_finds_the_study_of_a_deleted_experiment_and_the_tracker_restores_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "halfway", "halfway")  # its parent run is still RUNNING
    tracker.client.delete_experiment(tracker.experiment_id)
    study = SimpleNamespace(name="halfway")
    assert find_study_to_resume(uri, study) == tracker.parent_run_id
    resumed = StudyTracker(uri, "halfway", "halfway", parent_run_id=tracker.parent_run_id)
    assert resumed.client.get_run(tracker.parent_run_id).info.status == "RUNNING"
    assert len([line for line in segdist_lines(capsys.readouterr().err) if "restored" in line]) == 1


def test_resume_of_a_deleted_experiment_without_a_run_says_it_is_deleted(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    client.delete_experiment(get_or_create_experiment(client, "empty", uri))
    with pytest.raises(SegdistError, match=r"no earlier run of study 'empty'.*is deleted"):
        find_study_to_resume(uri, SimpleNamespace(name="empty"))


# ----------------------------------------------------------------------------- names users choose


@pytest.mark.parametrize("value", AWKWARD + ["a (b) and c = 'd'", "50% _x", "line\nbreak", "a`b", "trail\\"])
def test_a_filter_value_is_quoted_so_mlflow_reads_it_back_or_not_at_all(value):
    quoted = quote_filter_value(value)
    if "\\" in value or ("'" in value and '"' in value):
        assert quoted is None  # no literal in MLflow's grammar: callers compare in Python
        return
    (clause,) = SearchUtils.parse_search_filter(f"tags.`{STUDY_TAG}` = {quoted}")
    assert clause["value"] == value


def test_metric_keys_are_what_mlflow_accepts_kept_where_they_are_and_never_shared():
    for kept in ("val_iou_road", "val_iou_Straße", "val_iou_日本", "val_iou_two words", "a/b", "final_miou"):
        assert mlflow_key(kept) == kept
    names = [f"val_iou_{name}" for name in AWKWARD + ["a(b", "a)b", "a_b", "x:y", ""]] + ["..x", ".", "a/../b", "k" * 300]
    keys = [mlflow_key(name) for name in names]
    assert len(set(keys)) == len(names)
    assert keys == [mlflow_key(name) for name in names]  # the same name always gets the same key
    for key in keys:
        _validate_metric_name(key)
        assert ":" not in key and len(key) <= 250


@pytest.mark.parametrize("name", AWKWARD)
def test_an_awkward_study_name_goes_through_experiment_filter_run_name_and_path(tmp_path, name):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, name, name)
    tracker.log_text("study", "x", "x.txt")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == name
    # Artifacts stay inside mlartifacts whatever the name (a slash or `..` makes no subfolder).
    folder = Path(client.download_artifacts(tracker.parent_run_id, "x.txt")).resolve()
    assert folder.read_text() == "x"
    (local,) = (tmp_path / "mlartifacts").glob("*/*/artifacts/x.txt")
    assert local.read_text() == "x"
    assert client.get_run(tracker.parent_run_id).info.run_name.startswith(name)
    # A newer study run of the same experiment under another study name must not be taken.
    client.create_run(tracker.experiment_id, tags={STUDY_TAG: name + "x", ROLE_TAG: "study"})
    assert find_study_to_resume(uri, SimpleNamespace(name=name)) == tracker.parent_run_id


def test_awkward_class_names_reach_metric_keys_and_are_mapped_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "classes", "classes")
    classes = AWKWARD + ["a(b", "a)b", "plain"]
    metrics = {f"val_iou_{name}": i / 100 for i, name in enumerate(classes)}
    handle = tracker.start_trial("naked-c0-seed0", "c0-0", {"config_id": "c0"})
    tracker.log_metrics(handle, metrics, step=0)
    tracker.log_metrics(handle, metrics, step=1)
    assert not tracker.pending  # before: the first refused write held up every write after it
    client = MlflowClient(tracking_uri=uri)
    run_id = tracker.run_ids[handle]
    logged = client.get_run(run_id).data.metrics
    assert logged == {mlflow_key(name): value for name, value in metrics.items()}
    names = json.loads(Path(client.download_artifacts(run_id, KEY_NAMES_ARTIFACT)).read_text())
    assert names == {mlflow_key(name): name for name in metrics if mlflow_key(name) != name}
    assert "val_iou_Straße" in logged and "val_iou_日本" in logged and "val_iou_plain" in logged


def test_a_write_mlflow_refuses_is_left_out_and_the_rest_go_on(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "refused", "refused")
    tracker.log_params("study", {"lr": "0.1"})
    tracker.log_params("study", {"lr": "0.2"})  # MLflow never lets a param change
    tracker.log_metrics("study", {"final_miou": 0.5}, step=0)
    assert not tracker.pending
    run = tracker.client.get_run(tracker.parent_run_id)
    assert run.data.params["lr"] == "0.1" and run.data.metrics["final_miou"] == 0.5
    (line,) = segdist_lines(capsys.readouterr().err)
    assert line.startswith("segdist: warning: MLflow refused params of study")


def fake_study(uri: str, name: str, variant: str, metric_name: str = "val_iou_it's (x)") -> str:
    """A study's runs as the tracker writes them: one configuration, two finished seeds."""
    tracker = StudyTracker(uri, name, name)
    for seed in (0, 1):
        handle = tracker.start_trial(f"{variant}-c0-seed{seed}", f"c0-{seed}", {
            "config_id": "c0", "model.variant": variant, "train.seed": seed, "overrides": ""})
        tracker.log_metrics(handle, {"final_miou": 0.5 + seed / 10, metric_name: 0.3}, step=0)
        tracker.set_tags(handle, {STATUS_TAG: "finished"})
        tracker.finish(handle)
    tracker.finish("study")
    assert not tracker.pending
    return tracker.experiment_id


@pytest.mark.parametrize("name", ["it's (日本)", 'both \' and " (Straße)'])
def test_report_of_an_awkward_study_with_an_awkward_metric(tmp_path, capsys, name):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    variant = "v 'it's' (日本)"
    fake_study(uri, name, variant)
    assert report.main(["--experiment", name, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert variant in out and "55.00 ± 7.07" in out
    assert report.main(["--experiment", name, "--tracking-uri", uri, "--metric", "val_iou_it's (x)"]) == 0
    assert "30.00 ± 0.00" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    parent = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                filter_string=f"tags.`{ROLE_TAG}` = 'study'")[0].info.run_id
    saved = {a.path for a in client.list_artifacts(parent)}
    awkward_metric = mlflow_key("val_iou_it's (x)")
    assert {f"report_{awkward_metric}.md", f"seeds_{awkward_metric}.png", "report_final_miou.md"} <= saved
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                              filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == [f"{variant}-c0-seed0", f"{variant}-c0-seed1"]


def test_report_with_a_run_id_that_is_not_one_says_so(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake_study(uri, "s", "naked")
    capsys.readouterr()
    assert report.main(["--experiment", "s", "--tracking-uri", uri, "--run", "x' or '1"]) == 2
    (line,) = segdist_lines(capsys.readouterr().err)
    assert "no such run" in line


# ----------------------------------------------------------------------------- several processes at once


class LateLookup:
    """A real client whose first lookups by name come too early: what a process sees when
    another one creates (or restores) the experiment between its lookup and its own write."""

    def __init__(self, client: MlflowClient, stale):
        self.client, self.stale = client, list(stale)

    def get_experiment_by_name(self, name):
        return self.stale.pop(0) if self.stale else self.client.get_experiment_by_name(name)

    def __getattr__(self, attribute):
        return getattr(self.client, attribute)


def test_a_creation_that_loses_the_race_takes_the_winners_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    winner = client.create_experiment("raced (it's)")
    # The lookup said "none", the other process created it, our creation is refused.
    assert get_or_create_experiment(LateLookup(client, [None]), "raced (it's)", uri) == winner


def test_a_restore_that_loses_the_race_takes_the_restored_experiment(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    experiment_id = client.create_experiment("restored")
    client.delete_experiment(experiment_id)
    deleted = client.get_experiment(experiment_id)
    client.restore_experiment(experiment_id)  # the other process was first
    capsys.readouterr()
    assert get_or_create_experiment(LateLookup(client, [deleted]), "restored", uri) == experiment_id
    assert segdist_lines(capsys.readouterr().err) == []  # the other process said it


def _open_at_once(uris: list[str], name: str, barrier, results) -> None:
    """In a spawned process: for each store, wait for the other process, then open the study."""
    for uri in uris:
        barrier.wait(timeout=300)
        try:
            tracker = StudyTracker(uri, name, name)
            tracker.log_metrics("study", {"final_miou": 0.5}, step=0)
            results.put((uri, "ok", tracker.experiment_id, tracker.parent_run_id, len(tracker.pending)))
        except Exception as err:  # noqa: BLE001 - reported to the test
            results.put((uri, "error", f"{type(err).__name__}: {err}", None, None))


def test_two_processes_open_the_same_new_experiment_at_once(tmp_path):
    """Two studies of the same name (or two bench runs) at once: on a new store (MLflow builds
    its tables: before, `table ... already exists` killed one), on a store without the
    experiment (one creation loses the race) and with the experiment deleted (one restores)."""
    name = "same name (it's 日本)"
    uris = []
    for kind in ("new", "new", "no-experiment", "no-experiment", "deleted", "deleted"):
        uri = f"sqlite:///{tmp_path / f'{kind}-{len(uris)}.db'}"
        if kind == "no-experiment":
            client_for(uri).search_experiments()
        elif kind == "deleted":
            client = client_for(uri)
            client.delete_experiment(get_or_create_experiment(client, name, uri))
        uris.append(uri)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_open_at_once, args=(uris, name, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    try:
        answers = [results.get(timeout=600) for _ in range(2 * len(uris))]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                os.kill(process.pid, 9)
    assert [p.exitcode for p in processes] == [0, 0]
    for uri in uris:
        mine = [a for a in answers if a[0] == uri]
        assert [a[1] for a in mine] == ["ok", "ok"], mine
        assert mine[0][2] == mine[1][2]  # the same experiment
        assert mine[0][3] != mine[1][3] and mine[0][4] == mine[1][4] == 0  # each its own parent run, all written
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment(mine[0][2])
        assert experiment.name == name and experiment.lifecycle_stage == LifecycleStage.ACTIVE
        assert len(client.search_runs([experiment.experiment_id])) == 2
