"""Object storage for real: a moto S3 server on 127.0.0.1 that checks credentials (tests/conftest.py
`s3`). Shards built to and streamed from s3://, checkpoints and Tune state in s3:// (and a resume
from there after the driver is killed), MLflow artifacts on the same server; the credentials
reach none of MLflow, the logs or the artifacts; a store that cannot be used is one line before
any training."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from segdist.data.stream import read_dataset_info, train_loader
from segdist.data.transforms import TrainTransform
from segdist.errors import SegdistError
from segdist.tune import resolve_storage
from tests.conftest import free_port, run_cli, wait_http, write_study
from tests.integration.driver import finish, start_tune, steps, trial_runs, wait_until
from tests.integration.test_faults import SLOW_EPOCHS


def build_to_s3(tiny_shards, bucket: str, cwd: Path) -> tuple[str, str]:
    """`python -m segdist.shards build --out s3://BUCKET/shards/{train,val}` from the tiny set."""
    voc = Path(tiny_shards[0]).parents[1] / "voc"
    uris = []
    for split in ("train", "val"):
        uri = f"s3://{bucket}/shards/{split}"
        result = run_cli(["segdist.shards", "build", "--dataset", "synthetic", "--root", str(voc), "--split", split,
                          "--out", uri, "--shard-size", "8", "--quiet"], cwd=cwd)
        assert result.returncode == 0, result.stderr
        uris.append(uri)
    return tuple(uris)


def keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


# ------------------------------------------------------------------ a store that cannot be used


def test_storage_in_a_missing_bucket_is_one_line_naming_it(s3):
    with pytest.raises(SegdistError, match=r"storage s3://no-such-bucket/x: .*bucket 'no-such-bucket' does not exist"):
        resolve_storage("s3://no-such-bucket/x")
    assert resolve_storage(f"s3://{s3.bucket}/ray") == f"s3://{s3.bucket}/ray"
    assert not [k for k in keys(s3, "") if ".segdist-probe" in k]  # the probe object is gone


def test_refused_credentials_and_an_unreachable_server_are_one_line(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0000")
    with pytest.raises(SegdistError, match=rf"storage s3://{s3.bucket}/ray: .*credentials are refused"):
        resolve_storage(f"s3://{s3.bucket}/ray")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SegdistError, match=rf"storage s3://{s3.bucket}/ray: .*unreachable at http://127\.0\.0\.1"):
        resolve_storage(f"s3://{s3.bucket}/ray")


def test_tune_with_a_missing_bucket_stops_before_any_training(s3, tmp_path, tiny_shards):
    space = write_study(tmp_path / "s.yaml", *tiny_shards)
    result = run_cli(["segdist.tune", "--space", str(space), "--storage", "s3://nope/x"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [f"segdist: error: storage s3://nope/x: cannot write there: bucket 'nope' does not exist "
                     f"at {s3.endpoint}"]
    assert "trials (" not in result.stdout  # nothing was started


def test_shards_in_a_missing_bucket_are_one_line(s3, tmp_path, tiny_shards):
    voc = Path(tiny_shards[0]).parents[1] / "voc"
    result = run_cli(["segdist.shards", "build", "--dataset", "synthetic", "--root", str(voc), "--split", "val",
                      "--out", "s3://nope/shards/val", "--quiet"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"segdist: error: shard folder s3://nope/shards/val: cannot write there: bucket 'nope' does not exist "
        f"at {s3.endpoint}"]
    with pytest.raises(SegdistError, match=r"no shards in s3://nope/shards/val \(.*: not found \(bucket .nope. does not exist"):
        read_dataset_info("s3://nope/shards/val")


# ------------------------------------------------------------------ shards in S3


def test_shards_built_to_s3_stream_like_the_local_ones(s3, tmp_path, tiny_shards):
    train_uri, val_uri = build_to_s3(tiny_shards, s3.bucket, tmp_path)
    stored = keys(s3, "shards/train/")
    assert "shards/train/dataset.json" in stored and "shards/train/manifest.parquet" in stored
    assert not any("/_parts" in key or "/." in key for key in stored)  # the local bookkeeping stays local
    assert run_cli(["segdist.shards", "inspect", val_uri], cwd=tmp_path).returncode == 0
    remote, local = read_dataset_info(train_uri), read_dataset_info(tiny_shards[0])
    assert remote.num_samples == local.num_samples and remote.shard_sizes == local.shard_sizes

    def batches(info, loader_workers):
        loader = train_loader(info, transform=TrainTransform(40, (0.8, 1.2)), batch_size=2, batches_per_epoch=6,
                              seed=3, epoch=1, rank=1, world_size=2, loader_workers=loader_workers)
        return [images.numpy() for images, _ in loader]

    for workers in (0, 2):  # 2: forked loader workers, each with its own S3 client
        got, expected = batches(remote, workers), batches(local, workers)
        assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


# ------------------------------------------------------------------ a study on S3


def start_mlflow_on_s3(s3, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` whose artifacts go to s3://BUCKET/mlflow (proxied: clients never need
    the credentials); it gets them from its own environment."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"s3://{s3.bucket}/mlflow", "--workers", "1"],
        env={**os.environ, **s3.env}, stdout=open(tmp_path / "mlflow-server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", timeout_s=90)
    return process, uri


def no_secret_in(s3, client: MlflowClient, experiment: str, output: str, scratch: Path, monkeypatch) -> None:
    """The secret is in none of the driver's output, MLflow's params/tags/metrics, or any
    artifact (checkpoints, pictures, report), nor in any object the study stored in S3."""
    # Downloads through the server, not from presigned S3 URLs, which moto refuses when it checks
    # credentials (it wants an Authorization header).
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    secret = s3.secret
    assert secret not in output
    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id]):
        assert secret not in str(run.data.params) + str(run.data.tags) + str(run.data.metrics)
        folder = scratch / run.info.run_id
        folder.mkdir(parents=True)
        client.download_artifacts(run.info.run_id, "", str(folder))
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    bucket = s3.client()
    for key in keys(s3, ""):
        assert secret.encode() not in bucket.get_object(Bucket=s3.bucket, Key=key)["Body"].read(), key


@pytest.mark.integration
def test_a_study_streams_from_s3_checkpoints_to_s3_and_logs_artifacts_to_s3(s3, tmp_path, tiny_shards, monkeypatch):
    train_uri, val_uri = build_to_s3(tiny_shards, s3.bucket, tmp_path)
    space = write_study(tmp_path / "s3.yaml", train_uri, val_uri, seeds=[0],
                        train={**SLOW_EPOCHS, "epochs": 2, "epoch_scale": 1})
    mlflow, uri = start_mlflow_on_s3(s3, tmp_path)
    try:
        code, output = finish(start_tune(space, tmp_path, "--storage", f"s3://{s3.bucket}/ray",
                                         "--tracking-uri", uri), timeout=900)
        assert code == 0, output[-4000:]
        client = MlflowClient(uri)
        (run,) = trial_runs(client, "tiny")
        assert run.data.tags["segdist.status"] == "finished" and steps(client, run) == [0, 1]
        assert run.data.params["data.train_shards"] == train_uri
        stored = keys(s3, "")
        assert any(k.startswith("ray/tiny/") and "/checkpoint_" in k for k in stored)  # Ray Train's checkpoints
        assert any(k.startswith("ray/tiny/") and "/tune/" in k for k in stored)  # Tune's experiment state
        assert any(k.startswith("mlflow/") and "/best_checkpoint/" in k for k in stored)  # MLflow's artifacts
        assert any(k.startswith("mlflow/") and k.endswith("report.md") for k in stored)
        assert not (tmp_path / "ray_results").exists()
        no_secret_in(s3, client, "tiny", output, tmp_path / "artifacts", monkeypatch)
    finally:
        os.killpg(mlflow.pid, signal.SIGTERM)
        mlflow.wait(timeout=60)


@pytest.mark.integration
def test_nodes_that_cannot_reach_the_storage_are_one_line_naming_it(s3, tmp_path, tiny_shards, loopback_cluster):
    # The cluster's nodes carry other (stale) credentials than the driver: the driver reaches the
    # bucket, the nodes do not.
    loopback_cluster.start_head(env={**s3.env, "AWS_SECRET_ACCESS_KEY": "stale-secret-of-the-nodes"})
    space = write_study(tmp_path / "n.yaml", *tiny_shards, seeds=[0],
                        resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1})
    storage = f"s3://{s3.bucket}/ray"
    env = {**loopback_cluster.env, **s3.env}
    result = run_cli(["segdist.tune", "--space", str(space), "--storage", storage, "--address",
                      loopback_cluster.address], cwd=tmp_path, env={**env, "RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"segdist: error: Ray node \S+: {storage}: cannot write there: the credentials are refused .*"
                    "this driver can", last), last
    assert "trials (" not in result.stdout  # nothing was started
    assert s3.secret not in result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_checkpoint_in_s3(s3, tmp_path, tiny_shards):
    train_uri, val_uri = build_to_s3(tiny_shards, s3.bucket, tmp_path)
    space = write_study(tmp_path / "r.yaml", train_uri, val_uri, train=SLOW_EPOCHS, seeds=[0])
    storage = f"s3://{s3.bucket}/ray"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start_tune(space, tmp_path, "--storage", storage)
    try:
        # epoch 0 in MLflow: its checkpoint is in S3 (Ray reports it after the upload)
        wait_until(lambda: any(steps(client, r) for r in trial_runs(client, "tiny")), timeout=900,
                   what="epoch 0 in MLflow")
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert any("/checkpoint_" in k for k in keys(s3, "ray/tiny/"))
    started = time.perf_counter()
    code, output = finish(start_tune(space, tmp_path, "--storage", storage, "--resume"), timeout=900)
    assert code == 0, output[-4000:]
    (run,) = trial_runs(client, "tiny")
    print(f"resume from s3: {time.perf_counter() - started:.1f} s wall for the --resume run, "
          f"from epoch {run.data.tags.get('segdist.resumed_at_epoch')}")  # a figure for the record, not asserted
    assert run.data.tags["segdist.status"] == "finished"
    assert steps(client, run) == [0, 1, 2]  # every epoch once
    assert int(run.data.tags["segdist.resumed_at_epoch"]) >= 1  # continued from its checkpoint in S3
    assert not (tmp_path / "ray_results").exists()
