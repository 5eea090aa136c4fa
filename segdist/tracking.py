"""MLflow: one parent run per study, one child run per trial.

Everything is logged from the Tune driver (a Tune callback), so only the driver has to
reach the tracking store; training workers never talk to MLflow. If the store becomes
unreachable mid-study, training goes on: writes are queued in order and flushed when it
answers again; whatever is still queued at the end is saved to a file and reported.

What a queued write refers to stays until it is sent: an artifact write that cannot be sent
at once gets its own copy of its files (hard links where it can: Ray deletes old checkpoint
folders, callers delete their scratch folders), text and pictures are kept in memory. A
write MLflow refuses (an invalid or changed value) is left out, not retried, but a refused
batch is sent again item by item so only the refused items are lost; every write left out
or never sent is listed by save_pending, its files and contents saved beside the list.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mlflow.entities import LifecycleStage, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from segdist.configuration_runs import CONFIGURATION_ROLE, ConfigurationRuns, finished_values
from segdist.epoch_report import EpochReport, Fact
from segdist.errors import SegdistError
from segdist.outcome import DIVERGED, FINISHED, trial_outcome
from segdist.stats import HEADLINE_METRIC

DEFAULT_STORE = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_KEY_TAG = "segdist.trial_key"  # config_id + seed: finds a trial's run again on resume
STATUS_TAG = "segdist.status"  # finished | diverged | failed | stopped_early
STUDY_TAG = "segdist.study"
ROLE_TAG = "segdist.role"  # study | configuration | trial (a seed's run)
STUDY_RUN_TAG = "segdist.study_run"  # the study's run of a configuration or seed run (MLflow nests
#                                      seed runs under their configuration's run, that one under the study's)
KEY_NAMES_ARTIFACT = "mlflow_key_names.json"  # MLflow key -> the name it stands for, where they differ
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


class _NoRun(Exception):
    """A write for a trial whose run MLflow refused to create."""


class _Gone(Exception):
    """An artifact write whose files are no longer there to send."""


# Error codes of a write MLflow will refuse however often it comes: an invalid or changed
# value (400 from a server, the same code from a local store), a run that no longer exists.
_REFUSALS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


def _refused(err: Exception) -> bool:
    """A write MLflow will refuse however often it is sent, unlike an unreachable or busy
    store: retrying it would hold up every write queued after it."""
    return isinstance(err, (_NoRun, _Gone)) or (
        isinstance(err, MlflowException) and err.error_code in _REFUSALS)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no bytes copied, and it outlives the source's deletion), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class _Batch:
    """One log_batch of one kind (params, metrics or tags) of one run: a queued write that
    MLflow may refuse as a whole for one bad item, so it can be split into one write per item."""

    def __init__(self, tracker: StudyTracker, handle: str, kind: str, items: list):
        self.tracker, self.handle, self.kind, self.items = tracker, handle, kind, items

    def __call__(self) -> None:
        self.tracker.client.log_batch(self.tracker.run_id(self.handle), **{self.kind: self.items})

    def split(self) -> list[tuple[str, _Batch]]:
        """(what, write) per item, in order; [] for a single item (nothing to split)."""
        if len(self.items) < 2:
            return []
        return [(f"{self.kind[:-1]} {item.key} of {self.handle}", _Batch(self.tracker, self.handle, self.kind, [item]))
                for item in self.items]


class _Upload:
    """An artifact write of files on disk: `send(path)` uploads `path` (a folder or a file).
    Until it is sent, `path` is a copy the tracker owns (`owned`), made by `keep` when the
    write has to wait, so that nothing deletes it first; the copy goes once it is sent."""

    def __init__(self, send: Callable[[str], Any], path: Path, owned: bool = False):
        self.send, self.path, self.owned = send, path, owned

    def __call__(self) -> None:
        if not self.path.exists():
            raise _Gone(f"{self.path} is no longer there")
        self.send(str(self.path))

    def keep(self, folder: Path) -> None:
        """Make the files this write sends its own: a copy under `folder` (a new subfolder)."""
        if self.owned:
            return
        folder.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(dir=folder)) / self.path.name
        if self.path.is_dir():
            shutil.copytree(self.path, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(self.path), str(target))
        self.path, self.owned = target, True

    def release(self) -> None:
        """Delete the copy (once sent)."""
        if self.owned:
            shutil.rmtree(self.path.parent, ignore_errors=True)


class _Content:
    """A text or picture write kept in memory: its bytes are saved beside the unsent list if
    it is never sent."""

    def __init__(self, send: Callable[[], Any], content: bytes, name: str):
        self.send, self.content, self.name = send, content, name

    def __call__(self) -> None:
        self.send()


class StudyTracker:
    """The study's parent run and its trials' child runs.

    Trials are addressed by a handle (their trial key); every write, the creation of a
    trial's run included, goes through one ordered queue, so while the store is away a
    trial can start, train and finish, and its run appears complete when it is back."""

    RETRY_EVERY_S = 10.0

    def __init__(self, uri: str, experiment: str, study_name: str, parent_run_id: str | None = None,
                 spool: Path | None = None):
        """`spool`: where the files of artifact writes that have to wait are kept (default: a
        new temporary folder, made when first needed); a folder on the checkpoints' file
        system lets them be hard links instead of copies."""
        # MLflow's own HTTP retries would block the Tune loop for minutes per write while a
        # server is away; the queue below does the waiting instead.
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(name, value)
        self.uri = uri
        self.client = client_for(uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment, uri)
        self.pending: deque[tuple[str, Callable[[], Any]]] = deque()
        self.left_out: list[tuple[str, str, Callable[[], Any]]] = []  # (what, why, write): refused
        self.sent = 0  # writes that reached MLflow
        self.peak_pending = 0  # the longest the queue has been
        self.spool = spool
        self.run_ids: dict[str, str] = {}  # handle -> MLflow run id, once created
        self.key_names: dict[str, dict[str, str]] = {}  # handle -> {MLflow key: name}, renamed keys
        self._retry_at = 0.0
        self._left_out_in_outage = 0
        if parent_run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=f"{study_name[:230]}-{time.strftime('%Y%m%d-%H%M%S')}",
                tags={STUDY_TAG: study_name, ROLE_TAG: "study"},
            )
            parent_run_id = run.info.run_id
        else:
            self.client.update_run(parent_run_id, status="RUNNING")
        self.parent_run_id = parent_run_id
        self.run_ids["study"] = parent_run_id

    # ------------------------------------------------------------------ the queue

    def _write(self, what: str, operation: Callable[[], Any]) -> None:
        self.pending.append((what, operation))
        self.peak_pending = max(self.peak_pending, len(self.pending))
        self.flush()
        # Sent, or left out, unless still queued: then it is the last write of the queue.
        if self.pending and self.pending[-1][1] is operation and isinstance(operation, _Upload):
            self._keep(what, operation)

    def _keep(self, what: str, upload: _Upload) -> None:
        """The files of a write that has to wait, made its own before the caller (or Ray) deletes them."""
        if self.spool is None:
            self.spool = Path(tempfile.mkdtemp(prefix="segdist-mlflow-queue-"))
        try:
            upload.keep(self.spool)
        except OSError as err:
            warn(f"{what}: could not keep a copy of {upload.path} for when MLflow is back: {err}")

    def flush(self, force: bool = False) -> bool:
        """Send queued writes in order; after a failure, try again only every few seconds.
        A write MLflow refuses is left out (a refused batch is tried again item by item
        first); returns True when the queue is empty."""
        if not force and time.time() < self._retry_at:
            return False
        while self.pending:
            what, operation = self.pending[0]
            try:
                operation()
            except Exception as err:  # noqa: BLE001 - any store failure: keep it for later
                if _refused(err):
                    self.pending.popleft()
                    parts = operation.split() if isinstance(operation, _Batch) and not isinstance(err, _NoRun) else []
                    if parts:
                        self.pending.extendleft(reversed(parts))
                    else:
                        self._leave_out(what, operation, err)
                    continue
                if not self._retry_at:
                    warn(f"MLflow write failed ({what}): {str(err).splitlines()[0][:200]}; writes are "
                         f"queued ({len(self.pending)} now) and retried, training goes on")
                    self._left_out_in_outage = 0
                self._retry_at = time.time() + self.RETRY_EVERY_S
                return False
            self.pending.popleft()
            self.sent += 1
            if isinstance(operation, _Upload):
                operation.release()
        if self._retry_at:
            refused = self._left_out_in_outage
            print("segdist: MLflow is reachable again; queued writes sent" + (
                f", except {refused} that MLflow refused (left out; listed at the end)" if refused else ""),
                file=sys.stderr)
        self._retry_at = 0.0
        return True

    def _leave_out(self, what: str, operation: Callable[[], Any], err: Exception) -> None:
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if isinstance(err, _NoRun):
            reason = "MLflow refused to create its run"
        elif isinstance(err, _Gone):
            reason = f"not sent: {reason}"
            warn(f"{what} {reason} (it was deleted before MLflow could take it); left out")
        else:
            warn(f"MLflow refused {what}: {reason}; left out"
                 + (", and the writes of that run with it" if what.startswith("create run") else ""))
        self.left_out.append((what, reason, operation))
        self._left_out_in_outage += 1

    def drain(self, timeout_s: float = 120.0) -> bool:
        """At the end: keep trying for a while before giving up on the store."""
        deadline = time.time() + timeout_s
        while not self.flush(force=True) and time.time() < deadline:
            time.sleep(self.RETRY_EVERY_S / 2)
        return not self.pending

    def save_pending(self, folder: Path) -> Path | None:
        """Every write not sent, listed in `folder`/mlflow-unsent-<time>.jsonl (one JSON object
        a line: "write" says what it was, "refused" why it was left out where it was (MLflow
        refused it, or its files were deleted before they could be kept),
        "files" where its files or contents were saved, in the folder of the same name), so
        nothing is silently lost. Returns the list's path, or None when every write was sent."""
        entries = [(what, None, operation) for what, operation in self.pending] + self.left_out
        if not entries:
            self._remove_spool()
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mlflow-unsent-{int(time.time())}.jsonl"
        with path.open("w") as out:
            for index, (what, reason, operation) in enumerate(entries):
                record: dict[str, str] = {"write": what}
                if reason is not None:
                    record["refused"] = reason
                saved = _save_files(operation, path.with_suffix("") / str(index))
                if saved is not None:
                    record["files"] = str(saved)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._remove_spool()
        return path

    def _remove_spool(self) -> None:
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def run_id(self, handle: str) -> str:
        if handle not in self.run_ids:
            raise _NoRun(handle)
        return self.run_ids[handle]

    def existing_trials(self, role: str = "trial") -> dict[str, Any]:
        """Handle (a trial key, or a configuration's handle) -> the run of this study that
        already holds it, of runs of `role` (for --resume). A study recorded before
        configuration runs existed has its seed runs directly under the study's run."""
        study = quote_filter_value(self.parent_run_id)
        runs = self.client.search_runs(
            [self.experiment_id], max_results=50000,
            filter_string=f"tags.`{STUDY_RUN_TAG}` = {study} and tags.`{ROLE_TAG}` = '{role}'")
        if not runs and role == "trial":
            runs = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = {study}", max_results=50000)
        return {run.data.tags[TRIAL_KEY_TAG]: run for run in runs if TRIAL_KEY_TAG in run.data.tags}

    def _created_before(self, handle: str) -> str | None:
        """The run of trial `handle` an earlier attempt created (the store made it, but its
        answer was lost), or None."""
        quoted = quote_filter_value(handle)
        if quoted is None:
            return None
        runs = self.client.search_runs(
            [self.experiment_id], max_results=10,
            filter_string=f"tags.`{STUDY_RUN_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = {quoted}")
        return runs[0].info.run_id if runs else None

    def start_trial(self, name: str, handle: str, params: dict[str, Any], run_id: str | None = None,
                    parent: str | None = None, role: str = "trial") -> str:
        """Queue the run of `handle` (or reopen `run_id`, a resumed trial's): a child of the
        run of handle `parent` (a configuration's), else of the study's; returns the handle."""
        if run_id is not None:
            self.run_ids[handle] = run_id
            self._write(f"reopen {handle}", lambda: self.client.update_run(run_id, status="RUNNING"))
            return handle
        attempts = []

        def create() -> None:
            if handle in self.run_ids:
                return
            if attempts and (found := self._created_before(handle)) is not None:
                self.run_ids[handle] = found  # a retried creation must not make a second run
                return
            attempts.append(time.time())
            run = self.client.create_run(
                self.experiment_id, run_name=name[:250],
                tags={PARENT_TAG: self.run_id(parent) if parent else self.parent_run_id,
                      STUDY_RUN_TAG: self.parent_run_id, TRIAL_KEY_TAG: handle, ROLE_TAG: role},
            )
            self.run_ids[handle] = run.info.run_id

        self._write(f"create run of {handle}", create)
        self.log_params(handle, params)
        return handle

    def _key(self, handle: str, name: str) -> str:
        """The MLflow key for a name (class names reach metric keys: `val_iou_<class>`);
        where they differ, the run's KEY_NAMES_ARTIFACT maps the key back to the name."""
        key = mlflow_key(name)
        if key != name:
            names = self.key_names.setdefault(handle, {})
            if names.get(key) != name:
                names[key] = name
                self.log_text(handle, json.dumps(names, indent=1, sort_keys=True, ensure_ascii=False),
                              KEY_NAMES_ARTIFACT)
        return key

    def log_params(self, handle: str, params: dict[str, Any]) -> None:
        items = [Param(self._key(handle, key), redact(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self._write(f"params of {handle}", _Batch(self, handle, "params", items[start:start + 100]))

    def log_metrics(self, handle: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(self._key(handle, key), float(value), now, step)
                 for key, value in metrics.items() if not math.isnan(value)]
        for start in range(0, len(items), 500):
            self._write(f"metrics step {step} of {handle}", _Batch(self, handle, "metrics", items[start:start + 500]))

    def set_tags(self, handle: str, tags: dict[str, str]) -> None:
        items = [RunTag(self._key(handle, key), str(value)[:8000]) for key, value in tags.items()]
        self._write(f"tags of {handle}", _Batch(self, handle, "tags", items))

    def log_artifacts(self, handle: str, directory: str, artifact_path: str) -> None:
        """Queue the files of `directory` as the run's `artifact_path`. If they cannot be sent
        now, the write keeps a copy (hard links where it can): the caller may delete them."""
        self._write(f"{artifact_path} of {handle}", _Upload(
            lambda path: self.client.log_artifacts(self.run_id(handle), path, artifact_path=artifact_path),
            Path(directory)))

    def log_text(self, handle: str, text: str, name: str) -> None:
        self._write(f"{name} of {handle}",
                    _Content(lambda: self.client.log_text(self.run_id(handle), text, name), text.encode(), name))

    def log_image(self, handle: str, png: bytes, name: str) -> None:
        import io

        from PIL import Image

        self._write(f"{name} of {handle}", _Content(
            lambda: self.client.log_image(self.run_id(handle), Image.open(io.BytesIO(png)), name), png, name))

    def finish(self, handle: str, status: str = "FINISHED") -> None:
        self._write(f"end of {handle}", lambda: self.client.set_terminated(self.run_id(handle), status=status))


def _save_files(operation: Callable[[], Any], folder: Path) -> Path | None:
    """The files (an _Upload's) or contents (a _Content's) of an unsent write, moved or
    written into `folder`; None for other writes or files no longer there."""
    if isinstance(operation, _Content):
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / posixpath.basename(operation.name)
        target.write_bytes(operation.content)
        return target
    if not isinstance(operation, _Upload) or not operation.path.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / operation.path.name
    if operation.owned:
        shutil.move(str(operation.path), target)
    elif operation.path.is_dir():
        shutil.copytree(operation.path, target)
    else:
        shutil.copy2(operation.path, target)
    return target


def copy_best_checkpoint(candidates: list[tuple[float, str]], storage: str, into: Path) -> Path | None:
    """The best-scoring checkpoint that Ray still keeps (it deletes all but the best and the
    latest, and breaks ties its own way), copied from the storage (local, NFS or s3://)."""
    import pyarrow.fs

    filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
    for _, path in sorted(candidates, key=lambda c: -c[0]):
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
            if Path(path).is_dir():
                return Path(path)
            pyarrow.fs.copy_files(path, str(into), source_filesystem=filesystem)
            return into
    return None


def never_raises(hook):
    """A Tune callback that raises marks the trial as errored: tracking trouble must not."""

    @functools.wraps(hook)
    def wrapper(self, iteration, trials, trial, *args, **kwargs):
        try:
            return hook(self, iteration, trials, trial, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warn(f"MLflow logging for trial {trial.trial_id} failed in {hook.__name__}: {err}")

    return wrapper


def model_params(facts: dict[str, Fact]) -> dict[str, Fact]:
    """Model facts (train.model_facts, EpochReport.facts) as MLflow params: model_<name>."""
    return {f"model_{name}": value for name, value in facts.items()}


CONFIGURATION_PARAM = "configuration"  # the readable label: MLflow's "Group by" aggregates seeds on it


def configuration_label(variant: str, overrides: dict[str, Any]) -> str:
    """A configuration as a person reads it: its variant and the values the search chose
    (by their last key part), e.g. `naked lr=0.01 crop_size=[321, 321]`."""
    chosen = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sorted(overrides.items())
              if key != "model.variant"]
    return " ".join([variant, *chosen])


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, every epoch's metrics exactly
    once, the best checkpoint as an artifact, and the trial's final status."""

    def __init__(self, tracker: StudyTracker, storage: str, existing: dict[str, Any] | None = None,
                 baseline: str | None = None, progress: TextIO | None = None):
        """`existing`: trial key -> seed run of a resumed study (its configuration runs are
        looked up too); `baseline`: the study's, for the configuration runs' deltas;
        `progress`: where to print one line per trial epoch and per trial end (None: nowhere)."""
        self.progress = progress
        self.names: dict[str, str] = {}  # Tune trial id -> its run's name, for the progress lines
        self.tracker = tracker
        self.storage = storage
        self.existing = existing or {}
        self.configurations = ConfigurationRuns(
            tracker, existing=tracker.existing_trials(CONFIGURATION_ROLE) if self.existing else {},
            finished=finished_values(self.existing), baseline=baseline)
        self.runs: dict[str, str] = {}  # Tune trial id -> tracker handle (the trial key)
        self.last_epoch: dict[str, int] = {}
        self.last_result: dict[str, dict] = {}
        self.checkpoints: dict[str, list[tuple[float, str]]] = {}
        self.started_at: dict[str, float] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.worker_starts: dict[str, set[float]] = {}  # a new value = the worker group restarted
        self.reopened: set[str] = set()  # trials of a resumed study that already had a run
        if tracker.spool is None and "://" not in storage:
            # Beside the checkpoints: the files of a waiting artifact write are hard links there.
            tracker.spool = Path(storage) / "mlflow-queue"

    @never_raises
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:  # Tune restarted it after an error (its FailureConfig): same run
            return
        config = trial.config["trial"]
        key = config["trial_key"]
        previous = self.existing.get(key)
        label = configuration_label(config["recipe"]["model"]["variant"], config["overrides"])
        run_id = previous.info.run_id if previous is not None else None
        params = {**config["flat"], **model_params(config["model_facts"]), CONFIGURATION_PARAM: label}
        name = self.names[trial.trial_id] = f"{label} · seed {config['seed']}"
        parent = self.configurations.start(config["config_id"], label, config["recipe"]["model"]["variant"],
                                           {k: v for k, v in params.items() if k != "train.seed"})
        self.runs[trial.trial_id] = self.tracker.start_trial(name, key, params, run_id=run_id, parent=parent)
        # Before the lookup below, which fails while the store is away: without them the
        # trial's later hooks would fail too, and its run never get its status or end.
        self.started_at[trial.trial_id] = time.time()
        if previous is not None:
            self.reopened.add(trial.trial_id)
            steps = [m.step for m in self.tracker.client.get_metric_history(run_id, "val_miou")]
            self.last_epoch[trial.trial_id] = max(steps, default=-1)

    @never_raises
    def on_trial_result(self, iteration, trials, trial, result, **info):
        handle = self.runs[trial.trial_id]
        report = EpochReport.from_result(result)
        epoch = report.epoch
        for earlier, metrics in report.history:
            # A resumed trial brings the epochs its checkpoint saw: log any MLflow lacks.
            if earlier > self.last_epoch.get(trial.trial_id, -1):
                self.tracker.log_metrics(handle, metrics, step=earlier)
                self.last_epoch[trial.trial_id] = earlier
        self.worker_starts.setdefault(trial.trial_id, set()).add(round(report.worker_started_at, 3))
        # A restarted worker group resumes after its last checkpoint: never log an epoch twice.
        if epoch <= self.last_epoch.get(trial.trial_id, -1):
            # Nothing to log, but the trial's outcome: a diverged report, or a trial resumed
            # from its last epoch's checkpoint reporting that epoch again (train.fit).
            self.last_result[trial.trial_id] = result
            return
        if trial.trial_id in self.reopened:  # its first new epoch
            self.reopened.discard(trial.trial_id)
            # Ray Train continued the trial from its checkpoint: record where.
            self.tracker.set_tags(handle, {"segdist.resumed_at_epoch": str(epoch)})
        self.last_epoch[trial.trial_id] = epoch
        self.last_result[trial.trial_id] = result
        self.tracker.log_metrics(handle, report.metrics, step=epoch)
        self._say(trial, f"epoch {epoch + 1}/{trial.config['trial']['recipe']['train']['epochs']}  "
                         + "  ".join(f"{key} {100 * report.metrics[key]:.2f}%"
                                     for key in ("val_miou", HEADLINE_METRIC) if key in report.metrics))
        if report.facts:
            self.tracker.log_params(handle, model_params(report.facts))
        if trial.trial_id not in self.timings:
            # Seconds from trial start to the training function running on the workers.
            startup = report.worker_started_at - self.started_at[trial.trial_id]
            self.timings[trial.trial_id] = {"startup_s": startup}
            self.tracker.log_metrics(handle, {"trial_startup_s": startup}, step=0)
        if "checkpoint_path" in result and report.pictures:
            self._log_pictures(handle, result["checkpoint_path"])
        if "checkpoint_path" in result:
            score = report.metrics.get("val_miou", math.nan)
            self.checkpoints.setdefault(trial.trial_id, []).append(
                (score if math.isfinite(score) else -math.inf, result["checkpoint_path"]))

    def _log_pictures(self, handle: str, checkpoint_path: str) -> None:
        """The final evaluation's confusion matrix and overlays, saved beside the checkpoint."""
        import pyarrow.fs

        from segdist.train import PICTURES_DIR

        source = f"{checkpoint_path}/{PICTURES_DIR}"
        if Path(source).is_dir():  # local or NFS storage: log from where it is
            self.tracker.log_artifacts(handle, source, artifact_path=PICTURES_DIR)
            return
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(self.storage)
        if filesystem.get_file_info(source).type != pyarrow.fs.FileType.Directory:
            return
        with tempfile.TemporaryDirectory() as scratch:
            pyarrow.fs.copy_files(source, scratch, source_filesystem=filesystem)
            self.tracker.log_artifacts(handle, scratch, artifact_path=PICTURES_DIR)  # copied if it must wait

    @never_raises
    def on_trial_complete(self, iteration, trials, trial, **info):
        handle = self.runs[trial.trial_id]
        config = trial.config["trial"]
        outcome = trial_outcome(self.last_result.get(trial.trial_id), config["recipe"]["train"]["epochs"])
        try:
            with tempfile.TemporaryDirectory() as scratch:
                local = copy_best_checkpoint(self.checkpoints.get(trial.trial_id, []), self.storage, Path(scratch))
                if local is not None:  # copied (hard links where it can) if it must wait
                    self.tracker.log_artifacts(handle, str(local), artifact_path="best_checkpoint")
        except Exception as err:  # noqa: BLE001 - a lost artifact must not fail a finished trial
            warn(f"best checkpoint of {handle} not logged: {err}")
        elapsed = time.time() - self.started_at[trial.trial_id]
        startup = self.timings.get(trial.trial_id, {}).get("startup_s", float("nan"))
        restarts = max(len(self.worker_starts.pop(trial.trial_id, ())) - 1, 0)
        self.checkpoints.pop(trial.trial_id, None)
        self.tracker.log_metrics(handle, {"trial_wall_s": elapsed, "trial_train_s": elapsed - startup,
                                          "worker_restarts": restarts}, step=0)
        tags = {STATUS_TAG: outcome}
        last = self.last_result.pop(trial.trial_id, None)  # (its epoch history: the driver keeps no trial's)
        if outcome == DIVERGED:  # its last report says why
            tags["segdist.error"] = EpochReport.from_result(last).diverged
        self.tracker.set_tags(handle, tags)
        self.tracker.finish(handle, "FAILED" if outcome == DIVERGED else "FINISHED")
        self._say(trial, outcome)
        value = EpochReport.from_result(last).metrics.get(HEADLINE_METRIC) if last else None
        if outcome == FINISHED and value is not None and math.isfinite(value):
            self.configurations.record(config["config_id"], config["seed"], value)

    def on_experiment_end(self, trials, **info):
        try:
            self.configurations.end()
        except Exception as err:  # noqa: BLE001 - as never_raises: the study's results stand
            warn(f"MLflow callback on_experiment_end failed: {err}")

    @never_raises
    def on_trial_error(self, iteration, trials, trial, **info):
        error = str(getattr(trial, "error_msg", "") or "")
        if not error and getattr(trial, "error_file", None) and Path(trial.error_file).exists():
            error = Path(trial.error_file).read_text()
        status = trial_outcome(self.last_result.get(trial.trial_id), 1, error or "failed")
        handle = self.runs.get(trial.trial_id)
        if handle is not None:
            self.tracker.set_tags(handle, {STATUS_TAG: status, "segdist.error": redact(error.strip()[-500:])})
            self.tracker.finish(handle, "FAILED")
        self._say(trial, f"{status} ({error.strip().splitlines()[-1][:200] if error.strip() else 'no message'})")

    def _say(self, trial, what: str) -> None:
        """One progress line of a trial (`<configuration> · seed N: what`), when asked for."""
        if self.progress is not None:
            print(f"{self.names.get(trial.trial_id, trial.trial_id)}: {what}", file=self.progress, flush=True)
