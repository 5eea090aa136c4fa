"""A tiny study end to end: real local Ray (2 DDP workers per trial) and the real MLflow
store, then the same through `ray job submit` on a head + worker node on 127.0.0.1."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli, write_study

pytestmark = pytest.mark.integration


def child_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("segdist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("segdist.role") == "trial"]
    return parents, children


def assert_study_recorded(client: MlflowClient):
    parents, children = child_runs(client, "tiny")
    assert len(parents) == 1
    parent = parents[0]
    assert len(children) == 2
    # three levels: study -> configuration (the seed aggregates) -> seed runs
    (configuration,) = [r for r in client.search_runs([parent.info.experiment_id])
                        if r.data.tags.get("segdist.role") == "configuration"]
    assert configuration.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {configuration.info.run_id}
    assert {r.data.tags["segdist.study_run"] for r in children} == {parent.info.run_id}
    assert configuration.info.status == "FINISHED" and configuration.data.metrics["seeds"] == 2
    mean = sum(r.data.metrics["final_miou"] for r in children) / 2
    assert abs(configuration.data.metrics["final_miou_mean"] - mean) < 1e-9
    assert "train.seed" not in configuration.data.params and configuration.data.params["model.variant"] == "naked"
    assert [a.path for a in client.list_artifacts(configuration.info.run_id)] == ["seeds.png"]
    assert sorted(r.data.params["train.seed"] for r in children) == ["0", "1"]
    assert len({r.data.params["config_id"] for r in children}) == 1
    for run in children:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["model.variant"] == "naked"
        assert int(params["model_params"]) > 1000
        assert float(params["model_size_mb"]) > 0
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert [m.step for m in history] == [0]  # one epoch, logged once
        assert 0.0 <= history[0].value <= 1.0
        metrics = run.data.metrics
        for key in ("train_loss", "val_pixel_acc", "val_mean_acc", "val_iou_background", "trial_startup_s"):
            assert key in metrics, key
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")]
        assert "best_checkpoint/checkpoint.pt" in artifacts
        pictures = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
        assert pictures == ["evaluation/confusion.png", "evaluation/overlays.png"]
        assert "final_miou" in run.data.metrics
    report = client.download_artifacts(parent.info.run_id, "report.md")
    table = open(report).read()
    assert "| naked |" in table and "| 2 |" in table


def test_tiny_study_on_local_ray_is_recorded_in_mlflow(tmp_path, tiny_shards, loopback_cluster):
    space = write_study(tmp_path / "tiny.yaml", *tiny_shards)
    # Another Ray on this machine: the study starts its own, and Ray Train's placement-group
    # cleaner must still find that one's State API (not fail on "multiple active Ray instances").
    loopback_cluster.start_head()
    result = run_cli(["segdist.tune", "--space", str(space)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "multiple active Ray instances" not in console and "Failed to query Ray Train" not in console
    # Readable (issue 18): no per-worker report dumps, no best-trial line with the whole config.
    assert "Reporting training result" not in console and "Current best trial" not in console
    assert "Ray's logs (each worker's output, Ray Train's reports): /" in console
    assert "naked · seed 0: epoch 1/1  val_miou " in console and "naked · seed 1: finished" in console
    assert "Trial status" not in console  # Tune's tables (each trial's whole config) are off
    assert (tmp_path / "mlflow.db").exists()
    assert_study_recorded(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))

    report = run_cli(["segdist.report", "--experiment", "tiny"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| naked |" in report.stdout


def test_ray_job_submit_on_two_nodes_with_token_auth(tmp_path, tiny_shards, mlflow_server, loopback_cluster):
    """The card's command verbatim: the head's Ray is started as cluster/*.yaml start it, with
    the MLflow server and the storage in its environment; `ray job submit -- python -m
    segdist.tune --space FILE` with no other flag records there. A job whose environment
    names neither is refused in one line, before any compute."""
    space = write_study(tmp_path / "tiny.yaml", *tiny_shards)
    cluster = loopback_cluster
    cluster.start_head(env={"MLFLOW_TRACKING_URI": mlflow_server, "SEGDIST_STORAGE": str(tmp_path / "ray_results")})
    cluster.add_node()  # 1 CPU each: the trial's two DDP workers span both nodes

    # The job server refuses a wrong token and a request without one.
    refused = subprocess.run(
        [cluster.ray, "job", "submit", "--address", cluster.dashboard, "--", "echo", "hi"],
        env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-cluster-token"}, capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode != 0
    assert "token is invalid" in refused.stdout + refused.stderr
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(cluster.dashboard + "/api/jobs/", timeout=10)
    assert anonymous.value.code == 401

    # The head's job agent comes up a little after `ray start` returns.
    def agent_ready():
        probe = subprocess.run([cluster.ray, "job", "submit", "--address", cluster.dashboard, "--", "true"],
                               env=cluster.env, capture_output=True, text=True, timeout=120)
        return probe.returncode == 0 or "No available agent" not in probe.stdout + probe.stderr

    deadline = time.time() + 120
    while not agent_ready() and time.time() < deadline:
        time.sleep(3)

    def submit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [cluster.ray, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT), *extra,
             "--", sys.executable, "-m", "segdist.tune", "--space", str(space)],
            env=cluster.env, capture_output=True, text=True, timeout=900,
        )

    unset = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": "", "SEGDIST_STORAGE": ""}})
    refused = submit("--runtime-env-json", unset)
    assert refused.returncode != 0
    assert "segdist: error: inside a Ray job the working directory" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr

    job = submit()
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "2 trials" in job.stdout
    assert_study_recorded(MlflowClient(mlflow_server))
    assert (tmp_path / "ray_results" / "tiny").is_dir()  # checkpoints and Tune state on the storage


def test_asha_screening_runs_and_stopped_trials_are_counted_not_averaged(tmp_path, tiny_shards):
    space = write_study(
        tmp_path / "asha.yaml", *tiny_shards, seeds=[0],
        train={"epochs": 3, "batch_size": 2, "crop_size": 40, "scale_range": [0.8, 1.2], "lr": 0.01},
        search={"train.lr": {"grid": [0.02, 1.0e-7]}},
        screening={"asha": {"grace_period": 1, "reduction_factor": 2}},
    )
    result = run_cli(["segdist.tune", "--space", str(space)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = child_runs(client, "tiny")
    statuses = [r.data.tags["segdist.status"] for r in children]
    assert len(children) == 2 and set(statuses) <= {"finished", "stopped_early"}
    for run in children:
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
        if run.data.tags["segdist.status"] == "stopped_early":
            assert max(history) < 2 and "final_miou" not in run.data.metrics
        else:
            assert history == [0, 1, 2]
    table = open(client.download_artifacts(children[0].data.tags["segdist.study_run"], "report.md")).read()
    stopped = statuses.count("stopped_early")
    assert (f"{stopped} stopped_early" in table) if stopped else ("stopped_early" not in table)
