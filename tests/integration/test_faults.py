"""Faults done for real: a killed training worker, a lost node, a diverging trial, an
MLflow server that goes away mid-study (a killed driver and --resume: test_resume.py). Each study must end with every epoch logged
exactly once and nothing run twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, pids_with, wait_http, write_study
from tests.integration.driver import finish, start_tune, steps, trial_runs, wait_until

pytestmark = pytest.mark.integration

# No max_failures: the faults below must be survived with the defaults (issue 16).
SLOW_EPOCHS = {"epochs": 3, "batch_size": 2, "crop_size": 40, "scale_range": [0.8, 1.2], "lr": 0.01,
               "epoch_scale": 12}


def interrupt_and_check_recovery(space: Path, cwd: Path, fault, *extra: str, env=None) -> None:
    """Start the study, inject `fault(process)` once epoch 0 is in MLflow (mid-epoch 1),
    then require the trial to finish with every epoch logged once and a restart counted."""
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    process = start_tune(space, cwd, *extra, env=env)
    try:
        wait_until(lambda: any(steps(client, r) for r in trial_runs(client, "tiny")), what="epoch 0 in MLflow")
        fault(process)
        code, output = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, output[-4000:]
    (run,) = trial_runs(client, "tiny")
    assert run.info.status == "FINISHED" and run.data.tags["segdist.status"] == "finished"
    assert steps(client, run) == [0, 1, 2]
    assert run.data.metrics["worker_restarts"] >= 1
    report = open(client.download_artifacts(run.data.tags["segdist.study_run"], "report.md")).read()
    assert "worker restarts" in report


def test_a_killed_worker_restarts_from_its_checkpoint_and_no_epoch_is_logged_twice(tmp_path, tiny_shards):
    def kill_one_worker(process):
        workers = wait_until(lambda: pids_with("ray::RayTrainWorker", descendant_of=process.pid),
                             what="a Ray Train worker of this study")
        os.kill(workers[0], signal.SIGKILL)

    space = write_study(tmp_path / "w.yaml", *tiny_shards, train=SLOW_EPOCHS, seeds=[0])
    interrupt_and_check_recovery(space, tmp_path, kill_one_worker)


def test_a_lost_node_is_replaced_and_the_trial_is_retried(tmp_path, tiny_shards, loopback_cluster):
    cluster = loopback_cluster
    cluster.start_head()
    doomed = cluster.add_node()  # the trial's two workers span the head and this node

    def lose_the_node(process):
        cluster.kill_node(doomed)
        cluster.add_node()  # the replacement (what an autoscaler does)

    space = write_study(tmp_path / "node.yaml", *tiny_shards, train=SLOW_EPOCHS, seeds=[0])
    interrupt_and_check_recovery(space, tmp_path, lose_the_node, "--address", cluster.address, env=cluster.env)


def test_a_diverging_trial_stops_and_the_others_go_on(tmp_path, tiny_shards):
    train = {**SLOW_EPOCHS, "epoch_scale": 1, "epochs": 2}  # the default max_failures: 3
    space = write_study(tmp_path / "n.yaml", *tiny_shards, train=train, seeds=[0],
                        search={"train.lr": {"grid": [0.01, 1.0e12]}})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, output = finish(start_tune(space, tmp_path))
    assert code == 0, output[-4000:]
    runs = {r.data.params["train.lr"]: r for r in trial_runs(client, "tiny")}
    diverged = runs["1000000000000.0"]
    assert diverged.data.tags["segdist.status"] == "diverged" and diverged.info.status == "FAILED"
    assert "loss is not finite in epoch 0" in diverged.data.tags["segdist.error"]
    assert diverged.data.metrics["worker_restarts"] == 0  # a result: not retried from the checkpoint
    assert runs["0.01"].data.tags["segdist.status"] == "finished"
    assert "1 diverged" in output


def test_mlflow_going_away_mid_study_loses_nothing(tmp_path, tiny_shards):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"

    def server():
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    mlflow = server()
    wait_http(uri + "/health", timeout_s=90)
    client = MlflowClient(uri)
    space = write_study(tmp_path / "m.yaml", *tiny_shards, train=SLOW_EPOCHS, seeds=[0])
    process = start_tune(space, tmp_path, "--tracking-uri", uri)
    try:
        wait_until(lambda: any(steps(client, r) for r in trial_runs(client, "tiny")), what="epoch 0 in MLflow")
        os.killpg(mlflow.pid, signal.SIGTERM)
        mlflow.wait(timeout=60)
        time.sleep(8)  # training goes on meanwhile
        mlflow = server()
        wait_http(uri + "/health", timeout_s=90)
        code, output = finish(process)
    finally:
        for proc in (process, mlflow):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, output[-4000:]
    assert "MLflow write failed" in output and "reachable again" in output  # the outage was real
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = trial_runs(client, "tiny")
    assert steps(client, run) == [0, 1, 2]
    assert run.data.tags["segdist.status"] == "finished"


def test_no_secret_reaches_mlflow(tmp_path, tiny_shards):
    secrets = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-segdist-test-secret",
               "SEGDIST_TEST_API_TOKEN": "tok-0123456789abcdef-segdist"}
    train = {**SLOW_EPOCHS, "epoch_scale": 1, "epochs": 1}
    space = write_study(tmp_path / "s.yaml", *tiny_shards, train=train, seeds=[0])
    code, output = finish(start_tune(space, tmp_path, env=secrets))
    assert code == 0, output[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    texts = [output]
    for run in client.search_runs([experiment.experiment_id]):
        texts += [str(run.data.params), str(run.data.tags), str(run.data.metrics)]
        for name in ("study.yaml", "report.md"):
            try:
                texts.append(open(client.download_artifacts(run.info.run_id, name)).read())
            except Exception:  # noqa: BLE001 - child runs have no such artifacts
                pass
    for secret in secrets.values():
        assert all(secret not in text for text in texts)
