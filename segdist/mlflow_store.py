"""The MLflow tracking store: where it is (URIs from the command line or the environment,
made absolute; a local store's path; a check that it can be used before any compute), how it
is opened (a client, an experiment found, restored or created), and how segdist names what
it writes there (tags, params and artifacts, keys MLflow accepts, secrets kept out).

Shared by the study's tracker (segdist.tracking), the Tune callback (segdist.mlflow_callback),
the report and the bench; it does not import Ray.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import LifecycleStage, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segdist.errors import SegdistError

DEFAULT_STORE = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_KEY_TAG = "segdist.trial_key"  # config_id + seed: finds a trial's run again on resume
STATUS_TAG = "segdist.status"  # finished | diverged | failed | stopped_early
STUDY_TAG = "segdist.study"
ROLE_TAG = "segdist.role"  # study | configuration | trial (a seed's run)
STUDY_RUN_TAG = "segdist.study_run"  # the study's run of a configuration or seed run (MLflow nests
#                                      seed runs under their configuration's run, that one under the study's)
KEY_NAMES_ARTIFACT = "mlflow_key_names.json"  # MLflow key -> the name it stands for, where they differ
CONFIGURATION_PARAM = "configuration"  # the readable label: MLflow's "Group by" aggregates seeds on it
# Environment variables whose values must never reach MLflow (tokens, keys, passwords).
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def warn(message: str) -> None:
    print(f"segdist: warning: {message}", file=sys.stderr)


def resolve_tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; a store given
    by a relative path is made absolute here, against the working directory, so every command
    and every Ray process (which has another working directory) uses the same store."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_store_uri(uri)
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


_MLFLOW_NAMED_STORES = {"databricks", "databricks-uc", "uc"}


def absolute_store_uri(uri: str) -> str:
    """`sqlite:///rel.db`, `file:rel`, `rel` or `./rel` -> the same store with an absolute path
    (relative to the working directory); absolute paths, servers and databases unchanged."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            return uri  # sqlite:// (in memory) or a form SQLAlchemy will judge itself
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        if not path or path.startswith("/") or path == ":memory:":
            return uri
        return f"sqlite:///{os.path.abspath(path)}{sep}{query}"
    if uri.startswith("file:"):
        rest = uri.removeprefix("file:")
        if rest.startswith("/"):  # file:///abs, file://host/..., file:/abs
            return uri
        return Path(os.path.abspath(urllib.parse.unquote(rest))).as_uri()
    if uri in _MLFLOW_NAMED_STORES or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return uri  # http(s)://, postgresql://, databricks://profile, ...
    return os.path.abspath(os.path.expanduser(uri))  # a bare path: a file store


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (absolute, resolved against the working
    directory if the URI is relative), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    if not path or path == ":memory:":
        return None
    return Path(os.path.abspath(path))


def local_store_path(uri: str) -> Path | None:
    """Where on this machine a tracking store keeps its runs: the database of a sqlite:///
    URI, the folder of a file: URI or bare path (resolved against the working directory);
    None for a server or another database."""
    uri = absolute_store_uri(uri)
    if uri.startswith("sqlite:"):
        return sqlite_path(uri)
    if uri.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return Path(uri) if uri.startswith("/") else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail with one line before any compute when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise SegdistError(f"MLflow server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SegdistError(f"MLflow server {uri} is unreachable: {reason}") from None
    elif (database := sqlite_path(uri)) is not None:
        folder = database.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SegdistError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
    elif is_file_store(uri):
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise SegdistError(f"MLflow store {uri} is a folder (a file store), which this MLflow refuses unless "
                               "MLFLOW_ALLOW_FILE_STORE=true; use a database, e.g. sqlite:///mlflow.db")


def is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or not (
        uri in _MLFLOW_NAMED_STORES or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri))


def _folder_name(name: str) -> str:
    """A name as one path component: kept when it is one (spaces, quotes and non-ASCII are
    fine), else (a slash, `..`, too long) a readable slug plus a hash of the name."""
    if name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name \
            and len(name.encode()) <= 200:
        return name
    slug = re.sub(r"[^\w.\- ]", "_", name).lstrip(".")[:100]
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a local sqlite store, artifacts go to ./mlartifacts; a server decides itself."""
    database = sqlite_path(uri)
    if database is not None:
        return (database.parent / "mlartifacts" / _folder_name(experiment)).as_uri()
    return None


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient. MLflow creates the tables of a new sqlite store when a client first
    opens it, and two processes doing that at once fail ("table ... already exists"): here a
    lock file beside the database (DB.lock, where sqlite keeps its journal too) makes the
    second wait for the first."""
    database = sqlite_path(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri)
    try:
        import fcntl

        lock = os.open(f"{database}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except (ImportError, OSError):  # no flock here, or a lock file we may not create: no lock
        return MlflowClient(tracking_uri=uri)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(lock)  # releases the lock


def restore_if_deleted(client: MlflowClient, experiment) -> None:
    """A study run again after its experiment was deleted (in the UI) gets it back, runs
    included: MLflow keeps the name of a deleted experiment, so a fresh one could not have
    the study's name. Says so in one line."""
    if experiment.lifecycle_stage != LifecycleStage.DELETED:
        return
    try:
        client.restore_experiment(experiment.experiment_id)
    except MlflowException:
        again = client.get_experiment(experiment.experiment_id)
        if again.lifecycle_stage == LifecycleStage.DELETED:
            raise
        return  # another process restored it just now
    print(f"segdist: MLflow experiment {experiment.name!r} (id {experiment.experiment_id}) was deleted; "
          f"restored it, with its runs", file=sys.stderr)


def experiment_by_name(client: MlflowClient, name: str):
    """The experiment called `name` (active or deleted), or None. MLflow's file store looks a
    name up with a filter it builds without quoting (`name = 'it's'` is refused): there, or
    whenever the answer is not that name, every experiment is read and compared here."""
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.name == name:
            return experiment
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
    page_token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=page_token)
        for experiment in page:
            if experiment.name == name:
                return experiment
        page_token = page.token
        if not page_token:
            return None


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, token usage).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The active experiment `name`: found, restored if deleted, or created; tagged as model
    training (EXPERIMENT_KIND_TAG) so that the MLflow UI opens on its runs. Several processes
    may do this at once: the one whose creation loses the race finds the winner's."""
    for _attempt in range(5):
        experiment = experiment_by_name(client, name)
        if experiment is not None:
            restore_if_deleted(client, experiment)
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException as err:
            if err.error_code == "INVALID_PARAMETER_VALUE":  # e.g. a file store and a name with '
                reason = str(err).splitlines()[0][:200]
                if is_file_store(uri) and "'" in name:
                    reason = "MLflow's file store cannot look up a name with a single quote; use a database"
                raise SegdistError(f"MLflow store {uri} refuses an experiment named {name!r}: {reason}") from None
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    raise SegdistError(f"MLflow experiment {name!r} in {uri} exists but cannot be found by its name")


def quote_filter_value(value: str) -> str | None:
    """`value` as a string literal of MLflow's filter grammar, or None when it cannot be one.
    MLflow strips the outer quotes and undoes no escapes ('' or \\'), so a value is quoted
    with the kind of quote it does not contain; one with both, or a backslash (which the
    parser would read as an escape), has no literal: filter on something else and compare
    in Python."""
    if "\\" in value:
        return None
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


_KEY_CHARACTERS = re.compile(r"^[\w.\- /]+$")  # MLflow's, less the colon (refused on Windows)


def mlflow_key(name: str) -> str:
    """A metric, param or tag key MLflow accepts: `name` itself when it is one, else the name
    with every other character replaced by `_` plus a hash of the name, so that two names
    never share a key (`a(b` and `a)b`) and the same name always gets the same key."""
    if len(name) <= 250 and _KEY_CHARACTERS.match(name) and posixpath.normpath(name) == name \
            and name != "." and not name.startswith(("..", "/")):
        return name
    safe = re.sub(r"[^\w.\- ]", "_", name)
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)
    return f"{safe[:240]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def redact(value: Any) -> str:
    """A param value with any secret from the environment blanked out."""
    text = str(value)
    for name, secret in os.environ.items():
        if secret and len(secret) >= 8 and any(word in name.upper() for word in _SECRET_WORDS):
            text = text.replace(secret, "***")
    return text
