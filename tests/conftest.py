"""Shared fixtures: a tiny sharded data set, study files, loopback servers."""


import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from segdist.cluster import free_port  # one picker of free ports, for segdist and the tests
from segdist.data.synthetic import write_synthetic_voc

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Integration tests start Ray and MLflow processes; keep them last so unit failures show first.
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A tiny generated VOC-layout data set, sharded with the real VOC reader."""
    base = tmp_path_factory.mktemp("tiny-data")
    write_synthetic_voc(base / "voc", seed=0, n_train=24, n_val=8, min_size=40, max_size=56)
    splits = []
    for split in ("train", "val"):
        out = base / "shards" / split
        result = run_cli(["segdist.shards", "build", "--dataset", "synthetic", "--root", str(base / "voc"),
                          "--split", split, "--out", str(out), "--shard-size", "8"], cwd=base)
        assert result.returncode == 0, result.stderr
        splits.append(out)
    return tuple(splits)


def write_study(path: Path, train_shards: Path, val_shards: Path, **overrides) -> Path:
    """1 configuration x 2 seeds x 1 epoch x 2 workers, tiny model and images."""
    study = {
        "name": "tiny",
        "data": {"train_shards": str(train_shards), "val_shards": str(val_shards), "loader_workers": 0},
        "model": {"variant": "naked", "depth": 18, "width": 4, "output_stride": 8},
        "train": {"epochs": 1, "batch_size": 2, "crop_size": 40, "scale_range": [0.8, 1.2], "lr": 0.01},
        "resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1},
        "seeds": [0, 1],
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            study[section][name] = value
        else:
            study[section] = value
    path.write_text(yaml.safe_dump(study))
    return path


def run_cli(args, cwd, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    if "RAY_ADDRESS" not in (env or {}):
        full_env.pop("RAY_ADDRESS", None)  # always a fresh local Ray unless the test says otherwise
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` bound to 127.0.0.1."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", timeout_s=90)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


class LoopbackCluster:
    """A Ray head and worker nodes on 127.0.0.1 with token authentication, each node with
    its own temp dir, so a test can kill one node, and tear down only its own processes
    (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, token: str):
        self.ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.temp_dirs: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, *args: str, env: dict | None = None) -> str:
        # Short temp dirs: raylet socket paths must stay under the AF_UNIX length limit.
        temp = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
        self.temp_dirs.append(temp)
        result = subprocess.run([self.ray, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--disable-usage-stats", f"--temp-dir={temp}"],
                                env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        return temp

    def start_head(self, env: dict | None = None) -> str:
        """`env`: more environment for the head's Ray processes (what a cluster YAML exports)."""
        return self._start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={self.dashboard_port}", env=env)

    def add_node(self) -> str:
        return self._start(f"--address={self.address}")

    def kill_node(self, temp_dir: str) -> None:
        """SIGKILL a node's raylet and helpers; its worker processes die with the raylet."""
        for pid in pids_with(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def shutdown(self) -> None:
        for temp in reversed(self.temp_dirs):
            self.kill_node(temp)
        time.sleep(2)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def pids_with(fragment: str, descendant_of: int | None = None) -> list[int]:
    """Processes whose command line contains `fragment` (and, if given, that descend from
    `descendant_of`, so a test never touches another Ray on the same machine)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    if descendant_of is not None:
        found = [pid for pid in found if descendant_of in ancestors(pid)]
    return found


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
        chain.append(pid)
    return chain


@pytest.fixture
def loopback_cluster():
    cluster = LoopbackCluster(token="segdist-test-" + os.urandom(8).hex())
    try:
        yield cluster
    finally:
        cluster.shutdown()


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


class S3Server:
    """A moto S3 server on 127.0.0.1 that checks every request's credentials (IAM on), with
    one IAM user allowed everything: its key id and secret are the test's credentials."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the 3 IAM calls of _make_user, then every request is checked
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_listening()
            self.key_id, self.secret = self._make_user()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:  # a TCP connect: an HTTP request would use up an unauthenticated call
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"moto server exited with {self.process.returncode}") from None
                time.sleep(0.3)
        raise TimeoutError(f"moto server on {self.endpoint} did not listen within {timeout_s} s")

    def _make_user(self) -> tuple[str, str]:
        import json

        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="segdist")
        key = iam.create_access_key(UserName="segdist")["AccessKey"]
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="segdist", PolicyName="all", PolicyDocument=json.dumps(allow_all))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that reach this server with the allowed user."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server (`moto[server]`, the test extra) for the session, stopped by PID."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server and the AWS_* environment that reaches it
    (monkeypatched: subprocesses inherit it). Yields the server; `s3.bucket` is the bucket."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = "segdist-" + os.urandom(4).hex()
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.bucket = bucket
    yield s3_server
