"""Faults done for real: a killed training worker, a killed driver, a diverging trial, an
MLflow server that goes away mid-study. Each study must end with every epoch logged
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

pytestmark = pytest.mark.integration

# No max_failures: the faults below must be survived with the defaults (issue 16).
SLOW_EPOCHS = {"epochs": 3, "batch_size": 2, "crop_size": 40, "scale_range": [0.8, 1.2], "lr": 0.01,
               "epoch_scale": 12}


def start_tune(space: Path, cwd: Path, *extra: str, env=None) -> subprocess.Popen:
    """The study's driver, its output in `cwd/driver-N.log`: a pipe nobody reads until the
    end fills up (64 KiB) and blocks the driver's prints, and with them its Tune loop."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update(env or {}, PYTHONUNBUFFERED="1")
    log = cwd / f"driver-{len(list(cwd.glob('driver-*.log')))}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "segdist.tune", "--space", str(space), *extra],
            cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: the test can kill it with its local Ray
        )
    process.log = log
    return process


def driver_output(process: subprocess.Popen) -> str:
    return process.log.read_text(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    process.wait(timeout=timeout)
    return process.returncode, driver_output(process)


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("segdist.role") == "trial"]


def steps(client: MlflowClient, run, metric="val_miou") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


def wait_until(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


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
    report = open(client.download_artifacts(run.data.tags["mlflow.parentRunId"], "report.md")).read()
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


def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, tiny_shards):
    space = write_study(tmp_path / "d.yaml", *tiny_shards, train=SLOW_EPOCHS, seeds=[0, 1])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start_tune(space, tmp_path)

    def first_done_second_started():
        runs = trial_runs(client, "tiny")
        done = [r for r in runs if r.data.tags.get("segdist.status") == "finished"]
        started = [r for r in runs if r not in done and steps(client, r)]
        return (done, started) if done and started else None

    try:
        try:
            (done,), _ = wait_until(first_done_second_started, timeout=900, what="trial 1 done, trial 2 at epoch 0")
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            raise AssertionError("trial 1 done, trial 2 at epoch 0 never seen; the driver said:\n"
                                 + driver_output(process)[-6000:]) from None
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    finished_before = done.info.end_time

    code, output = finish(start_tune(space, tmp_path, "--resume"))
    assert code == 0, output[-4000:]
    runs = trial_runs(client, "tiny")
    assert len(runs) == 2  # no duplicate run
    for run in runs:
        assert run.data.tags["segdist.status"] == "finished"
        assert steps(client, run) == [0, 1, 2]
    again = next(r for r in runs if r.info.run_id == done.info.run_id)
    assert again.info.end_time == finished_before  # the finished trial did not run again
    resumed = next(r for r in runs if r.info.run_id != done.info.run_id)
    assert int(resumed.data.tags["segdist.resumed_at_epoch"]) >= 1  # continued from its checkpoint


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
