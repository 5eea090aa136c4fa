"""Write samples as webdataset .tar shards plus manifest.parquet and dataset.json.

Layout of OUT_DIR (e.g. shards/voc/train):

    train-000000.tar ...   webdataset shards; per sample KEY.jpg (or KEY.image.png for PNG
                           sources) = image bytes, KEY.label.zst = label (raw uint8 HxW class
                           indices, one zstd frame), KEY.json =
                           {key, width, height, dataset, image, orig_width, orig_height}
    manifest.parquet       one row per sample: key, shard, width, height, orig_width,
                           orig_height, downscale, class_pixels (list, one count per class),
                           ignore_pixels
    dataset.json           dataset, split, classes, ignore_index, num_samples, shards,
                           shard_sizes, class_pixels, class_frequency, image_mean, image_std,
                           downscale, stats {skipped, skipped_keys}; written last: a folder
                           with dataset.json is complete
    _parts/                per-shard bookkeeping that makes an interrupted build resumable

Every shard is written under a temporary name and renamed when complete, so a visible shard
is always whole. A re-run keeps a finished shard only when its bookkeeping says it holds the
same keys, built with the same settings, from unchanged sources: build_from_source records
the path, size and modification time of every file each sample is read from (Source.files),
build_shards a hash of the samples it was given. Any other shard is rewritten. Tars are
reproducible (fixed mtime, sorted members).

OUT_DIR may be a URI (s3://bucket/shards/train, gs://...; segdist.storage): the build then
runs in a local temporary folder (under TMPDIR) and the finished folder is uploaded, shards
and manifest.parquet first and dataset.json last, so a reader never sees a partial build. A
re-run to a URI builds everything again (the resumable bookkeeping stays local).

Two entry points: `build_shards` (any iterable of Samples, one process) and
`build_from_source` (a picklable source with keys()/load(key)/files(key), many processes,
on-bad policy, optional downscale). `shards_up_to_date` tells, without writing, whether
build_from_source would keep every shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import posixpath
import re
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from segdist.data.classes import IGNORE_INDEX
from segdist.data.sample import (
    DATASET_JSON,
    Sample,
    check_key,
    check_label,
    decode_image,
    encode_label_zst,
    invalid_label_lut,
)
from segdist.errors import SegdistError
from segdist.storage import is_remote

# 2: labels as KEY.label.zst (1: KEY.png palette PNGs; still read). A re-run rebuilds older shards.
FORMAT_VERSION = 2
MANIFEST = "manifest.parquet"
PARTS = "_parts"


class Source(Protocol):
    """What build_from_source needs: picklable, keys() in a fixed order, load(key), files(key).

    files(key) names every file load(key) reads for that sample (image, label, ...), resolved
    as load would resolve them now; it need not exist (load then raises). The build records
    each file's size and st_mtime_ns, so a later build rewrites the shards whose files
    changed. List files need not be named: what they list is keys(), which is compared too.
    """

    def keys(self) -> list[str]: ...

    def load(self, key: str) -> Sample: ...

    def files(self, key: str) -> list[Path]: ...


@dataclass
class BuildResult:
    out_dir: Path | str  # a str for a URI
    num_samples: int
    shards: list[str]
    written: int  # shards written by this call
    reused: int  # shards kept from an earlier (interrupted) run
    skipped_keys: list[str] = field(default_factory=list)
    changed: int = 0  # of `written`: finished shards rewritten because their sources changed


# ----------------------------------------------------------------------------- samples


def _image_ext(sample: Sample) -> str:
    return "jpg" if sample.image_ext in ("jpg", "jpeg") else "image.png"


def downscale_sample(sample: Sample, factor: float) -> Sample:
    """Resize image (bilinear, re-encoded: JPEG q95 / PNG) and label (nearest) by factor."""
    height, width = sample.label.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    rgb = decode_image(sample.image_bytes, f"{sample.source} (sample {sample.key!r})")
    image = Image.fromarray(rgb).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    if sample.image_ext in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG", compress_level=6)
    label = np.asarray(Image.fromarray(sample.label).resize(size, Image.NEAREST))
    return Sample(sample.key, buf.getvalue(), label, sample.image_ext, sample.source)


class _ShardAccumulator:
    """Rows and statistics of one shard while it is written."""

    def __init__(self, shard: str, num_classes: int) -> None:
        self.shard = shard
        self.num_classes = num_classes
        self.lut = invalid_label_lut(num_classes)
        self.rows: list[dict] = []
        self.sum = np.zeros(3, dtype=np.float64)
        self.sumsq = np.zeros(3, dtype=np.float64)
        self.npix = 0

    def add(self, sample: Sample, orig_size: tuple[int, int], downscale: float) -> tuple[dict, bytes]:
        """Validate and measure one sample; returns the tar entry and the encoded label."""
        where = f"{sample.source or sample.key} (sample {sample.key!r})"
        check_key(sample.key, where)
        check_label(sample.label, self.num_classes, where, self.lut)
        image = decode_image(sample.image_bytes, where)
        if image.shape[:2] != sample.label.shape:
            raise SegdistError(
                f"{where}: image is {image.shape[1]}x{image.shape[0]} but label is "
                f"{sample.label.shape[1]}x{sample.label.shape[0]}"
            )
        rgb = image.reshape(-1, 3).astype(np.float64)
        self.sum += rgb.sum(axis=0)
        self.sumsq += np.einsum("ij,ij->j", rgb, rgb)
        self.npix += rgb.shape[0]
        counts = np.bincount(sample.label.ravel(), minlength=256)
        height, width = sample.label.shape
        self.rows.append(
            {
                "key": sample.key,
                "shard": self.shard,
                "width": width,
                "height": height,
                "orig_width": orig_size[0],
                "orig_height": orig_size[1],
                "downscale": downscale,
                "class_pixels": [int(c) for c in counts[: self.num_classes]],
                "ignore_pixels": int(counts[IGNORE_INDEX]),
            }
        )
        return self.rows[-1], encode_label_zst(sample.label)


def _tar_entry(sample: Sample, row: dict, label: bytes, dataset: str) -> dict:
    """The webdataset entry of one measured sample: {"__key__", image ext: bytes, "label.zst", "json"}."""
    meta = {
        "key": sample.key,
        "width": row["width"],
        "height": row["height"],
        "dataset": dataset,
        "image": _image_ext(sample),
        "orig_width": row["orig_width"],
        "orig_height": row["orig_height"],
    }
    return {
        "__key__": sample.key,
        _image_ext(sample): sample.image_bytes,
        "label.zst": label,
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _measure(acc: _ShardAccumulator, sample: Sample, downscale: float) -> tuple[Sample, dict, bytes]:
    """(the sample as written, downscaled unless downscale == 1; its manifest row; its encoded
    label), after acc has validated and counted it. SegdistError for a bad sample."""
    orig = (sample.width, sample.height)
    if downscale != 1.0:
        sample = downscale_sample(sample, downscale)
    row, label = acc.add(sample, orig, downscale)
    return sample, row, label


def _write_samples(
    writer: wds.TarWriter,
    samples: Iterable[Sample],
    acc: _ShardAccumulator,
    *,
    dataset: str,
    downscale: float,
    on_bad: str,
) -> tuple[list[str], list[dict]]:
    """Write every good sample to writer; return (the key of every sample seen, in order,
    skipped ones included; [{key, reason}] of the skipped ones). A bad sample raises
    SegdistError unless on_bad == "skip"; a _BadSample (a load that failed) is always skipped."""
    seen_keys: list[str] = []
    skipped: list[dict] = []
    for sample in samples:
        seen_keys.append(sample.key)
        if isinstance(sample, _BadSample):
            skipped.append({"key": sample.key, "reason": sample.reason})
            continue
        try:
            sample, row, label = _measure(acc, sample, downscale)
        except SegdistError as err:
            if on_bad == "skip":
                skipped.append({"key": sample.key, "reason": str(err)})
                continue
            raise
        writer.write(_tar_entry(sample, row, label, dataset))
    return seen_keys, skipped


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on a new file at path that writes reproducible tars (fixed mtime and
    owner); on leaving the block it is closed and, unless the block raised, synced to disk."""
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=0, user="segdist", group="segdist")
        try:
            yield writer
        finally:
            writer.close()
        stream.flush()
        os.fsync(stream.fileno())


def _save_part(out_dir: Path, part: dict) -> None:
    """Write a shard's bookkeeping record atomically to OUT_DIR/_parts/SHARD.json."""
    parts = out_dir / PARTS
    parts.mkdir(exist_ok=True)
    _atomic_write_text(parts / f"{part['shard']}.json", json.dumps(part))


def _write_shard(
    out_dir: Path,
    shard: str,
    samples: Iterable[Sample],
    *,
    dataset: str,
    num_classes: int,
    downscale: float,
    on_bad: str,
    chunk_keys: list[str] | None,
    settings: dict,
    sources: dict,
) -> dict:
    """Write one shard (temp name, then rename) and its bookkeeping; return the part record.

    sources: what identifies the samples' sources ({"files": ...} or {"digest": ...}), stored
    so that a later build can tell whether they changed.
    """
    acc = _ShardAccumulator(shard, num_classes)
    tmp = out_dir / f".{shard}.tmp-{os.getpid()}"
    try:
        with _open_tar(tmp) as writer:
            seen_keys, skipped = _write_samples(
                writer, samples, acc, dataset=dataset, downscale=downscale, on_bad=on_bad
            )
        part = {
            "shard": shard,
            "keys": chunk_keys if chunk_keys is not None else seen_keys,
            "settings": settings,
            "sources": sources,
            "rows": acc.rows,
            "skipped": skipped,
            "sum": acc.sum.tolist(),
            "sumsq": acc.sumsq.tolist(),
            "npix": acc.npix,
        }
        _save_part(out_dir, part)
        os.replace(tmp, out_dir / shard)
        return part
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_part(
    out_dir: Path, shard: str, chunk_keys: list[str], settings: dict, sources: dict
) -> tuple[dict | None, bool]:
    """(bookkeeping of the finished shard, False) if it matches this build, else (None, changed).

    changed is True when a finished shard holds the same keys with the same settings but
    its sources differ: a file's path, size or mtime, or the hash of the samples. A part
    written by a segdist older than this record has no "sources" and counts as changed
    (rewritten, since nothing tells whether its sources are the same).
    """
    part_path = out_dir / PARTS / f"{shard}.json"
    if not (out_dir / shard).is_file() or not part_path.is_file():
        return None, False
    try:
        part = json.loads(part_path.read_text())
    except (OSError, ValueError):
        return None, False
    if part.get("settings") != settings or part.get("keys") != chunk_keys:
        return None, False
    if part.get("sources") != sources:  # also a part from before this record: rewritten
        return None, True
    return part, False


def _file_stats(source: Source, keys: list[str]) -> dict:
    """{"files": [[absolute path, size in bytes, st_mtime_ns], ...]} of every file the keys'
    samples are read from, in key order; size and mtime are None for a file that cannot be
    stat'ed (missing). Taken before the files are read, so a file changed during the build
    is rewritten by the next one."""
    stats = []
    for key in keys:
        for path in source.files(key):
            path = os.path.abspath(path)
            try:
                st = os.stat(path)
            except OSError:
                stats.append([path, None, None])
            else:
                stats.append([path, st.st_size, st.st_mtime_ns])
    return {"files": stats}


def _samples_digest(samples: list[Sample]) -> dict:
    """{"digest": blake2b hex} of the samples' keys, image bytes and labels (shape, dtype, values)."""
    digest = hashlib.blake2b(digest_size=20)
    for sample in samples:
        label = np.ascontiguousarray(sample.label)
        head = [sample.key, sample.image_ext, len(sample.image_bytes), label.dtype.str, list(label.shape)]
        digest.update(json.dumps(head).encode())
        digest.update(sample.image_bytes)
        digest.update(label.tobytes())
    return {"digest": digest.hexdigest()}


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _prepare_out_dir(out_dir: Path, prefix: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATASET_JSON).unlink(missing_ok=True)  # incomplete until the end of this build
    for stale in out_dir.glob(f".{prefix}-*.tar.tmp-*"):
        stale.unlink(missing_ok=True)


def _check_rows(out_dir: Path, keys: list[str], skipped: list[dict]) -> None:
    """SegdistError if a key appears twice among the written samples' keys, or none was written."""
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SegdistError(f"{out_dir}: sample key {dup!r} appears twice in this split")
    if not keys:
        raise SegdistError(f"{out_dir}: no samples were written (all {len(skipped)} skipped or none given)")


def _remove_stale_shards(out_dir: Path, prefix: str, names: list[str]) -> None:
    """Delete PREFIX-NNNNNN.tar shards (and their bookkeeping) in OUT_DIR that are not in names:
    what an earlier build with other settings left behind."""
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in names:
            path.unlink()
            (out_dir / PARTS / f"{path.name}.json").unlink(missing_ok=True)


def _pixel_stats(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per RGB channel, shape (3,), in pixel units 0..255, over every pixel of the parts."""
    npix = sum(part["npix"] for part in parts)
    mean = np.sum([part["sum"] for part in parts], axis=0) / npix
    var = np.sum([part["sumsq"] for part in parts], axis=0) / npix - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _write_manifest(out_dir: Path, rows: list[dict], num_classes: int) -> None:
    """Write the rows (one per sample) as OUT_DIR/manifest.parquet, atomically."""
    table = pa.table(
        {
            "key": pa.array([row["key"] for row in rows], pa.string()),
            "shard": pa.array([row["shard"] for row in rows], pa.string()),
            "width": pa.array([row["width"] for row in rows], pa.int32()),
            "height": pa.array([row["height"] for row in rows], pa.int32()),
            "orig_width": pa.array([row["orig_width"] for row in rows], pa.int32()),
            "orig_height": pa.array([row["orig_height"] for row in rows], pa.int32()),
            "downscale": pa.array([row["downscale"] for row in rows], pa.float32()),
            "class_pixels": pa.array(
                [row["class_pixels"] for row in rows], pa.list_(pa.int64(), num_classes)
            ),
            "ignore_pixels": pa.array([row["ignore_pixels"] for row in rows], pa.int64()),
        }
    )
    tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / MANIFEST)


def _dataset_info(
    prefix: str,
    parts: list[dict],
    rows: list[dict],
    skipped: list[dict],
    *,
    dataset: str,
    classes: Sequence[str],
    downscale: float,
) -> dict:
    """The content of dataset.json: the build's settings, shards and statistics."""
    class_pixels = np.array([row["class_pixels"] for row in rows], dtype=np.int64).sum(axis=0)
    total = float(class_pixels.sum())
    mean, std = _pixel_stats(parts)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "split": prefix,
        "classes": list(classes),
        "ignore_index": IGNORE_INDEX,
        "num_samples": len(rows),
        "shards": [part["shard"] for part in parts],
        "shard_sizes": [len(part["rows"]) for part in parts],
        "class_pixels": class_pixels.tolist(),
        "class_frequency": (class_pixels / total).tolist() if total else [0.0] * len(classes),
        "ignore_pixels": int(sum(row["ignore_pixels"] for row in rows)),
        "image_mean": (mean / 255.0).tolist(),  # RGB in [0, 1], after any downscale
        "image_std": (std / 255.0).tolist(),
        "downscale": downscale,
        "stats": {
            "skipped": len(skipped),
            "skipped_keys": [s["key"] for s in skipped],
            "skipped_reasons": skipped,
        },
    }


def _finalize(
    out_dir: Path,
    prefix: str,
    parts: list[dict],
    *,
    dataset: str,
    classes: Sequence[str],
    downscale: float,
) -> BuildResult:
    """Check the parts' samples, drop stale shards, write manifest.parquet and (last)
    dataset.json; return the result with written/reused/changed left at 0 for the caller."""
    rows = [row for part in parts for row in part["rows"]]
    skipped = [s for part in parts for s in part["skipped"]]
    _check_rows(out_dir, [row["key"] for row in rows], skipped)
    names = [part["shard"] for part in parts]
    _remove_stale_shards(out_dir, prefix, names)
    info = _dataset_info(prefix, parts, rows, skipped, dataset=dataset, classes=classes, downscale=downscale)
    _write_manifest(out_dir, rows, len(classes))
    _atomic_write_text(out_dir / DATASET_JSON, json.dumps(info, indent=1) + "\n")
    return BuildResult(out_dir, len(rows), names, 0, 0, [s["key"] for s in skipped])


def _check_common(classes: Sequence[str], shard_size: int, downscale: float, on_bad: str) -> None:
    if not classes:
        raise SegdistError("classes must not be empty")
    if len(classes) > IGNORE_INDEX:
        raise SegdistError(f"at most {IGNORE_INDEX} classes fit in an 8-bit label, got {len(classes)}")
    if shard_size < 1:
        raise SegdistError(f"shard size must be at least 1, got {shard_size}")
    if not 0 < downscale <= 1:
        raise SegdistError(f"downscale must be in (0, 1], got {downscale}")
    if on_bad not in ("raise", "skip"):
        raise SegdistError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")


def _settings(dataset: str, classes: Sequence[str], downscale: float, shard_size: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "downscale": downscale,
        "shard_size": shard_size,
    }


def _build_remote(build: Callable[..., BuildResult], first, out_dir: str, prefix: str | None,
                  **kwargs) -> BuildResult:
    """Run `build(first, LOCAL, prefix=..., **kwargs)` into a temporary local folder, then
    upload it to the folder URI `out_dir` (dataset.json last). SegdistError naming the URI
    when it cannot be written (checked before building)."""
    from segdist.storage import check_writable, upload_folder

    check_writable(out_dir, "shard folder")
    prefix = prefix or posixpath.basename(out_dir.rstrip("/"))
    with tempfile.TemporaryDirectory(prefix="segdist-shards-") as tmp:
        result = build(first, os.path.join(tmp, prefix), prefix=prefix, **kwargs)
        upload_folder(result.out_dir, out_dir, last=DATASET_JSON)
    result.out_dir = out_dir
    return result


# ----------------------------------------------------------------------------- one process


def build_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    classes: Sequence[str],
    max_samples_per_shard: int = 64,
    prefix: str | None = None,
    downscale: float = 1.0,
    on_bad: str = "raise",
) -> BuildResult:
    """Write `samples` (in order) as shards PREFIX-000000.tar ... in OUT_DIR, in this process.

    prefix defaults to OUT_DIR's name (shards/voc/train -> train-000000.tar). A bad sample
    (label out of range, size mismatch, undecodable image) raises SegdistError naming it,
    or is skipped, counted and listed in dataset.json with on_bad="skip". Errors raised by
    the iterable itself always propagate.

    Samples carry no file names, so a re-run cannot tell from files whether they changed:
    it hashes each chunk of samples it is given (keys, image bytes, labels) and keeps a
    finished shard only if the hash, keys and settings all match (result.changed counts
    the shards rewritten for a different hash). The iterable is consumed in full on every
    run; build_from_source instead stats the files and loads only the shards it rewrites.
    OUT_DIR may be a URI (module docstring).
    """
    if is_remote(out_dir):
        return _build_remote(build_shards, samples, str(out_dir), prefix, dataset=dataset, classes=classes,
                             max_samples_per_shard=max_samples_per_shard, downscale=downscale, on_bad=on_bad)
    out = Path(out_dir)
    prefix = prefix or out.name
    _check_common(classes, max_samples_per_shard, downscale, on_bad)
    settings = _settings(dataset, classes, downscale, max_samples_per_shard)
    _prepare_out_dir(out, prefix)
    parts = []
    written = reused = changed = 0
    iterator = iter(samples)
    while chunk := list(itertools.islice(iterator, max_samples_per_shard)):
        shard = _shard_name(prefix, len(parts))
        keys = [s.key for s in chunk]
        sources = _samples_digest(chunk)
        part, stale = _load_part(out, shard, keys, settings, sources)
        if part is None:
            part = _write_shard(
                out,
                shard,
                chunk,
                dataset=dataset,
                num_classes=len(classes),
                downscale=downscale,
                on_bad=on_bad,
                chunk_keys=keys,
                settings=settings,
                sources=sources,
            )
            written, changed = written + 1, changed + stale
        else:
            reused += 1
        parts.append(part)
    result = _finalize(out, prefix, parts, dataset=dataset, classes=classes, downscale=downscale)
    result.written, result.reused, result.changed = written, reused, changed
    return result


# ----------------------------------------------------------------------------- many processes


@dataclass
class _BadSample:
    key: str
    reason: str


def _load_samples(source: Source, keys: list[str], on_bad: str):
    for key in keys:
        try:
            yield source.load(key)
        except SegdistError as err:
            if on_bad == "skip":
                yield _BadSample(key, str(err))
            else:
                raise


def _build_chunk(job: tuple) -> dict:
    source, out_dir, shard, keys, sources, dataset, num_classes, downscale, on_bad, settings = job
    return _write_shard(
        Path(out_dir),
        shard,
        _load_samples(source, keys, on_bad),
        dataset=dataset,
        num_classes=num_classes,
        downscale=downscale,
        on_bad=on_bad,
        chunk_keys=keys,
        settings=settings,
        sources=sources,
    )


def _worker_init() -> None:
    # The parent handles Ctrl-C (terminates the pool); workers just die with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _source_keys(source: Source) -> list[str]:
    """source.keys(), checked: a files(key) method, at least one key, no key twice."""
    if not callable(getattr(source, "files", None)):
        raise SegdistError(f"{source}: a source needs files(key) (the files a sample is read from)")
    keys = source.keys()
    if not keys:
        raise SegdistError(f"{source}: no samples listed")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SegdistError(f"{source}: sample key {dup!r} listed twice")
    return keys


def _chunks(keys: list[str], shard_size: int, prefix: str) -> tuple[list[list[str]], list[str]]:
    """The keys of each shard (shard_size at a time, in order) and the shards' names."""
    chunks = [keys[i : i + shard_size] for i in range(0, len(keys), shard_size)]
    return chunks, [_shard_name(prefix, i) for i in range(len(chunks))]


def _run_jobs(jobs: list[tuple], workers: int, on_part: Callable[[dict], None]) -> None:
    """Build every job's shard (in this process when workers == 1), on_part(part) as each ends."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            on_part(_build_chunk(job))
        return
    ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "forkserver")
    pool = ctx.Pool(workers, initializer=_worker_init)
    try:
        for part in pool.imap_unordered(_build_chunk, jobs):
            on_part(part)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _plan(source: Source, out_dir, prefix: str | None, dataset: str, classes: Sequence[str], downscale: float,
          shard_size: int) -> tuple[Path, str, dict, list[list[str]], list[str]]:
    """(out folder, prefix, settings, keys per shard, shard names) of a build from `source`."""
    out = Path(out_dir)
    prefix = prefix or out.name
    chunks, names = _chunks(_source_keys(source), shard_size, prefix)
    return out, prefix, _settings(dataset, classes, downscale, shard_size), chunks, names


def build_from_source(
    source: Source,
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    classes: Sequence[str],
    shard_size: int = 64,
    prefix: str | None = None,
    workers: int | None = None,
    downscale: float = 1.0,
    on_bad: str = "raise",
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build shards from a source's keys with `workers` processes (default: all cores).

    Shard i holds keys[i*shard_size:(i+1)*shard_size] (minus skipped ones), so an
    interrupted build resumes where it stopped: a finished shard is kept when its keys and
    settings are the same and every file source.files(key) names for them has the size and
    st_mtime_ns recorded when it was written; otherwise it is rewritten (counted in
    result.changed when only the files differ). progress(done, total) is called after
    every shard. SegdistError for a source without files(), no keys or a key listed twice.
    OUT_DIR may be a URI (module docstring).
    """
    _check_common(classes, shard_size, downscale, on_bad)
    if is_remote(out_dir):
        return _build_remote(build_from_source, source, str(out_dir), prefix, dataset=dataset, classes=classes,
                             shard_size=shard_size, workers=workers, downscale=downscale, on_bad=on_bad,
                             progress=progress)
    out, prefix, settings, chunks, names = _plan(source, out_dir, prefix, dataset, classes, downscale, shard_size)
    _prepare_out_dir(out, prefix)
    parts: dict[str, dict] = {}
    jobs = []
    changed = 0
    for name, chunk in zip(names, chunks, strict=True):
        sources = _file_stats(source, chunk)
        part, stale = _load_part(out, name, chunk, settings, sources)
        if part is not None:
            parts[name] = part
        else:
            changed += stale
            job = (source, str(out), name, chunk, sources, dataset, len(classes), downscale, on_bad, settings)
            jobs.append(job)
    reused = len(parts)

    def on_part(part: dict) -> None:
        parts[part["shard"]] = part
        if progress:
            progress(len(parts), len(chunks))

    if progress:
        progress(reused, len(chunks))
    _run_jobs(jobs, max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1)), on_part)
    result = _finalize(
        out, prefix, [parts[n] for n in names], dataset=dataset, classes=classes, downscale=downscale
    )
    result.written, result.reused, result.changed = len(jobs), reused, changed
    return result


def shards_up_to_date(
    source: Source,
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    classes: Sequence[str],
    shard_size: int = 64,
    prefix: str | None = None,
    downscale: float = 1.0,
) -> bool:
    """True if OUT_DIR holds a finished build_from_source build (dataset.json present) of
    these arguments that would keep every shard: same shard names, keys and settings, and
    every source file's size and st_mtime_ns as recorded. Stats the files, reads no sample
    and writes nothing. SegdistError as in build_from_source for a bad source."""
    out, _, settings, chunks, names = _plan(source, out_dir, prefix, dataset, classes, downscale, shard_size)
    try:
        info = json.loads((out / DATASET_JSON).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("shards") != names:
        return False
    return all(
        _load_part(out, name, chunk, settings, _file_stats(source, chunk))[0] is not None
        for name, chunk in zip(names, chunks, strict=True)
    )
