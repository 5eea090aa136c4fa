"""The cluster for real: a study that needs a node the autoscaler starts on demand (Ray's fake
multi-node provider on 127.0.0.1) runs; one that no node type can hold, and a driver without
the cluster's token, are refused in one line; no --address starts a Ray of its own even when
ray_current_cluster names a dead head."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LoopbackCluster, ancestors, free_port, pids_with, write_study

pytestmark = pytest.mark.integration

LAUNCHER_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                  "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                  "rsync_filter")


def fake_cluster_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider: a 1-CPU head and up to 2 'worker' nodes of 2 CPUs, none
    at the start. The v1 autoscaler wants every launcher key (KeyError 'file_mounts' otherwise)
    and, with no SSH to its fake nodes, no node updaters."""
    return {
        "cluster_name": "segdist-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "worker": {"resources": {"CPU": 2, "object_store_memory": 200_000_000}, "node_config": {},
                       "min_workers": 0, "max_workers": 2},
        },
        "file_mounts": {}, "file_mounts_sync_continuously": False, **{key: [] for key in LAUNCHER_LISTS},
    }


def family(fragment: str) -> set[int]:
    """The processes whose command line contains `fragment`, and all their descendants (the
    nodes the autoscaler's monitor starts, Ray's agents and workers, which rename themselves)."""
    roots = set(pids_with(fragment)) - {os.getpid()}
    return roots | {pid for pid in pids_with("") if roots & set(ancestors(pid))}


def kill_family(fragment: str) -> None:
    for pid in family(fragment):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class AutoscalingCluster(LoopbackCluster):
    """A token-protected head on 127.0.0.1 whose autoscaler starts the 2-CPU nodes of
    fake_cluster_config on demand; torn down by PID, the autoscaler's nodes included."""

    def start_autoscaling_head(self, folder: Path) -> str:
        config = folder / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(fake_cluster_config(self.address)))
        self.env["RAY_FAKE_CLUSTER"] = "1"
        try:
            return self._start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={self.dashboard_port}", f"--autoscaling-config={config}")
        finally:
            del self.env["RAY_FAKE_CLUSTER"]

    def kill_node(self, temp_dir: str) -> None:
        kill_family(temp_dir)

    def started_nodes(self) -> list[int]:
        """The raylets of the nodes the autoscaler started (children of its monitor)."""
        monitors = [pid for pid in pids_with("autoscaler/_private/monitor.py") if pid in family(self.temp_dirs[0])]
        return [pid for pid in pids_with("raylet/raylet") if set(monitors) & set(ancestors(pid))]

    def train_workers(self) -> list[int]:
        return [pid for pid in pids_with("ray::RayTrainWorker") if pid in family(self.temp_dirs[0])]


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    cluster = AutoscalingCluster(token="segdist-test-" + os.urandom(8).hex())
    try:
        cluster.start_autoscaling_head(tmp_path_factory.mktemp("autoscaling"))
        yield cluster
    finally:
        cluster.shutdown()


def tune(space: Path, address: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segdist.tune", "--space", str(space), "--address", address],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `segdist: error:` line, the last thing said (Ray may log before it)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("segdist: error: ")] == lines[-1:], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Trial status" not in result.stdout
    return lines[-1]


def test_a_study_no_node_type_can_hold_is_refused_in_one_line(autoscaling_cluster, tmp_path, tiny_shards):
    space = write_study(tmp_path / "big.yaml", *tiny_shards, seeds=[0],
                        resources={"workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 0})
    result = tune(space, autoscaling_cluster.address, autoscaling_cluster.env, tmp_path)
    assert error_line(result) == (
        f"segdist: error: {space}: resources of naked (2 workers) do not fit the cluster: 4 CPUs per worker but "
        "the largest node is type 'worker' (CPU 2; the autoscaler can start 2)")
    assert autoscaling_cluster.train_workers() == []


@pytest.mark.parametrize("auth, sent", [
    ({}, "it sent no token: RAY_AUTH_MODE is not 'token'"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "the token in RAY_AUTH_TOKEN is not the cluster's"),
])
def test_a_driver_without_the_clusters_token_is_refused_in_one_line(autoscaling_cluster, tmp_path, tiny_shards,
                                                                    auth, sent):
    """Ray 2.60 alone: three tracebacks after ~20 s of retries, exit 1."""
    env = {k: v for k, v in autoscaling_cluster.env.items() if not k.startswith("RAY_AUTH_")}
    space = write_study(tmp_path / "s.yaml", *tiny_shards, seeds=[0])
    result = tune(space, autoscaling_cluster.address, {**env, **auth}, tmp_path)
    assert error_line(result) == (
        f"segdist: error: Ray cluster at {autoscaling_cluster.address} refused this driver ({sent}); set "
        "RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
        "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    assert "Failed to connect to GCS" not in result.stderr  # refused by the probe, before ray.init retried


def test_a_study_that_needs_a_node_the_autoscaler_starts_runs_to_the_end(autoscaling_cluster, tmp_path, tiny_shards):
    """2 workers x 1 CPU: more than the 1-CPU head, which alone was refused before."""
    cluster = autoscaling_cluster
    space = write_study(tmp_path / "two.yaml", *tiny_shards, seeds=[0])
    log = tmp_path / "tune.log"
    start = time.time()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "segdist.tune", "--space", str(space),
                                    "--address", cluster.address], cwd=tmp_path, env=cluster.env,
                                   stdout=out, stderr=subprocess.STDOUT)
    first_worker, started = None, 0
    try:
        while process.poll() is None and time.time() - start < 600:
            started = max(started, len(cluster.started_nodes()))
            if first_worker is None and cluster.train_workers():
                first_worker = time.time() - start
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()
    wall = time.time() - start
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    assert started >= 1  # the autoscaler really added a node
    assert "naked · seed 0: finished" in output and "| naked |" in output
    print(f"\nautoscaling loopback cluster: first Ray Train worker {first_worker:.0f} s after submit "
          f"(node start included); whole study {wall:.0f} s; nodes started: {started}")


def test_no_address_starts_a_ray_of_its_own_whatever_ray_current_cluster_says():
    """A head that died without `ray stop` leaves ray_current_cluster naming a dead GCS, which
    plain ray.init() would join (and hang). In a Ray temp dir of its own (RAY_TMPDIR), never
    the /tmp/ray of other Ray processes on this machine; short, for the raylet's socket paths."""
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    dead = f"127.0.0.1:{free_port()}"
    os.makedirs(os.path.join(temp, "ray"))
    Path(temp, "ray", "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("from segdist.cluster import connect_ray; connect_ray(None); import ray; "
            "print('joined', ray.get_runtime_context().gcs_address)")
    try:
        result = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_TMPDIR": temp},
                                capture_output=True, text=True, timeout=300)
    finally:
        kill_family(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    joined = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("joined ")]
    assert len(joined) == 1 and joined[0].rpartition(":")[2] != dead.rpartition(":")[2]
