"""A study's driver (`python -m segdist.tune`) run as a user runs it, for the fault and
resume tests: started in its own process group (so a test can SIGKILL it together with the
local Ray it started), its output in a file, and what it left in MLflow."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient


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


def kill_driver(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the driver's process group and every process it started (the local Ray's
    daemons and workers, not all of them in its group), by PID, and wait until they are gone:
    a Ray Train worker that outlived its driver by a second could still write a checkpoint
    after the test looked at the storage."""
    tree = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=timeout)
    deadline = time.time() + timeout
    while any(_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """The processes that descend from `pid` (children, their children, ...), from /proc."""
    from tests.conftest import ancestors

    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and pid in ancestors(int(e.name))]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed and waiting for its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def driver_output(process: subprocess.Popen) -> str:
    return process.log.read_text(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int | None, str]:
    """Wait for the driver; past `timeout`, kill its process group. Returns (exit status, output)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    return process.returncode, driver_output(process)


def trial_runs(client: MlflowClient, experiment: str = "tiny"):
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
