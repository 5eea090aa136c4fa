"""A tiny study end to end: real local Ray (2 DDP workers per trial) and the real MLflow
store, then the same through `ray job submit` on a head + worker node on 127.0.0.1."""

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port, run_cli, write_study

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
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
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


def test_tiny_study_on_local_ray_is_recorded_in_mlflow(tmp_path, tiny_shards):
    space = write_study(tmp_path / "tiny.yaml", *tiny_shards)
    result = run_cli(["segdist.tune", "--space", str(space)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()
    assert_study_recorded(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))

    report = run_cli(["segdist.report", "--experiment", "tiny"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| naked |" in report.stdout


def test_ray_job_submit_on_two_nodes_with_token_auth(tmp_path, tiny_shards, mlflow_server):
    space = write_study(tmp_path / "tiny.yaml", *tiny_shards)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "segdist-test-" + os.urandom(8).hex()}
    env.pop("RAY_ADDRESS", None)

    def ray_cli(*args, timeout=180):
        return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)

    worker_temp = None
    head = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                   "--num-cpus=1", "--disable-usage-stats")
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        # Its own temp dir: two nodes on one machine would otherwise share runtime_resources/,
        # and the worker node's clean-up would delete the job's working_dir under the driver.
        worker_temp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")  # short: raylet socket paths
        worker = ray_cli("start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
                         "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={worker_temp}")
        assert worker.returncode == 0, worker.stderr[-2000:]
        dashboard = f"http://127.0.0.1:{dashboard_port}"

        # The job server refuses a wrong token and a request without one.
        refused = subprocess.run(
            [ray, "job", "submit", "--address", dashboard, "--", "echo", "hi"],
            env={**env, "RAY_AUTH_TOKEN": "not-the-cluster-token"}, capture_output=True, text=True, timeout=120,
        )
        assert refused.returncode != 0
        assert "token is invalid" in refused.stdout + refused.stderr
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(dashboard + "/api/jobs/", timeout=10)
        assert anonymous.value.code == 401

        job = ray_cli("job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
                      sys.executable, "-m", "segdist.tune", "--space", str(space),
                      "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "ray_results"),
                      timeout=900)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "2 trials" in job.stdout
    finally:
        ray_cli("stop", "--force")
        if worker_temp:
            shutil.rmtree(worker_temp, ignore_errors=True)
    assert_study_recorded(MlflowClient(mlflow_server))
