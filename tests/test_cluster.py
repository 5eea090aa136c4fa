"""segdist.cluster without a Ray cluster: the fit check over alive and startable node types,
finding the autoscaler's node types, and connecting (bad, dead, silent or stale addresses are
one line within seconds; no address always means a new local Ray)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segdist import cluster
from segdist.cluster import (
    NodeType,
    autoscaler_config_path,
    check_resources_fit,
    node_types_from_config,
    startable_node_types,
    token_sent,
    trial_fit_problem,
)
from segdist.config import parse_study
from segdist.errors import SegdistError
from tests.conftest import free_port

HEAD = NodeType("head", {"CPU": 1, "GPU": 0}, 1)
WORKER = NodeType("worker", {"CPU": 2}, 2, startable=True)
GPU = NodeType("gpu", {"CPU": 48, "GPU": 4}, 2, startable=True)

CONFIG = {
    "max_workers": 3,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 8}, "node_config": {}},
        "gpu": {"resources": {"CPU": 48, "GPU": 4}, "min_workers": 0, "max_workers": 2},
        "spot": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 8},  # capped by the top-level 3
        "cpu": {"resources": {"CPU": 16}},  # no max_workers: the top-level 3
        "unknown": {"max_workers": 4},  # no resources: the autoscaler cannot plan on it either
        "off": {"resources": {"CPU": 4}, "max_workers": 0},
    },
}


# ---------------------------------------------------------------- the autoscaler's node types


def test_node_types_from_config_caps_each_type_by_the_cluster_max():
    kinds = {kind.name: kind for kind in node_types_from_config(CONFIG)}
    assert set(kinds) == {"gpu", "spot", "cpu"}  # head 0 by default, unknown and off left out
    assert (kinds["gpu"].count, kinds["spot"].count, kinds["cpu"].count) == (2, 3, 3)
    assert kinds["gpu"].resources == {"CPU": 48.0, "GPU": 4.0} and kinds["gpu"].startable
    assert node_types_from_config({}) == []


def fake_process(proc, pid: int, *args: str, cwd=None):
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes("\0".join(args).encode() + b"\0")
    if cwd:
        (entry / "cwd").symlink_to(cwd)


MONITOR = "/venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py"


def test_the_config_is_found_on_the_command_line_of_this_clusters_monitor(tmp_path):
    proc = tmp_path / "proc"
    fake_process(proc, 10, "python", "-u", MONITOR, "--gcs-address=10.0.0.5:7000", "--autoscaling-config=/a.yaml")
    fake_process(proc, 11, "python", "-u", "/venv/ray/_private/log_monitor.py", "--gcs-address=10.0.0.5:6379",
                 "--autoscaling-config=/not-a-monitor.yaml")
    fake_process(proc, 12, "python", "-u", MONITOR.replace("_private", "v2"), "--gcs-address=10.0.0.5:6379",
                 "--logs-dir=/tmp/x", "--autoscaling-config=~/ray_bootstrap_config.yaml")
    assert autoscaler_config_path(6379, proc) == (
        Path(os.path.expanduser("~/ray_bootstrap_config.yaml")))  # the v2 monitor, ~ expanded
    assert autoscaler_config_path(7000, proc) == Path("/a.yaml")  # the v1 monitor
    assert autoscaler_config_path(7001, proc) is None


def test_a_relative_config_path_is_read_from_the_monitors_working_directory(tmp_path):
    proc, home = tmp_path / "proc", tmp_path / "home"
    home.mkdir()
    (home / "cluster.yaml").write_text("max_workers: 2\navailable_node_types:\n  w: {resources: {CPU: 2}}\n")
    fake_process(proc, 10, "python", MONITOR, "--gcs-address=127.0.0.1:6379",
                 "--autoscaling-config=cluster.yaml", cwd=home)
    assert startable_node_types(6379, proc) == [NodeType("w", {"CPU": 2.0}, 2, startable=True)]


def test_no_monitor_or_an_unreadable_config_means_no_startable_types(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    assert startable_node_types(6379, proc) == []
    fake_process(proc, 10, "python", MONITOR, "--gcs-address=127.0.0.1:6379",  # the readonly autoscaler
                 "--logs-dir=/tmp/x")
    assert startable_node_types(6379, proc) == []
    fake_process(proc, 11, "python", MONITOR, "--gcs-address=127.0.0.1:6380",
                 f"--autoscaling-config={tmp_path / 'missing.yaml'}")
    assert startable_node_types(6380, proc) == []


# ---------------------------------------------------------------- the fit check


def test_a_trial_that_needs_a_node_the_autoscaler_can_start_fits():
    assert trial_fit_problem(2, {"CPU": 1, "GPU": 0}, [HEAD]) is not None  # the head alone: no
    assert trial_fit_problem(2, {"CPU": 1, "GPU": 0}, [HEAD, WORKER]) is None
    assert trial_fit_problem(2, {"CPU": 2}, [HEAD, WORKER]) is None  # one worker per started node
    assert trial_fit_problem(5, {"CPU": 1}, [HEAD, WORKER]) is None  # 1 + 2 x 2
    assert trial_fit_problem(2, {"CPU": 12, "GPU": 1}, [HEAD, WORKER, GPU]) is None  # 4 per gpu node
    assert trial_fit_problem(3, {"CPU": 0, "GPU": 0}, [HEAD]) is None  # asks for nothing: any node


def test_a_worker_no_node_type_can_hold_names_the_largest_type():
    problem = trial_fit_problem(2, {"CPU": 4, "GPU": 0}, [HEAD, WORKER])
    assert problem == "4 CPUs per worker but the largest node is type 'worker' (CPU 2; the autoscaler can start 2)"
    problem = trial_fit_problem(1, {"CPU": 1, "GPU": 8}, [HEAD, WORKER, GPU])
    assert problem.startswith("1 CPU + 8 GPUs per worker but the largest node is type 'gpu' (CPU 48, GPU 4;")


def test_too_many_workers_for_every_node_together_is_refused_with_the_inventory():
    problem = trial_fit_problem(6, {"CPU": 1}, [HEAD, WORKER])
    assert problem == ("6 CPUs per trial (6 workers x 1 CPU) but the cluster holds at most 5 such workers: "
                       "the head (CPU 1; up now); type 'worker' (CPU 2; the autoscaler can start 2)")


def test_without_an_autoscaler_only_alive_nodes_count_and_the_line_says_so():
    problem = trial_fit_problem(2, {"CPU": 1}, [HEAD])
    assert problem.endswith("(alive nodes only: no autoscaler config found here)")
    assert "the head (CPU 1; up now)" in problem


def test_check_resources_fit_checks_each_configuration_with_its_own_workers():
    study = parse_study({"resources": {"cpus_per_worker": 1, "gpus_per_worker": 0},
                         "search": {"model.variant": {"grid": ["naked", "naked.4gpu"]}}}, "s.yaml")
    check_resources_fit(study, [HEAD, WORKER])  # naked.4gpu: 4 workers of 1 CPU fit 1 + 2 x 2
    with pytest.raises(SegdistError) as err:
        check_resources_fit(study, [HEAD, NodeType("worker", {"CPU": 2}, 1, startable=True)])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("s.yaml: resources of naked.4gpu (4 workers) do not fit the cluster: 4 CPUs per trial")


def test_startable_types_less_the_nodes_already_started_are_what_the_cluster_can_add(monkeypatch):
    import ray

    up = [{"Alive": True, "Resources": {"CPU": 1.0, "node:__internal_head__": 1.0}},
          {"Alive": True, "Resources": {"CPU": 2.0}},  # a 'worker' the autoscaler started
          {"Alive": False, "Resources": {"CPU": 2.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: up)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "10.0.0.5:6379"}))
    monkeypatch.setattr(cluster, "startable_node_types", lambda port: [WORKER] if port == 6379 else [])
    assert cluster.cluster_node_types() == [
        NodeType("head", {"CPU": 1.0, "GPU": 0}, 1), NodeType("alive", {"CPU": 2.0, "GPU": 0}, 1),
        NodeType("worker", {"CPU": 2}, 1, startable=True)]


# ---------------------------------------------------------------- connecting


@pytest.fixture
def no_ray_init(monkeypatch):
    """ray.init recorded, not run."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.fixture
def stale_ray_tmpdir(tmp_path, monkeypatch):
    """A Ray temp dir (RAY_TMPDIR: never the real /tmp/ray) whose ray_current_cluster names a
    dead GCS, as a head that died without `ray stop` leaves it."""
    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return dead


def test_no_address_starts_a_new_local_ray_whatever_ray_current_cluster_says(stale_ray_tmpdir, no_ray_init):
    cluster.connect_ray(None)
    assert [call["address"] for call in no_ray_init] == ["local"]


def test_ray_address_is_the_default_and_overrides_auto(monkeypatch, no_ray_init):
    probed = []
    monkeypatch.setattr(cluster, "probe_cluster", probed.append)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    cluster.connect_ray(None)
    cluster.connect_ray("auto")  # as ray.init does: RAY_ADDRESS wins over 'auto'
    cluster.connect_ray("10.0.0.6:6379")
    assert probed == ["10.0.0.5:6379", "10.0.0.5:6379", "10.0.0.6:6379"]
    assert [call["address"] for call in no_ray_init] == probed


def one_line_error(address: str) -> tuple[str, float]:
    start = time.time()
    with pytest.raises(SegdistError) as err:
        cluster.connect_ray(address)
    assert "\n" not in str(err.value)
    return str(err.value), time.time() - start


def test_a_dead_cluster_is_one_line_within_seconds(monkeypatch, no_ray_init):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"
    message, seconds = one_line_error(address)
    assert message.startswith(f"Ray cluster at {address} is unreachable (connection refused)")
    assert seconds < 5 and no_ray_init == []


def test_auto_naming_a_dead_cluster_says_which_file_named_it(stale_ray_tmpdir, no_ray_init, monkeypatch):
    import ray._private.services

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # else 'auto' turns token mode on in this process
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", frozenset)  # no other Ray here
    message, seconds = one_line_error("auto")
    assert "is unreachable (connection refused)" in message and stale_ray_tmpdir.split(":")[1] in message
    assert os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster") in message
    assert seconds < 5 and no_ray_init == []


@pytest.mark.parametrize("address", ["nonsense", "head:port"])
def test_a_malformed_address_is_one_line(address, monkeypatch, no_ray_init):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    message, _ = one_line_error(address)
    assert message == f"Ray address {address!r} is not HOST:PORT, 'auto' or ray://HOST:PORT"


def test_a_port_that_is_no_gcs_is_one_line_instead_of_minutes(tmp_path):
    """A listening socket that never answers (the dashboard port given by mistake behaves so):
    GcsClient alone would wait 40 s, ray.init minutes. In a child process, so that the
    abandoned probe thread stays out of this one."""
    with socket.socket() as server:
        server.bind(("", 0))  # every interface: Ray turns 127.0.0.1 into this machine's address
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        code = ("import sys; from segdist import cluster; cluster.GCS_ANSWER_S = 2\n"
                "try: cluster.connect_ray(sys.argv[1])\nexcept cluster.SegdistError as e: print(e); sys.exit(2)")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        start = time.time()
        result = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=env,
                                timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.strip() == (f"Ray cluster at {address}: no answer from a Ray GCS within 2 s (is that the "
                                     "GCS port, 6379 by default, not the dashboard's 8265?)")
    assert time.time() - start < 60


def test_the_token_line_says_what_was_sent(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token_sent() == "it sent no token: RAY_AUTH_MODE is not 'token'"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert token_sent() == "it has no token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x")
    assert token_sent() == "the token in ~/.ray/auth_token is not the cluster's"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/t")
    assert token_sent() == "the token in RAY_AUTH_TOKEN_PATH (/t) is not the cluster's"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert token_sent() == "the token in RAY_AUTH_TOKEN is not the cluster's"


def test_the_cli_refuses_a_dead_address_before_any_training(tmp_path, tiny_shards):
    from tests.conftest import run_cli, write_study

    space = write_study(tmp_path / "s.yaml", *tiny_shards)
    address = f"127.0.0.1:{free_port()}"
    result = run_cli(["segdist.tune", "--space", str(space), "--address", address], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"segdist: error: Ray cluster at {address} is unreachable (connection refused): is it running? "
        "(--address, RAY_ADDRESS)")
    assert "Traceback" not in result.stderr
