"""The Ray cluster launcher files in cluster/, checked offline.

Schema: the same steps `ray up` takes before it talks to a provider — `prepare_config` (merge
with the provider's defaults.yaml, the on-prem node type) and `validate_config` (Ray's
ray-schema.json plus its cross-field checks). The AWS bootstrap (boto3, credentials, AMI and
subnet look-ups) is never called, and the network is blocked while validating to prove it.
Then the security properties: token auth on every `ray start`, the dashboard and MLflow on
loopback, only SSH open to the outside, no secret in any file.
"""

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = {"local": CLUSTER / "local.yaml", "aws": CLUSTER / "aws-gpu.yaml"}
START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
PLACEHOLDER = re.compile(r"REPLACE_[A-Z0-9_]+")


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (AWS API, metadata service) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config validation tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ray_validate(config: dict) -> dict:
    """What `ray up` does before any provider call; returns the config it would launch."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(params=sorted(CONFIGS))
def prepared(request, no_network):
    return request.param, ray_validate(load(request.param))


def strings(value):
    """Every string value in a parsed YAML document (comments are not values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --- Ray's own schema ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_rays_cluster_schema(name, no_network):
    config = load(name)
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == {"local": "local", "aws": "aws"}[name]
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_local_config_passes_ray_ups_whole_bootstrap(no_network, monkeypatch, tmp_path):
    """For the on-prem provider the provider steps are offline too, so run all of them."""
    from ray.autoscaler._private.commands import _bootstrap_config

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    config = _bootstrap_config(load("local"), no_config_cache=True)
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(load("local")["provider"]["worker_ips"])


def run_instances_errors(node_config: dict) -> str:
    """botocore's offline check of the EC2 call Ray makes (create_instances(**node_config,
    MinCount, MaxCount, ...)) against the EC2 API model shipped with botocore; no credentials."""
    botocore_session = pytest.importorskip("botocore.session", reason="boto3 (botocore) not installed")
    from botocore.validate import ParamValidator

    model = botocore_session.Session().get_service_model("ec2").operation_model("RunInstances")
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, model.input_shape)
    return report.generate_report()


def test_aws_node_configs_match_the_ec2_api(no_network):
    for name, node_type in load("aws")["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name


def test_ec2_api_check_catches_a_misspelt_field(no_network):
    node_config = copy.deepcopy(load("aws")["available_node_types"]["gpu_spot"]["node_config"])
    node_config["InstanceMarketOption"] = node_config.pop("InstanceMarketOptions")
    assert "InstanceMarketOption" in run_instances_errors(node_config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda c: c.update(head_start_ray_comands=c.pop("head_start_ray_commands")), "head_start_ray_comands"),
        (lambda c: c.update(setup_command=c.pop("setup_commands")), "setup_command"),
        (lambda c: c.update(idle_timeout_minutes="ten"), "'ten' is not of type 'number'"),
        (lambda c: c["auth"].update(ssh_usr="ubuntu"), "ssh_usr"),
        (lambda c: c.update(worker_start_ray_commands="ray start"), "is not of type 'array'"),
    ],
    ids=["misspelt-top-level-key", "misspelt-setup-key", "wrong-type", "misspelt-auth-key", "commands-not-a-list"],
)
def test_broken_config_is_rejected_with_a_message_naming_the_problem(name, breakage, expected, no_network):
    config = load(name)
    breakage(config)
    with pytest.raises(jsonschema.ValidationError) as error:
        ray_validate(config)
    assert expected in error.value.message


def test_broken_node_type_is_rejected(no_network):
    config = load("aws")
    config["available_node_types"]["gpu_spot"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError) as error:
        ray_validate(config)
    assert "min_worker" in error.value.message


def test_broken_yaml_syntax_is_a_parse_error_with_a_line_number():
    text = CONFIGS["local"].read_text().replace("worker_ips: [", "worker_ips: [[", 1)
    with pytest.raises(yaml.YAMLError) as error:
        yaml.safe_load(text)
    assert "line" in str(error.value)


def test_local_config_must_not_declare_node_types(no_network):
    """The on-prem provider builds its single node type itself; Ray aborts on a hand-written one."""
    config = load("local")
    config["available_node_types"] = {"x": {"node_config": {}, "resources": {}}}
    with pytest.raises(Exception, match="available_node_types"):
        ray_validate(config)


def test_prepared_config_keeps_our_commands_not_the_provider_defaults(prepared):
    """prepare_config merges defaults.yaml top-level keys; AWS's default head start command
    binds the dashboard to 0.0.0.0, so every command list must be ours."""
    name, config = prepared
    raw = load(name)
    for key in ("setup_commands", *START_KEYS):
        assert key in raw, f"{name}: {key} missing, Ray's default would be used"
    assert config["head_start_ray_commands"] == raw["head_start_ray_commands"]


# --- security -------------------------------------------------------------------------------


def test_token_auth_on_every_ray_start(prepared):
    name, config = prepared
    for key in START_KEYS:
        starts = [cmd for cmd in config[key] if "ray start" in cmd]
        assert starts, f"{name}: no `ray start` in {key}"
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd.split("ray start")[0], f"{name}: {cmd!r}"
    # and for every later shell on the node (ray exec, the autoscaler's own commands)
    assert any("export RAY_AUTH_MODE=token" in cmd and ".bashrc" in cmd for cmd in config["setup_commands"])


def test_token_comes_from_a_file_mount_never_from_the_config(prepared):
    name, config = prepared
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any(cmd.strip() == "chmod 600 ~/.ray/auth_token" for cmd in config["setup_commands"])
    for text in strings(config):
        assert "RAY_AUTH_TOKEN=" not in text, f"{name}: {text!r}"


def test_dashboard_only_on_the_heads_loopback(prepared):
    name, config = prepared
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    assert "--dashboard-host=127.0.0.1" in head_start
    for text in strings(config):
        for host in re.findall(r"--dashboard-host[= ](\S+)", text):
            assert host == "127.0.0.1", f"{name}: {text!r}"


def test_nothing_binds_all_interfaces(prepared):
    name, config = prepared
    for text in strings(config):
        assert "0.0.0.0" not in text, f"{name}: {text!r}"
        assert not re.search(r"--host[= ](::|\[::\]|\*)", text), f"{name}: {text!r}"


def test_head_starts_mlflow_with_sqlite_and_shared_artifacts(prepared):
    name, config = prepared
    calls = [cmd for cmd in config["head_start_ray_commands"] if "cluster/setup_head.sh" in cmd]
    assert len(calls) == 1, f"{name}: the head must start MLflow exactly once"
    artifact_root = calls[0].split()[-1]
    assert artifact_root.startswith({"local": "/shared/", "aws": "s3://"}[name])
    assert not any("setup_head.sh" in cmd for cmd in config["worker_start_ray_commands"])
    assert "MLFLOW_HOST" not in calls[0], "the default (127.0.0.1) is the reviewed choice"
    script = (CLUSTER / "setup_head.sh").read_text()
    assert 'host=${MLFLOW_HOST:-127.0.0.1}' in script
    assert '--backend-store-uri "sqlite:///' in script
    assert '--artifacts-destination "$artifacts"' in script


def test_the_heads_ray_tells_a_job_where_mlflow_and_the_storage_are(prepared):
    """`ray job submit -- python -m segdist.tune` without flags: the job's driver inherits the
    head's Ray environment, which names the MLflow server setup_head.sh starts and the shared
    storage (segdist.tune.resolve_stores reads them)."""
    name, config = prepared
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start --head" in cmd]
    exported = head_start.split(";")[0]
    assert exported.startswith("export ") and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in exported
    storage = re.search(r"SEGDIST_STORAGE=(\S+)", exported).group(1)
    assert storage.startswith({"local": "/shared/", "aws": "s3://"}[name]) and "ray_results" in storage


def test_aws_security_group_opens_nothing_but_what_ray_adds_for_ssh():
    """ray up creates the group with SSH from anywhere plus all traffic from the group itself;
    any extra rule here would widen that, so none is allowed, and no node brings its own group
    (which would bypass the intra-cluster rule)."""
    config = load("aws")
    group = config["provider"]["security_group"]
    assert group["IpPermissions"] == []
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]


def test_aws_has_cpu_head_gpu_workers_and_a_spot_option():
    config = load("aws")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    workers = {key: value for key, value in types.items() if key != config["head_node_type"]}
    assert all(value["resources"].get("GPU", 0) > 0 for value in workers.values())
    spot = [value for value in workers.values()
            if value["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [value for value in workers.values() if "InstanceMarketOptions" not in value["node_config"]]
    assert len(spot) == 1 and spot[0]["min_workers"] == 0
    assert on_demand, "keep an on-demand GPU type next to the spot one"
    # workers write checkpoints to S3 themselves
    assert all("IamInstanceProfile" in value["node_config"] for value in workers.values())
    assert any("pip install" in cmd and "boto3" in cmd for cmd in config["head_setup_commands"])


def test_shared_storage_is_mounted_on_every_node():
    for name, mount_point in (("local", "/shared"), ("aws", "/efs")):
        config = load(name)
        mounts = [cmd for cmd in config["setup_commands"] if "cluster/mount_shared.sh" in cmd]
        assert len(mounts) == 1 and mounts[0].split()[-1] == mount_point, name


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key assignment": re.compile(r"aws_secret_access_key\s*[:=]\s*\S", re.IGNORECASE),
    "AWS session token assignment": re.compile(r"aws_session_token\s*[:=]\s*\S", re.IGNORECASE),
    "Ray token assignment": re.compile(r"""RAY_AUTH_TOKEN\s*[:=]\s*["']?[^\s$"']"""),
    "hex token (Ray's are 64 hex digits)": re.compile(r"\b[0-9a-f]{32,}\b", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password assignment": re.compile(r"password\s*[:=]\s*\S", re.IGNORECASE),
}


def find_secrets(text: str) -> list[str]:
    return [label for label, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_detector_catches_planted_secrets():
    planted = [
        "aws_access_key_id: AKIA" + "ABCDEFGHIJKLMNOP",
        "AWS_SECRET_ACCESS_KEY=" + "x" * 40,
        "export RAY_AUTH_TOKEN=" + "ab" * 32,
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
    ]
    for text in planted:
        assert find_secrets(text), text
    # reading the token from its file at run time is the allowed way
    assert find_secrets('export RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"') == []
    assert find_secrets("RAY_AUTH_TOKEN=$(ray get-auth-token)") == []


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.iterdir() if p.is_file()))
def test_no_secret_in_cluster_files(path):
    text = (CLUSTER / path).read_text()
    assert find_secrets(text) == [], f"cluster/{path}"


# --- placeholders, mounts, scripts ------------------------------------------------------------


def test_placeholders_are_obvious_and_documented():
    readme = (CLUSTER / "README.md").read_text()
    local = load("local")["provider"]
    assert PLACEHOLDER.fullmatch(local["head_ip"])
    assert local["worker_ips"] and all(PLACEHOLDER.fullmatch(ip) for ip in local["worker_ips"])
    for name, path in CONFIGS.items():
        found = set(PLACEHOLDER.findall(path.read_text()))
        assert found, name
        missing = sorted(token for token in found if token not in readme)
        assert not missing, f"{name}: placeholders not explained in cluster/README.md: {missing}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_file_mount_sources_exist_in_the_repository(name):
    for remote, local in load(name)["file_mounts"].items():
        if local.startswith("~"):
            continue  # the token, on the machine that runs `ray up`
        assert (ROOT / local).exists(), f"{name}: {remote} <- {local}"
        assert remote.startswith("~/segdist/")
    assert "./segdist" in load(name)["file_mounts"].values()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_commands_only_run_scripts_that_exist(name):
    config = load(name)
    for text in strings(config):
        for script in re.findall(r"~/segdist/(cluster/\S+\.sh)", text):
            assert (ROOT / script).is_file(), f"{name}: {script}"


@pytest.mark.parametrize("script", ["setup_head.sh", "mount_shared.sh"])
def test_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 30):
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(["bash", str(CLUSTER / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "*"])
def test_setup_head_refuses_to_bind_mlflow_to_all_interfaces(host, tmp_path):
    result = run_script("setup_head.sh", str(tmp_path / "artifacts"),
                        env={"MLFLOW_HOST": host, "MLFLOW_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert "refusing to bind MLflow to all interfaces" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("artifacts, message", [
    ("s3://REPLACE_BUCKET/segdist/mlflow-artifacts", "is a placeholder"),
    ("relative/artifacts", "must be an absolute shared path or an s3:// URI"),
])
def test_setup_head_rejects_bad_artifact_roots(artifacts, message, tmp_path):
    result = run_script("setup_head.sh", artifacts, env={"MLFLOW_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert message in result.stderr


def test_mount_shared_rejects_a_placeholder():
    result = run_script("mount_shared.sh", "REPLACE_EFS_ID.efs.us-west-2.amazonaws.com:/", "/efs")
    assert result.returncode == 2
    assert "is a placeholder" in result.stderr


def test_mount_shared_checks_an_existing_folder_and_warns_when_it_is_local(tmp_path):
    result = run_script("mount_shared.sh", "-", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "segdist").is_dir()
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fstype in ("ext2/ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlayfs"):
        assert f"is a local {fstype} file system" in result.stderr
    missing = run_script("mount_shared.sh", "-", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.integration
def test_setup_head_serves_mlflow_on_loopback_and_is_idempotent(tmp_path):
    """Runs the real head script (a real `mlflow server`), then again: the second run leaves it be."""
    from tests.conftest import free_port

    port = str(free_port())
    home = tmp_path / "home"
    env = {"MLFLOW_HOME": str(home), "MLFLOW_PORT": port, "MLFLOW_WORKERS": "1"}
    first = run_script("setup_head.sh", str(tmp_path / "artifacts"), env=env, timeout=180)
    pid = int((home / "server.pid").read_text())
    try:
        assert first.returncode == 0, first.stderr + (home / "server.log").read_text()[-2000:]
        assert f"MLflow serving at http://127.0.0.1:{port}" in first.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            assert answer.status == 200
        assert (home / "mlflow.db").exists() and (tmp_path / "artifacts").is_dir()
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode == 0:
            assert listening.stdout.strip() and "127.0.0.1:" + port in listening.stdout
        second = run_script("setup_head.sh", str(tmp_path / "artifacts"), env=env)
        assert second.returncode == 0 and "already serving" in second.stdout
        assert int((home / "server.pid").read_text()) == pid
    finally:
        os.killpg(pid, signal.SIGTERM)  # setsid made the server its own process group
