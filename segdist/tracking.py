"""The study's MLflow runs: one parent run per study, child runs under it (StudyTracker),
every write through one ordered queue.

Everything is logged from the Tune driver (the callback in segdist.mlflow_callback), so only
the driver has to reach the tracking store; training workers never talk to MLflow. If the
store becomes unreachable mid-study, training goes on: writes are queued in order and flushed
when it answers again; whatever is still queued at the end is saved to a file and reported.

What a queued write refers to stays until it is sent: an artifact write that cannot be sent
at once gets its own copy of its files (hard links where it can: Ray deletes old checkpoint
folders, callers delete their scratch folders), text and pictures are kept in memory. A
write MLflow refuses (an invalid or changed value) is left out, not retried, but a refused
batch is sent again item by item so only the refused items are lost; every write left out
or never sent is listed by save_pending, its files and contents saved beside the list.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from segdist.mlflow_store import (
    KEY_NAMES_ARTIFACT,
    PARENT_TAG,
    ROLE_TAG,
    STUDY_RUN_TAG,
    STUDY_TAG,
    TRIAL_KEY_TAG,
    client_for,
    get_or_create_experiment,
    mlflow_key,
    quote_filter_value,
    redact,
    warn,
)


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
