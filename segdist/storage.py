"""Object storage (s3://, gs://, hdfs://, abfs://: pyarrow.fs) for shards, checkpoints and
Tune state: open a URI's file system, check before any training that a URI can be written
(from the driver and from every Ray node), upload a finished local folder, and say in one
line why a URI cannot be used.

Credentials and the server come from the standard environment and nowhere else:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_DEFAULT_REGION and, for a
MinIO / Ceph / local S3-compatible server, AWS_ENDPOINT_URL (read by pyarrow's S3 file system,
checked with pyarrow 25, so by Ray Train's storage too, and by boto3, so by MLflow; pyarrow
ignores the service-specific AWS_ENDPOINT_URL_S3, apache/arrow#49643). segdist never copies them into a
config, a Ray runtime environment, a log line or an MLflow run: every node (and an MLflow
server that proxies artifacts) needs them in its own environment.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlparse

from segdist.errors import SegdistError

NODE_PROBE_TIMEOUT_S = 120.0  # a node that cannot answer the probe within this counts as unreachable
_LOCAL_SCHEMES = {"", "file"}

# pyarrow's S3 error codes (and the messages of other back ends) -> what the user should know
_REASONS = (
    (("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist"), "the bucket does not exist"),
    (("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
      "SignatureDoesNotMatch", "Forbidden"),
     "the credentials are refused (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
    (("NETWORK_CONNECTION", "Could not connect", "curlCode", "Couldn't resolve", "Connection refused",
      "timed out", "Timeout"), "the server is unreachable"),
)


def is_remote(uri: str | os.PathLike) -> bool:
    """True for a URI that pyarrow.fs or fsspec opens (s3://, gs://, ...), False for a local
    path or file:// URL (and for a Windows drive letter)."""
    scheme = urlparse(str(uri)).scheme
    return len(scheme) > 1 and scheme not in _LOCAL_SCHEMES


def endpoint_note(uri: str) -> str:
    """' at AWS_ENDPOINT_URL=...' for an s3:// URI when that variable is set (an endpoint is
    no secret), else ''."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint and urlparse(uri).scheme in ("s3", "s3a") else ""


def reason(uri: str, err: BaseException) -> str:
    """One short clause saying why `uri` failed with `err`: a missing bucket, refused
    credentials, an unreachable server, or the first line of the error."""
    text = str(err)
    for needles, why in _REASONS:
        if any(needle in text for needle in needles):
            return why + (endpoint_note(uri) if "unreachable" in why else "")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", first)[:300]


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or URI. SegdistError naming the
    URI when pyarrow cannot make one (unknown scheme, malformed URI)."""
    import pyarrow.fs

    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(str(uri).removeprefix("file://")).resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(str(uri))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise SegdistError(f"{uri}: cannot open its file system ({reason(str(uri), err)})") from None


def _missing_bucket(fs, path: str, uri: str) -> str | None:
    """"bucket 'B' does not exist[ at ENDPOINT]" for an S3 file system whose bucket (the first
    part of `path`) is missing, else None. Raises what pyarrow raises (unreachable, refused)."""
    import pyarrow.fs

    bucket = path.split("/", 1)[0]
    if isinstance(fs, pyarrow.fs.S3FileSystem) and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
        return f"bucket {bucket!r} does not exist{endpoint_note(uri)}"
    return None


def missing_bucket(uri: str) -> str | None:
    """_missing_bucket for a URI; None also when it cannot be told. Never raises."""
    try:
        return _missing_bucket(*filesystem(uri), uri)
    except Exception:  # noqa: BLE001 - a second opinion only
        return None


def probe_writable(uri: str) -> str | None:
    """Why `uri` (a folder URI) cannot hold files, or None if it can: its bucket must exist
    and a small object must be written, read back and deleted with the environment's
    credentials (a local folder is created first). Never raises."""
    import pyarrow.fs

    try:
        fs, path = filesystem(uri)
        if missing := _missing_bucket(fs, path, uri):
            return missing
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.segdist-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"segdist")
        with fs.open_input_stream(probe) as stream:
            stream.read()
        fs.delete_file(probe)
    except SegdistError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - pyarrow raises OSError and others
        return reason(uri, err)
    return None


def check_writable(uri: str, what: str = "storage") -> None:
    """SegdistError `<what> <uri>: cannot write there: <reason>` unless probe_writable passes."""
    why = probe_writable(uri)
    if why is not None:
        raise SegdistError(f"{what} {uri}: cannot write there: {why}")


def probe_readable(uri: str) -> str | None:
    """Why the file `uri` cannot be read (missing, refused, unreachable), or None. Never raises."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as stream:
            stream.read(1)
    except FileNotFoundError:
        return missing_bucket(uri) or "not found"
    except SegdistError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001
        return reason(uri, err)
    return None


def upload_folder(local: str | os.PathLike, uri: str, last: str | None = None) -> list[str]:
    """Copy the files directly in `local` (not its sub-folders, not names starting with '.')
    to the folder URI `uri`, file `last` after every other one (a reader that sees it sees
    a complete folder). Returns the names copied. SegdistError naming the URI on failure."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file() and not p.name.startswith("."))
    names.sort(key=lambda name: name == last)
    local_fs = pyarrow.fs.LocalFileSystem()
    for name in names:
        try:
            pyarrow.fs.copy_files(str(Path(local, name).resolve()), f"{path.rstrip('/')}/{name}",
                                  source_filesystem=local_fs, destination_filesystem=fs)
        except Exception as err:  # noqa: BLE001 - pyarrow raises OSError and others
            raise SegdistError(f"{uri.rstrip('/')}/{name}: cannot upload ({reason(uri, err)})") from None
    return names


# ---------------------------------------------------------------- from every Ray node


def _node_probe(writable: list[str], readable: list[str]) -> list[str]:
    """On one node: a line for each URI it cannot write / read."""
    problems = [f"{uri}: cannot write there: {why}" for uri in writable if (why := probe_writable(uri))]
    problems += [f"{uri}: cannot read it: {why}" for uri in readable if (why := probe_readable(uri))]
    return problems


def check_from_nodes(writable: list[str], readable: list[str]) -> None:
    """Run, on every alive node of the connected Ray cluster, probe_writable on each of
    `writable` and probe_readable on each of `readable` (remote URIs only; local paths are
    each node's own business). SegdistError with one line naming the first node and URI
    that fails: what the driver reaches, a node (whose credentials or network differ) may not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    writable = [u for u in writable if is_remote(u)]
    readable = [u for u in readable if is_remote(u)]
    if not writable and not readable:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            writable, readable): n.get("NodeManagerAddress", n["NodeID"])
        for n in nodes
    }
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_PROBE_TIMEOUT_S)
    for ref, address in refs.items():
        if ref not in ready:
            raise SegdistError(f"Ray node {address} did not finish checking {(writable + readable)[0]} within "
                               f"{NODE_PROBE_TIMEOUT_S:g} s")
        problems = ray.get(ref)
        if problems:
            raise SegdistError(f"Ray node {address}: {problems[0]}; this driver can, so give every node the "
                               f"credentials (AWS_* variables) and network access in its own environment")
