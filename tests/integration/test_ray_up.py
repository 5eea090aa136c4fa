"""`ray up cluster/local.yaml` for real, as a new user would run it, against an sshd on 127.0.0.1.

The test starts its own sshd (own config and host key, `-D`, a free loopback port; never the
system service) that admits one key, for a dedicated unprivileged user (NODE_USER, created
and removed here). A copy of cluster/local.yaml gets its placeholders filled (head 127.0.0.1,
no workers, that user), torch pinned as the file's comment says, /shared pointed at a
folder of this test, and free ports for the head's dashboard, dashboard agent and client
server (Ray's defaults, 8265, 52365 and 10001, are held by other sessions' local Rays on a
shared machine; see filled_config); then, from the repository root, `ray up -y`, the README's
`ray job submit --working-dir . -- python -m segdist.tune --space FILE` without flags (the runs
must land in the head's MLflow server, which setup_head.sh started) and again with
`--tracking-uri`, and `ray down -y`.

Why a separate unprivileged user: the YAML's start commands run `ray stop`, which signals every
Ray-looking process on the machine. A non-root user cannot signal another user's processes
(EPERM; checked here with a root-owned decoy `ray stop` does try to stop), so the runner's
and other sessions' Ray survive. `ray stop` and `ray start` also read and write the Ray temp
dir: the shared /tmp/ray is world-writable without the sticky bit, so the node user's
`ray stop` could delete another session's `ray_current_cluster` and its `ray start` could
replace it (a later `ray.init("auto")` would join this test's cluster). The node user's
~/.bashrc therefore sets RAY_TMPDIR to a folder in its home, which every launcher shell
(`bash --login -i`) and so every Ray process of the node reads; the test checks that
nothing of the node user's lands in /tmp/ray.

The launching side runs with HOME, RAY_TMPDIR and TMPDIR in the test's folder: the ssh key
(named by its absolute path: ssh expands `~` to the passwd home, not $HOME) and the Ray token
(`ray get-auth-token --generate`, ~/.ray/auth_token) are the test's, never root's real ones.
Ray 2.60's launcher has no ssh port setting (only `auth.ssh_proxy_command`), so the copy adds
a ProxyCommand that relays to the sshd's port.

Everything started here is ended by PID: the node user's processes (listed by uid), the
sshd and its session processes, the launcher's ssh control masters and relays.

Slow (a fresh virtual environment with torch, Ray and MLflow on the node: minutes), and
skipped where there is no /usr/sbin/sshd (Debian: `apt-get install openssh-server`), no
rsync, no root, or the YAML's fixed ports (GCS 6379, MLflow 5000) are taken.
"""

import getpass
import glob
import hashlib
import importlib
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port, wait_http, write_study
from tests.integration.test_study import child_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SSHD = "/usr/sbin/sshd"
NODE_USER = "segdist-node"
MARKER = ".segdist-test-user"  # in the home of a user this test created (a leftover may be removed)
FIXED_PORTS = {"the head's GCS": 6379, "the head's MLflow": 5000}  # the YAML's own ports
MLFLOW = "http://127.0.0.1:5000"
TORCH_PIN = "torch==2.13.0"  # what README.md and CI install
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

RELAY = '''"""ssh ProxyCommand: relay stdin/stdout to HOST:PORT."""
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def down():
    while data := sock.recv(65536):
        os.write(1, data)
    os._exit(0)
threading.Thread(target=down, daemon=True).start()
while data := os.read(0, 65536):
    sock.sendall(data)
sock.shutdown(socket.SHUT_WR)
threading.Event().wait()
'''


def psutil():
    """Ray ships psutil in ray/thirdparty_files and puts it on sys.path when imported."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def skip_unless_possible() -> None:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not installed (Debian: apt-get install openssh-server); `ray up` needs an sshd")
    for tool in ("ssh", "ssh-keygen", "rsync", "useradd", "userdel"):
        if not shutil.which(tool):
            pytest.skip(f"`{tool}` not found: `ray up` against a loopback sshd needs it")
    if os.geteuid() != 0:
        pytest.skip(f"needs root: it creates the unprivileged user {NODE_USER} and runs an sshd that logs in as it")
    for what, port in FIXED_PORTS.items():
        if port_taken(port):
            pytest.skip(f"port {port} ({what} in cluster/local.yaml) is in use on this machine")


def processes_of(uid: int) -> list:
    ps = psutil()
    found = []
    for proc in ps.process_iter():
        try:
            if proc.uids().real == uid:
                found.append(proc)
        except ps.Error:
            continue
    return found


def end_processes(procs: list) -> None:
    """SIGTERM, then SIGKILL what is left after 10 s; by PID, nothing else."""
    ps = psutil()
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except ps.Error:
            pass
    _, alive = ps.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except ps.Error:
            pass
    ps.wait_procs(alive, timeout=5)


def end_user_processes(uid: int) -> None:
    for _ in range(5):  # a dying raylet may still start a worker: sweep until none is left
        procs = processes_of(uid)
        if not procs:
            return
        end_processes(procs)
    assert not processes_of(uid), f"processes of uid {uid} survived SIGKILL"


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def create_node_user(stack: ExitStack) -> pwd.struct_passwd:
    """A fresh NODE_USER with a home (removed at the end); a leftover of an interrupted run of
    this test (its home holds MARKER) is removed first; anyone else's user means skip."""
    try:
        old = pwd.getpwnam(NODE_USER)
    except KeyError:
        old = None
    if old is not None:
        if not os.path.exists(os.path.join(old.pw_dir, MARKER)):
            pytest.skip(f"user {NODE_USER} exists and was not created by this test")
        if processes_of(old.pw_uid):
            pytest.skip(f"user {NODE_USER} has running processes (another run of this test?)")
        run("userdel", "--remove", NODE_USER)
    # '*' rather than useradd's locked '!': sshd without PAM refuses a locked account even for a key.
    result = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", NODE_USER],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot create user {NODE_USER}: {result.stderr.strip()}")
    user = pwd.getpwnam(NODE_USER)

    def remove() -> None:
        end_user_processes(user.pw_uid)
        subprocess.run(["userdel", "--remove", NODE_USER], capture_output=True)

    stack.callback(remove)
    Path(user.pw_dir, MARKER).touch()
    return user


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, item) for item in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)


def pip_find_links() -> str | None:
    """The runner's pip find-links (PIP_FIND_LINKS or pip's config) if it holds the pinned torch's
    CPU wheel, so the node installs that file and never downloads a CUDA build."""
    links = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    ).stdout.strip()
    for folder in links.split():
        if glob.glob(os.path.join(folder, TORCH_PIN.replace("==", "-") + "+cpu-*.whl")):
            return folder
    return None


def prepare_node_home(user: pwd.struct_passwd, public_key: str, find_links: str | None) -> Path:
    """authorized_keys, the node's own Ray temp dir (see the module docstring) and pip's
    find-links; returns the node's Ray temp dir."""
    home = Path(user.pw_dir)
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "authorized_keys").write_text(public_key)
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    ray_tmp = home / "rt"  # short: raylet socket paths must fit AF_UNIX's 107 bytes
    ray_tmp.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_text(f"export RAY_TMPDIR={ray_tmp}\n" + (bashrc.read_text() if bashrc.exists() else ""))
    if find_links:
        (home / ".config" / "pip").mkdir(parents=True)
        (home / ".config" / "pip" / "pip.conf").write_text(f"[global]\nfind-links = {find_links}\n")
    chown_tree(home, user)
    return ray_tmp


def start_sshd(stack: ExitStack, folder: Path, port: int, user: str):
    """A private sshd on 127.0.0.1:port admitting only `user` by key; ended with its sessions."""
    folder.mkdir()
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
    config = folder / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {folder / 'host_key'}", f"PidFile {folder / 'sshd.pid'}",
        f"AllowUsers {user}", "PermitRootLogin no", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes yes", "X11Forwarding no", "",
    ]))
    if not os.path.isdir("/run/sshd"):  # sshd's privilege-separation directory
        os.makedirs("/run/sshd", mode=0o755)
        stack.callback(shutil.rmtree, "/run/sshd", True)
    log = open(folder / "sshd.log", "w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)

    def stop() -> None:
        ps = psutil()
        try:
            end_processes(ps.Process(process.pid).children(recursive=True))
        except ps.Error:
            pass
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

    stack.callback(stop)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert process.poll() is None and time.time() < deadline, (folder / "sshd.log").read_text()
            time.sleep(0.2)


def launcher_env(folder: Path) -> dict:
    """The launching user's environment, with HOME and temp dirs in the test's folder."""
    home, tmp = folder / "home", folder / "tmp"
    (home / ".ssh").mkdir(parents=True)
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "SEGDIST_"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(tmp), TMPDIR=str(tmp), RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}")
    return env


def filled_config(folder: Path, cluster_name: str, key: str, proxy: str, shared: Path,
                  find_links: str | None, head_ports: dict[str, int]) -> Path:
    """A copy of cluster/local.yaml with its placeholders filled (what cluster/README.md asks).
    `head_ports` (free ones) go on the head's `ray start`: the YAML leaves Ray's defaults (dashboard
    8265, dashboard agent 52365, client server 10001), which other sessions' local Rays on a shared
    machine hold; without its agent's port the head takes no job ("No available agent")."""
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config["cluster_name"] = cluster_name  # unique: the launcher's ssh control socket is named after it
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    # The key: Ray hands `-i ~/...` to ssh unexpanded and ssh expands `~` to the passwd home, not
    # $HOME, so the launcher's key (in the test's HOME) is named by its absolute path.
    config["auth"].update(ssh_user=NODE_USER, ssh_private_key=key, ssh_proxy_command=proxy)
    pin = f"pip install {TORCH_PIN}" + ("" if find_links else " --index-url https://download.pytorch.org/whl/cpu")
    pinned = False
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        commands = []
        for command in config.get(key) or []:
            if command.strip() == "pip install torch":
                command, pinned = pin, True
            commands.append(command.replace("/shared", str(shared)))
        config[key] = commands
    assert pinned, "cluster/local.yaml has no `pip install torch` line to pin any more"
    heads = [i for i, command in enumerate(config["head_start_ray_commands"]) if "ray start --head" in command]
    assert len(heads) == 1, config["head_start_ray_commands"]
    config["head_start_ray_commands"][heads[0]] += "".join(f" --{flag}={port}" for flag, port in head_ports.items())
    text = yaml.safe_dump(config, sort_keys=False)
    assert "REPLACE_" not in text, text
    path = folder / "local.yaml"
    path.write_text(text)
    return path


def owner_of_listener(port: int) -> int | None:
    ps = psutil()
    for conn in ps.net_connections("tcp"):
        if conn.status == ps.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return ps.Process(conn.pid).uids().real
    return None


def start_decoy(stack: ExitStack, folder: Path):
    """A root process whose command line `ray stop` matches (log_monitor.py): the node user's
    `ray stop` must fail to end it."""
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(7200)", str(folder / "log_monitor.py")])

    def stop() -> None:
        decoy.kill()
        decoy.wait()

    stack.callback(stop)
    return decoy


def end_launcher_leftovers(cluster_name: str, folder: Path) -> None:
    """The launcher's ssh ControlMaster processes (ControlPersist), ProxyCommand relays and
    control-socket folder."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    control = hashlib.sha256(cluster_name.encode()).hexdigest()[:HASH_MAX_LENGTH]
    mine = []
    for proc in processes_of(os.getuid()):
        try:
            line = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - psutil.Error
            continue
        if (control in line and "ssh" in line) or str(folder / "relay.py") in line:
            mine.append(proc)
    end_processes(mine)
    user_dir = f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:HASH_MAX_LENGTH]}"
    shutil.rmtree(os.path.join(user_dir, control), ignore_errors=True)  # Ray's ControlPath folder
    try:
        os.rmdir(user_dir)  # only if no other cluster's folder is in it
    except OSError:
        pass


class RayUpCluster:
    """What the test brought up: the launcher's environment and files, the node user, the head."""

    def __init__(self, folder: Path, env: dict, config: Path, user: pwd.struct_passwd, shared: Path,
                 ray_tmp: Path, up: subprocess.CompletedProcess, up_s: float, decoy, dashboard_port: int):
        self.folder, self.env, self.config, self.user, self.shared = folder, env, config, user, shared
        self.ray_tmp, self.up, self.up_s, self.decoy = ray_tmp, up, up_s, decoy
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        assert owner_of_listener(dashboard_port) == user.pw_uid, f"{self.dashboard} is not the head's dashboard"

    def job(self, space: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
        """The README's submit, from the repository root; (result, wall seconds)."""
        start = time.monotonic()
        result = subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", ".", "--",
             "python", "-m", "segdist.tune", "--space", str(space), *flags],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=1500)
        return result, time.monotonic() - start

    def wait_for_job_agent(self) -> None:
        """The head's job agent comes up a little after `ray start` returns."""
        deadline = time.time() + 180
        while time.time() < deadline:
            probe = subprocess.run([RAY, "job", "submit", "--address", self.dashboard, "--", "true"],
                                   cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=180)
            if probe.returncode == 0:
                return
            if "No available agent" not in probe.stdout + probe.stderr:
                raise AssertionError(probe.stdout[-2000:] + probe.stderr[-2000:])
            time.sleep(3)
        raise AssertionError("the head's job agent did not come up within 180 s")


@pytest.fixture(scope="module")
def ray_up_cluster(tiny_shards):
    skip_unless_possible()
    with ExitStack() as stack:
        # Readable by the node user (pytest's own tmp folders are 0700 root).
        folder = Path(tempfile.mkdtemp(prefix="segdist-rayup-", dir="/tmp"))
        folder.chmod(0o755)
        stack.callback(shutil.rmtree, folder, True)
        user = create_node_user(stack)
        env = launcher_env(folder)
        key = Path(env["HOME"]) / ".ssh" / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        run(RAY, "get-auth-token", "--generate", env=env)
        find_links = pip_find_links()
        ray_tmp = prepare_node_home(user, (key.parent / "id_ed25519.pub").read_text(), find_links)

        shared = folder / "shared"  # what the YAML calls /shared (mount_shared.sh "-": already there)
        for split, source in zip(("train", "val"), tiny_shards, strict=True):
            shutil.copytree(source, shared / "shards" / split)
        chown_tree(shared, user)

        port = free_port()
        start_sshd(stack, folder / "sshd", port, NODE_USER)
        (folder / "relay.py").write_text(RELAY)
        cluster_name = f"segdist-test-{os.urandom(4).hex()}"
        stack.callback(end_launcher_leftovers, cluster_name, folder)
        head_ports = {flag: free_port() for flag in
                      ("dashboard-port", "dashboard-agent-listen-port", "ray-client-server-port")}
        config = filled_config(folder, cluster_name, str(key), f"{sys.executable} {folder / 'relay.py'} 127.0.0.1 {port}",
                               shared, find_links, head_ports)
        decoy = start_decoy(stack, folder)

        def down() -> None:
            result = subprocess.run([RAY, "down", "-y", str(config)], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=300)
            (folder / "ray-down.log").write_text(result.stdout + result.stderr)
            print(f"\n`ray down -y` exit {result.returncode}")

        stack.callback(down)  # runs before the node user's processes are swept and the user removed
        start = time.monotonic()
        with open(folder / "ray-up.log", "w") as log:
            up = subprocess.run([RAY, "up", "-y", str(config)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, timeout=2400)
        up_s = time.monotonic() - start
        up.stdout = (folder / "ray-up.log").read_text()
        print(f"\n`ray up -y` of {cluster_name}: {up_s:.0f} s, exit {up.returncode}")
        assert up.returncode == 0, up.stdout[-6000:]
        yield RayUpCluster(folder, env, config, user, shared, ray_tmp, up, up_s, decoy, head_ports["dashboard-port"])


def test_ray_up_brings_up_the_head_with_its_mlflow_server(ray_up_cluster):
    cluster = ray_up_cluster
    uid = cluster.user.pw_uid
    wait_http(MLFLOW + "/health", timeout_s=60)
    assert owner_of_listener(5000) == uid, "port 5000 is not the MLflow server setup_head.sh started on the head"
    assert Path(cluster.user.pw_dir, "mlflow", "mlflow.db").is_file()
    # torch pinned to the CPU build: no CUDA download on the node
    site = glob.glob(f"{cluster.user.pw_dir}/segdist-venv/lib/python3*/site-packages")
    assert len(site) == 1, site
    assert [Path(p).name for p in glob.glob(f"{site[0]}/torch-*.dist-info")] == ["torch-2.13.0+cpu.dist-info"]
    assert not glob.glob(f"{site[0]}/nvidia*"), "a CUDA build of torch (nvidia-* packages) was installed"


def test_the_node_users_ray_stop_leaves_other_users_ray_alone(ray_up_cluster):
    """The start commands' `ray stop` tried to stop the runner's decoy and could not; the node's
    Ray kept out of the shared /tmp/ray."""
    cluster = ray_up_cluster
    assert cluster.decoy.poll() is None, "the node user's `ray stop` ended a root process"
    log = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", cluster.up.stdout)  # without the terminal colours
    tried = [line for line in log.splitlines() if line.startswith("Could not terminate")
             and f"(pid={cluster.decoy.pid}," in line]
    assert tried, "the node user's `ray stop` did not try the decoy"  # it did try, and got EPERM
    assert list(cluster.ray_tmp.glob("ray/session_*")), "the node's Ray did not use its own RAY_TMPDIR"
    if os.path.isdir("/tmp/ray"):
        assert not [p for p in Path("/tmp/ray").iterdir() if p.lstat().st_uid == cluster.user.pw_uid]


def head_store_experiments(database: Path) -> list[str]:
    """The experiment names in the head's sqlite store (setup_head.sh's ~/mlflow/mlflow.db), read-only."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return [name for (name,) in db.execute("SELECT name FROM experiments")]


def experiment_runs(experiment: str) -> list:
    parents, children = child_runs(MlflowClient(MLFLOW), experiment)
    assert len(parents) == 1 and len(children) == 1, (parents, children)
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["segdist.status"] == "finished"
    assert "final_miou" in run.data.metrics
    return children


@pytest.mark.parametrize("experiment, flags", [
    ("rayup-env", ()),
    ("rayup-flag", ("--tracking-uri", MLFLOW)),
], ids=["no-flags", "tracking-uri"])
def test_readme_job_submit_records_in_the_heads_mlflow(ray_up_cluster, experiment, flags):
    """`ray job submit --working-dir . -- python -m segdist.tune --space FILE`: with no flag the
    driver takes MLflow and the storage from the head's Ray environment (the YAML's head start
    command), not the job's temporary working directory; with --tracking-uri the same."""
    cluster = ray_up_cluster
    space = write_study(cluster.shared / f"{experiment}.yaml", cluster.shared / "shards" / "train",
                        cluster.shared / "shards" / "val", name=experiment, seeds=[0])
    os.chown(space, cluster.user.pw_uid, cluster.user.pw_gid)
    cluster.wait_for_job_agent()
    job, seconds = cluster.job(space, *flags)
    print(f"\njob {experiment} ({' '.join(flags) or 'no flags'}): {seconds:.0f} s, exit {job.returncode}")
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    assert f"MLflow: {MLFLOW} (experiment {experiment!r}" in job.stdout
    assert owner_of_listener(5000) == cluster.user.pw_uid  # the head's server, not another on this machine
    experiment_runs(experiment)
    assert experiment in head_store_experiments(Path(cluster.user.pw_dir, "mlflow", "mlflow.db"))
    # checkpoints and Tune state on the shared storage the head's environment names
    assert (cluster.shared / "segdist" / "ray_results" / experiment).is_dir()
