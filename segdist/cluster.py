"""The Ray cluster a study runs on: connecting to it (or starting a local one) and checking,
before any trial starts, that every configuration's resources fit it, counting the nodes its
autoscaler can start as well as those alive now."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
from pathlib import Path

import yaml

from segdist.config import StudyConfig, expand_configs
from segdist.errors import SegdistError

TCP_TIMEOUT_S = 5.0  # a GCS host that does not take a TCP connection within this is unreachable
GCS_ANSWER_S = 10.0  # a port that takes it but does not answer as a Ray GCS within this is not one
MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")  # the v1 and v2 autoscalers
TOKEN_HELP = ("set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, in a file named by "
              "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")


# ---------------------------------------------------------------- connecting


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` (HOST:PORT, 'auto' or ray://HOST:PORT; None: RAY_ADDRESS,
    which Ray also lets override 'auto'), or, with neither, start a new local Ray whatever
    /tmp/ray/ray_current_cluster says (a head that died without `ray stop` leaves it naming a
    dead GCS, which plain ray.init() would try to join for minutes). SegdistError, one line
    within seconds, when the cluster is unreachable, is not a Ray GCS or refuses this driver."""
    import ray

    if os.environ.get("RAY_ADDRESS") and address in (None, "auto"):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        start_local_ray(log_to_driver=True)
        return
    probe_cluster(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as err:
        raise SegdistError(f"Ray cluster at {address}: {first_line(err)}") from None


def start_local_ray(**init_args) -> str:
    """Start a new local Ray (ray.init(address="local", **init_args)) with its dashboard on a
    free 127.0.0.1 port; returns the dashboard's URL. The dashboard serves the State API that
    Ray Train's placement-group cleaner needs: without it, a trial stopped early (ASHA) leaks
    its CPUs for good. The cleaner looks for it by itself ('auto'), which fails while another
    Ray runs on this machine ("Found multiple active Ray instances"), so every process of this
    Ray is told where it is (RAY_API_SERVER_ADDRESS in the job's runtime env)."""
    import ray

    dashboard = f"http://127.0.0.1:{free_port()}"
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=int(dashboard.rsplit(":", 1)[1]),
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": dashboard}}, **init_args)
    return dashboard


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_logs_dir() -> str:
    """Where this machine's Ray node keeps its logs (workers' output, Ray Train's per-report
    and checkpoint lines): the session's logs folder when this driver runs on a Ray node,
    else Ray's default place on the cluster's nodes. After connect_ray."""
    import ray._private.worker  # Ray has no public call for a node's logs folder

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except AttributeError:  # a driver off the cluster (Ray Client) has no node of its own
        return "/tmp/ray/session_latest/logs on the cluster's nodes"


def probe_cluster(address: str) -> None:
    """Fail fast where ray.init would hang or retry for minutes: `address` (as connect_ray takes
    it) must name a host that takes a TCP connection within TCP_TIMEOUT_S and, unless it is a
    ray:// (Ray Client) address, a Ray GCS that answers within GCS_ANSWER_S and accepts this
    driver's token. SegdistError naming the cluster otherwise."""
    if "://" in address:  # Ray Client: its server is no GCS, a TCP probe is all we can do
        host, _, port = address.split("://", 1)[1].rpartition(":")
        tcp_probe(host.strip("[]"), port, address)
        return
    if address == "auto":  # ray.init turns token mode on for 'auto' when a token is at hand; so do we
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    gcs, label = resolve_gcs(address)
    host, _, port = gcs.rpartition(":")
    tcp_probe(host.strip("[]"), port, label)
    gcs_probe(gcs, label)


def resolve_gcs(address: str) -> tuple[str, str]:
    """(HOST:PORT of the GCS that `address` names, how to name it in an error). 'auto' is what
    ray.init would join: the one GCS process running on this machine, else the ray_current_cluster
    file of Ray's temp dir. SegdistError for a malformed address or an 'auto' that finds nothing."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray._private.utils import read_ray_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except ConnectionError:
        raise SegdistError("Ray address 'auto': no Ray cluster on this machine (no ray_current_cluster file, no "
                           "GCS process); start one (`ray start --head`) or give HOST:PORT") from None
    except ValueError:
        gcs = None
    if not gcs or not gcs.rpartition(":")[2].isdigit():
        raise SegdistError(f"Ray address {address!r} is not HOST:PORT, 'auto' or ray://HOST:PORT")
    if address != "auto":
        return gcs, address
    from ray._common.utils import get_ray_address_file

    named = read_ray_address()
    in_file = named and canonicalize_bootstrap_address(named) == gcs
    source = get_ray_address_file(None) if in_file else "this machine's processes"
    return gcs, f"{gcs} (found by 'auto' in {source})"


def tcp_probe(host: str, port: str, label: str) -> None:
    """SegdistError unless HOST:PORT takes a TCP connection within TCP_TIMEOUT_S."""
    try:
        with socket.create_connection((host, int(port)), timeout=TCP_TIMEOUT_S):
            return
    except ValueError:
        raise SegdistError(f"Ray address {label!r} is not HOST:PORT, 'auto' or ray://HOST:PORT") from None
    except OSError as err:
        reason = f"no answer within {TCP_TIMEOUT_S:g} s" if isinstance(err, TimeoutError) else (
            err.strerror or str(err)).lower()
        raise SegdistError(f"Ray cluster at {label} is unreachable ({reason}): is it running? (--address, "
                           "RAY_ADDRESS)") from None


def gcs_probe(gcs: str, label: str) -> None:
    """Ask the GCS at HOST:PORT for its cluster id, as ray.init does first, in a thread: a port
    that is no GCS would hold GcsClient for 40 s and ray.init for minutes. SegdistError when
    it does not answer within GCS_ANSWER_S, refuses this driver's token, or fails otherwise."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    outcome: list[Exception | None] = []

    def ask() -> None:
        try:
            GcsClient(address=gcs)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - reported below, whatever Ray raised
            outcome.append(err)

    thread = threading.Thread(target=ask, name="segdist-gcs-probe", daemon=True)
    thread.start()
    thread.join(GCS_ANSWER_S)
    if not outcome:
        raise SegdistError(f"Ray cluster at {label}: no answer from a Ray GCS within {GCS_ANSWER_S:g} s (is "
                           "that the GCS port, 6379 by default, not the dashboard's 8265?)")
    if isinstance(outcome[0], AuthenticationError):
        raise SegdistError(f"Ray cluster at {label} refused this driver ({token_sent()}); {TOKEN_HELP}")
    if outcome[0] is not None:
        raise SegdistError(f"Ray cluster at {label}: {first_line(outcome[0])}")


def token_sent() -> str:
    """What token this driver sent, as Ray's token loader picks it (RAY_AUTH_MODE must be
    'token' for any to be sent; then RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "it sent no token: RAY_AUTH_MODE is not 'token'"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the token in RAY_AUTH_TOKEN is not the cluster's"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the token in RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']}) is not the cluster's"
    if (Path.home() / ".ray" / "auth_token").is_file():
        return "the token in ~/.ray/auth_token is not the cluster's"
    return "it has no token"


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (Ray's errors run to tracebacks), else its type's name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------- nodes a trial can use


@dataclasses.dataclass(frozen=True)
class NodeType:
    """Nodes of one kind that a trial's workers can be placed on."""

    name: str  # the autoscaler's node type ('gpu'), or 'head' / 'alive' for nodes up now
    resources: dict[str, float]  # one node's: {'CPU': 48, 'GPU': 4, ...}
    count: int  # how many: up now, or (startable) the most the autoscaler may still start
    startable: bool = False  # started on demand by the autoscaler


def cluster_node_types() -> list[NodeType]:
    """The nodes alive now and those the autoscaler can still start (each startable type's
    count less its alive nodes: a non-head node with the type's CPUs and GPUs counts as one)."""
    import ray

    alive = alive_node_types()
    port = int(ray.get_runtime_context().gcs_address.rpartition(":")[2])
    startable = []
    for kind in startable_node_types(port):
        started = sum(n.count for n in alive if n.name == "alive" and same_shape(n.resources, kind.resources))
        if kind.count > started:
            startable.append(dataclasses.replace(kind, count=kind.count - started))
    return alive + startable


def alive_node_types() -> list[NodeType]:
    """Alive nodes grouped by CPUs and GPUs: the head as 'head', the others as 'alive'."""
    import ray

    groups: dict[tuple[str, float, float], int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = node["Resources"]
            key = ("head" if "node:__internal_head__" in res else "alive", res.get("CPU", 0), res.get("GPU", 0))
            groups[key] = groups.get(key, 0) + 1
    return [NodeType(name, {"CPU": cpu, "GPU": gpu}, count) for (name, cpu, gpu), count in groups.items()]


def same_shape(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two nodes' resources have the same CPUs and GPUs."""
    return all(float(a.get(key, 0)) == float(b.get(key, 0)) for key in ("CPU", "GPU"))


def startable_node_types(gcs_port: int, proc: Path = Path("/proc")) -> list[NodeType]:
    """The node types the autoscaler of the cluster whose GCS listens on `gcs_port` can start,
    read from its config file; [] when there is none to read (no autoscaler, or one that does
    not run on this machine: the driver of `ray job submit` runs on the head, a driver
    elsewhere sees only the alive nodes)."""
    path = autoscaler_config_path(gcs_port, proc)
    try:
        config = yaml.safe_load(path.read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return []
    return node_types_from_config(config) if isinstance(config, dict) else []


def autoscaler_config_path(gcs_port: int, proc: Path = Path("/proc")) -> Path | None:
    """The --autoscaling-config file of the autoscaler monitor (v1 or v2) of the cluster whose
    GCS listens on `gcs_port`, found among this machine's processes (on a `ray up` head it is
    ~/ray_bootstrap_config.yaml); None when no such monitor runs here."""
    for entry in proc.iterdir():
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(arg.endswith(MONITORS) for arg in args):
            continue
        flags = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if flags.get("gcs-address", "").rpartition(":")[2] == str(gcs_port) and flags.get("autoscaling-config"):
            path = Path(os.path.expanduser(flags["autoscaling-config"]))
            return path if path.is_absolute() else entry / "cwd" / path
    return None


def node_types_from_config(config: dict) -> list[NodeType]:
    """The startable types of an autoscaler config (a cluster launcher YAML, or the bootstrap
    config `ray up` writes): available_node_types with their `resources` and max_workers, each
    capped by the top-level max_workers (a type without max_workers gets it, the head type 0).
    Types with no known resources, or none to start, are left out."""
    cap = config.get("max_workers")
    kinds = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        default = 0 if name == config.get("head_node_type") else cap or 0
        count = int(spec.get("max_workers", default))
        count = min(count, int(cap)) if cap is not None else count
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items() if isinstance(v, int | float)}
        if count > 0 and resources:
            kinds.append(NodeType(name, resources, count, startable=True))
    return kinds


# ---------------------------------------------------------------- the fit check


def check_resources_fit(study: StudyConfig, nodes: list[NodeType] | None = None) -> None:
    """A trial that cannot be placed would wait forever: refuse it with one line instead. Each
    configuration is checked with its own resources (a 4gpu variant asks for 4 workers) against
    `nodes` (default: the connected cluster's, alive and startable): one node must hold a
    worker's CPUs and GPUs, and all of them together the trial's workers."""
    nodes = cluster_node_types() if nodes is None else nodes
    for config in expand_configs(study):
        res = config.recipe.resources
        problem = trial_fit_problem(res.workers, {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}, nodes)
        if problem:
            raise SegdistError(f"{study.path}: resources of {config.recipe.model.variant} ({res.workers} workers) "
                               f"do not fit the cluster: {problem}")


def trial_fit_problem(workers: int, need: dict[str, float], nodes: list[NodeType]) -> str | None:
    """Why `workers` workers, each needing `need` ({'CPU': 2, 'GPU': 1}) on one node, cannot all
    be placed on `nodes`, or None when they can."""
    need = {key: value for key, value in need.items() if value > 0}
    capacity = sum(kind.count * per_node(need, kind.resources) for kind in nodes)
    if capacity >= workers:
        return None
    alive_only = "" if any(kind.startable for kind in nodes) else " (alive nodes only: no autoscaler config found here)"
    if not any(per_node(need, kind.resources) for kind in nodes):
        main = "GPU" if "GPU" in need else "CPU"
        largest = max(nodes, key=lambda k: (k.resources.get(main, 0), k.resources.get("CPU", 0)), default=None)
        return f"{amounts(need)} per worker but the largest node is {describe(largest)}{alive_only}"
    total = {key: value * workers for key, value in need.items()}
    return (f"{amounts(total)} per trial ({workers} workers x {amounts(need)}) but the cluster holds at most "
            f"{capacity} such workers: " + "; ".join(describe(kind) for kind in nodes) + alive_only)


def per_node(need: dict[str, float], resources: dict[str, float]) -> int:
    """How many workers needing `need` one node with `resources` holds."""
    if not need:
        return 10**9
    return min(math.floor(float(resources.get(key, 0)) / value + 1e-9) for key, value in need.items())


def amounts(need: dict[str, float]) -> str:
    """{'CPU': 2, 'GPU': 1} -> '2 CPUs + 1 GPU'."""
    return " + ".join(f"{value:g} {key}{'' if value == 1 else 's'}" for key, value in need.items()) or "nothing"


def describe(kind: NodeType | None) -> str:
    """A node type for an error line: its CPUs and GPUs, and whether it is up or started on demand."""
    if kind is None:
        return "none (the cluster has no node)"
    has = ", ".join(f"{key} {kind.resources.get(key, 0):g}" for key in ("CPU", "GPU")
                    if key == "CPU" or kind.resources.get(key))
    if kind.startable:
        return f"type {kind.name!r} ({has}; the autoscaler can start {kind.count})"
    who = "the head" if kind.name == "head" else f"{kind.count} other node{'' if kind.count == 1 else 's'}"
    return f"{who} ({has}; up now)"
