"""Stream shards into training and validation batches.

Where the shards live: a local folder, a file:// URL, http(s)://, or any URL pyarrow.fs
(s3://, gs://, hdfs://, abfs://) or fsspec understands; `pipe:CMD` (webdataset) too. s3://
takes its credentials and server (AWS_ENDPOINT_URL) from the environment (segdist.storage).

Training (`train_loader`): every rank gets exactly `batches_per_epoch` batches, whatever the
shard sizes, so DDP never waits on a rank that ran dry. The reading unit is a *slot* = one
DataLoader worker of one rank (rank * loader_workers + worker). With at least as many shards
as slots, every pass over the data deals the shards out anew (a permutation shared by all
slots; slot i takes every slots-th shard): disjoint within a pass, every shard reaching
every slot over passes (resampling with a fixed epoch length). With fewer shards than slots,
every slot reads all shards and keeps the samples whose global index is its own modulo the
slot count; with fewer samples than slots, training slot s reads sample s mod the sample
count (samples repeat, none runs dry). Raw samples pass through a shuffle buffer, are decoded, validated, augmented
straight into the batch arrays. Everything random comes from (seed, epoch, rank,
world_size, loader_workers, worker), so a loader built with the same arguments yields the
same batches, byte for byte.

Validation (`val_loader`): the same split into slots, one pass, no shuffling: every sample
exactly once across all ranks, batch size 1, whole images.

Bad data: a truncated tar, a sample without image or label, an undecodable image, a label
value outside {0..C-1, 255} or an image/label size mismatch raise SegdistError naming the
shard and the sample key; with on_bad_sample="skip" they are skipped and counted
(`loader.num_skipped`, `loader.skipped_keys`), never dropped silently.
"""

from __future__ import annotations

import json
import os
import random
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segdist.data.classes import IGNORE_INDEX
from segdist.data.sample import (
    DATASET_JSON,
    check_label,
    decode_image,
    decode_label_png,
    decode_label_zst,
    invalid_label_lut,
)
from segdist.data.tarstream import TarFormatError, iter_samples, iter_tar
from segdist.data.transforms import EvalTransform, TrainTransform
from segdist.errors import SegdistError
from segdist.storage import filesystem, missing_bucket, reason

_PYARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
READ_BUFFER_BYTES = 8 << 20  # per open remote shard: one request per 8 MiB read


# ----------------------------------------------------------------------------- URLs


def is_url(path: str) -> bool:
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1  # "C:" on Windows is a drive, not a scheme


def join_url(base: str, name: str) -> str:
    base = str(base)
    if base.startswith("pipe:"):
        raise SegdistError(f"{base}: a pipe: command cannot be a shard folder; list shards by URL instead")
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def open_url(url: str):
    """A binary, readable stream for a local path or URL (see the module docstring)."""
    url = str(url)
    parsed = urlparse(url)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""
    try:
        if scheme == "":
            return open(url, "rb")
        if scheme == "file":
            return open(url2pathname(parsed.path), "rb")
        if scheme in ("http", "https"):
            return urllib.request.urlopen(url, timeout=60)
        if scheme == "pipe":
            return wds.gopen(url, "rb")
        if scheme in _PYARROW_SCHEMES:
            fs, path = _pyarrow_filesystem(url)
            # buffered: unbuffered, every small read of the tar reader is one ranged GET
            return fs.open_input_stream(path, buffer_size=READ_BUFFER_BYTES)
        import fsspec

        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        missing = missing_bucket(url) if scheme in _PYARROW_SCHEMES else None
        raise SegdistError(f"{url}: not found" + (f" ({missing})" if missing else "")) from None
    except SegdistError:
        raise
    except Exception as err:
        if scheme in _PYARROW_SCHEMES:
            raise SegdistError(f"{url}: cannot open ({reason(url, err)})") from None
        raise SegdistError(f"{url}: cannot open ({type(err).__name__}: {err})") from None


_FILESYSTEMS: dict[tuple[int, str, str], object] = {}


def _pyarrow_filesystem(url: str):
    """(pyarrow FileSystem, path) for an s3:// etc. URL. s3:// and gs:// keep one file system
    per process and bucket (making one per shard costs a client set-up; a forked loader
    worker makes its own); the others get a new one each time."""
    parsed = urlparse(url)
    if parsed.scheme not in ("s3", "gs", "gcs"):
        return filesystem(url)
    key = (os.getpid(), parsed.scheme, parsed.netloc)
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = filesystem(url)[0]
    return _FILESYSTEMS[key], parsed.netloc + parsed.path


# ----------------------------------------------------------------------------- dataset info


@dataclass(frozen=True)
class DatasetInfo:
    dataset: str
    classes: tuple[str, ...]
    num_samples: int
    shards: tuple[str, ...]  # full paths or URLs
    shard_sizes: tuple[int, ...]
    ignore_index: int = IGNORE_INDEX
    split: str = ""
    root: str = ""
    class_frequency: tuple[float, ...] = ()
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    downscale: float = 1.0
    stats: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_dataset_info(shard_dir: str | os.PathLike) -> DatasetInfo:
    """Read SHARD_DIR/dataset.json (SHARD_DIR: local folder or URL)."""
    shard_dir = str(shard_dir)
    where = join_url(shard_dir, DATASET_JSON)
    if not is_url(shard_dir):
        local = Path(shard_dir)
        if not local.is_dir():
            raise SegdistError(f"no shards in {shard_dir}: folder not found")
        if not (local / DATASET_JSON).is_file():
            if any(local.glob("*.tar")):
                raise SegdistError(
                    f"{where}: missing; the build of {shard_dir} did not finish (re-run `python -m segdist.shards build`)"
                )
            raise SegdistError(f"no shards in {shard_dir}")
    try:
        with open_url(where) as stream:
            meta = json.loads(stream.read().decode("utf-8"))
    except SegdistError as err:
        raise SegdistError(f"no shards in {shard_dir} ({err})") from None
    except ValueError as err:
        raise SegdistError(f"{where}: not valid JSON ({err})") from None
    try:
        names = list(meta["shards"])
        sizes = [int(s) for s in meta.get("shard_sizes", [-1] * len(names))]
        info = DatasetInfo(
            dataset=str(meta["dataset"]),
            classes=tuple(meta["classes"]),
            num_samples=int(meta["num_samples"]),
            shards=tuple(join_url(shard_dir, n) for n in names),
            shard_sizes=tuple(sizes),
            ignore_index=int(meta.get("ignore_index", IGNORE_INDEX)),
            split=str(meta.get("split", "")),
            root=shard_dir,
            class_frequency=tuple(meta.get("class_frequency", ())),
            image_mean=tuple(meta.get("image_mean", ())),
            image_std=tuple(meta.get("image_std", ())),
            downscale=float(meta.get("downscale", 1.0)),
            stats=dict(meta.get("stats", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SegdistError(f"{where}: malformed ({type(err).__name__}: {err})") from None
    if not info.shards or info.num_samples < 1:
        raise SegdistError(f"no shards in {shard_dir} ({where} lists none)")
    if len(info.shard_sizes) != len(info.shards):
        raise SegdistError(f"{where}: shard_sizes does not match shards")
    return info


# ----------------------------------------------------------------------------- reading


class ShardReadError(SegdistError):
    """A shard that cannot be read to its end (truncated, corrupt, unreachable)."""


def iter_shard(url: str, expected: int = -1) -> Iterator[dict]:
    """Raw samples {__key__, __url__, jpg|image.png, label.zst|png, json} of one shard, in order.

    Raises ShardReadError naming the shard and the last good key if the tar is truncated or
    corrupt, or holds fewer samples than `expected` (when >= 0).
    """
    last, count = None, 0

    def members():
        nonlocal last
        for name, data in iter_tar(stream):
            last = name
            yield name, data

    with open_url(url) as stream:
        try:
            for sample in iter_samples(members()):
                count += 1
                sample["__url__"] = url
                yield sample
        except (TarFormatError, OSError, ValueError) as err:
            after = f"after {last!r}" if last else "at its start"
            raise ShardReadError(
                f"{url}: truncated or corrupt tar {after} ({err.args[0] if err.args else err})"
            ) from None
    if 0 <= expected != count:
        raise ShardReadError(
            f"{url}: holds {count} samples but dataset.json says {expected} "
            f"(truncated or replaced shard; last member {last!r})"
        )


def decode_sample(sample: dict, num_classes: int, lut: np.ndarray | None = None):
    """Raw tar sample -> (key, uint8 RGB [H, W, 3] image, uint8 label [H, W]), validated."""
    key = sample.get("__key__")
    shard = sample.get("__url__", "?")
    where = f"{shard} (sample {key!r})"
    image_bytes = sample.get("jpg", sample.get("image.png"))
    if image_bytes is None:
        raise SegdistError(f"{where}: sample has no image (.jpg or .image.png)")
    label_zst = sample.get("label.zst")
    label_png = sample.get("png")  # format 1 shards, and shards written by other tools
    if label_zst is None and label_png is None:
        raise SegdistError(f"{where}: sample has no label (.label.zst or .png)")
    image = decode_image(image_bytes, where)
    if label_zst is not None:
        label = decode_label_zst(label_zst, *image.shape[:2], where)
    else:
        label = decode_label_png(label_png, where)
    if image.shape[:2] != label.shape:
        raise SegdistError(
            f"{where}: image is {image.shape[1]}x{image.shape[0]} but label is {label.shape[1]}x{label.shape[0]}"
        )
    check_label(label, num_classes, where, lut)
    return key, image, label


def _seed_state(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])


@dataclass
class _Slot:
    index: int  # rank * workers + worker
    count: int  # world_size * workers


def _plan(info: DatasetInfo, slot: _Slot) -> tuple[list[int], bool]:
    """Shard indices this slot reads, and whether samples are split by index instead."""
    n = len(info.shards)
    if n >= slot.count:
        return list(range(slot.index, n, slot.count)), False
    return list(range(n)), True


def _reads(index: int, slot: _Slot, num_samples: int, repeat: bool) -> bool:
    """Whether `slot` reads sample `index` (global order) when samples are split by index:
    the slot index mod slots. Training (repeat) with fewer samples than slots deals them
    round again, slot s reading sample s mod num_samples, so no slot runs dry (samples
    repeat, as they do across passes); validation keeps each sample on one slot, so some
    slots read nothing."""
    if repeat and num_samples < slot.count:
        return index == slot.index % num_samples
    return index % slot.count == slot.index


def _shard_offsets(info: DatasetInfo) -> list[int]:
    sizes = info.shard_sizes
    if any(s < 0 for s in sizes):
        raise SegdistError(f"{info.root}: dataset.json lacks shard sizes; rebuild the shards")
    return [int(v) for v in np.cumsum([0, *sizes[:-1]])]


class _SkipLog:
    def __init__(self) -> None:
        self.count = 0
        self.new_keys: list[str] = []

    def add(self, what: str) -> None:
        self.count += 1
        self.new_keys.append(what)

    def take(self) -> dict:
        keys, self.new_keys = self.new_keys, []
        return {"skipped": self.count, "new_keys": tuple(keys)}


def _slot_samples(
    info: DatasetInfo,
    slot: _Slot,
    shard_ids: list[int],
    by_index: bool,
    order_rng: np.random.Generator | None,
    on_bad: str,
    log: _SkipLog,
    repeat: bool,
    pass_seed: tuple[int, ...] = (),
) -> Iterator[dict]:
    """Raw samples of this slot: one pass in order (val), or endless passes (train).

    Training passes (repeat=True) with at least as many shards as slots re-deal the shards
    every pass: a permutation shared by all slots (from pass_seed and the pass number), this
    slot taking every slot.count-th shard of it, read in this slot's own random order. So
    within a pass the slots read disjoint shards, and over passes every shard reaches every
    slot (uneven shard sizes do not bias which samples are seen most).
    """
    offsets = _shard_offsets(info) if by_index else None
    pass_no = empty_passes = 0
    while True:
        if repeat and not by_index:
            deal = np.random.default_rng(_seed_state(*pass_seed, pass_no)).permutation(len(info.shards))
            order = [int(k) for k in deal[slot.index :: slot.count]]
        else:
            order = list(shard_ids)
        if order_rng is not None:
            order_rng.shuffle(order)
        produced = 0
        for k in order:
            try:
                for j, sample in enumerate(iter_shard(info.shards[k], info.shard_sizes[k])):
                    if by_index and not _reads(offsets[k] + j, slot, info.num_samples, repeat):
                        continue
                    produced += 1
                    yield sample
            except ShardReadError as err:
                if on_bad != "skip":
                    raise
                log.add(f"{info.shards[k]}: {err}")
        if not repeat:
            return
        empty_passes = empty_passes + 1 if produced == 0 else 0
        if empty_passes and (by_index or empty_passes >= 8 or len(info.shards) == len(order)):
            raise SegdistError(
                f"{info.root}: no readable samples for rank/worker slot {slot.index} of {slot.count} "
                f"in shards {[os.path.basename(info.shards[k]) for k in order]}"
            )
        pass_no += 1


def _decoded(samples, info: DatasetInfo, on_bad: str, log: _SkipLog):
    lut = invalid_label_lut(info.num_classes)
    for sample in samples:
        try:
            yield decode_sample(sample, info.num_classes, lut)
        except SegdistError as err:
            if on_bad != "skip":
                raise
            log.add(f"{sample.get('__url__', '?')}:{sample.get('__key__')}: {err}")


def _check_on_bad(on_bad_sample: str) -> None:
    if on_bad_sample not in ("raise", "skip"):
        raise SegdistError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")


def _worker_slot(rank: int, world_size: int, loader_workers: int) -> tuple[_Slot, int]:
    wi = get_worker_info()
    worker = wi.id if wi is not None else 0
    workers = max(1, loader_workers)
    return _Slot(rank * workers + worker, world_size * workers), worker


class _TrainStream(IterableDataset):
    def __init__(
        self,
        info,
        *,
        batch_size,
        batches_per_epoch,
        transform,
        seed,
        epoch,
        rank,
        world_size,
        loader_workers,
        shuffle_buffer,
        on_bad_sample,
    ):
        self.info = info
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.transform = transform
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.loader_workers = loader_workers
        self.shuffle_buffer = shuffle_buffer
        self.on_bad = on_bad_sample

    def __iter__(self):
        slot, worker = _worker_slot(self.rank, self.world_size, self.loader_workers)
        workers = max(1, self.loader_workers)
        n_batches = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        if n_batches == 0:
            return
        ss = _seed_state(self.seed, self.epoch, self.rank, self.world_size, workers, worker)
        order_ss, shuffle_ss, aug_ss = ss.spawn(3)
        shard_ids, by_index = _plan(self.info, slot)
        log = _SkipLog()
        raw = _slot_samples(
            self.info,
            slot,
            shard_ids,
            by_index,
            np.random.default_rng(order_ss),
            self.on_bad,
            log,
            repeat=True,
            pass_seed=(self.seed, self.epoch, self.world_size, workers),
        )
        shuffle_rng = random.Random(int(shuffle_ss.generate_state(1)[0]))
        buffer = max(1, self.shuffle_buffer)
        shuffled = wds.shuffle(bufsize=buffer, initial=buffer, rng=shuffle_rng)(raw)
        aug_rng = np.random.default_rng(aug_ss)
        batches = make_batches(
            _decoded(shuffled, self.info, self.on_bad, log), self.transform, self.batch_size, aug_rng
        )
        for done, (images, targets) in enumerate(batches, 1):
            yield images, targets, {"worker": worker, **log.take()}
            if done == n_batches:
                return


def make_batches(decoded, transform: TrainTransform, batch_size: int, rng: np.random.Generator):
    """(key, uint8 RGB image, uint8 label) triples -> (images, targets) tensors of batch_size.

    images: uint8 [B, h, w, 4] and targets uint8 [B, h, w] (float32 [B, C, h, w] for
    edgemix), the format segdist.data.batch converts on the device. Each sample is augmented
    straight into its slot of the batch arrays (no stacking copy). A last partial batch is
    dropped.
    """

    def new_batch():
        return (
            np.empty((batch_size, *transform.image_shape()), dtype=np.uint8),
            np.empty((batch_size, *transform.target_shape()), dtype=transform.target_dtype()),
        )

    images, targets = new_batch()
    filled = 0
    for _key, image, label in decoded:
        transform(image, label, rng, out=(images[filled], targets[filled]))
        filled += 1
        if filled == batch_size:
            yield torch.from_numpy(images), torch.from_numpy(targets)
            images, targets = new_batch()
            filled = 0


class _ValStream(IterableDataset):
    def __init__(self, info, *, rank, world_size, loader_workers, transform, on_bad_sample, with_keys):
        self.info = info
        self.rank, self.world_size = rank, world_size
        self.loader_workers = loader_workers
        self.transform = transform
        self.on_bad = on_bad_sample
        self.with_keys = with_keys

    def __iter__(self):
        slot, worker = _worker_slot(self.rank, self.world_size, self.loader_workers)
        shard_ids, by_index = _plan(self.info, slot)
        log = _SkipLog()
        raw = _slot_samples(self.info, slot, shard_ids, by_index, None, self.on_bad, log, repeat=False)
        for key, image, label in _decoded(raw, self.info, self.on_bad, log):
            img, lab = self.transform(image, label)
            out = (torch.from_numpy(img)[None], torch.from_numpy(lab.astype(np.int64))[None])
            if self.with_keys:
                out = out + (key,)
            yield (*out, {"worker": worker, **log.take()})
        meta = log.take()
        if meta["new_keys"]:
            # skips after the last good sample still have to reach the parent
            yield ("__skips_only__", {"worker": worker, **meta})


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    # one loader worker = one core's work: no intra-op threads that would oversubscribe the
    # cores of the training processes and the other workers (OpenCV's: see segdist/data/__init__.py)
    torch.set_num_threads(1)


class StreamLoader:
    """Iterate to get batches; also knows its length and how many samples were skipped.

    Wraps a torch DataLoader (`.dataloader`). The counters are per iteration (per epoch).
    """

    def __init__(self, dataloader: DataLoader, length: int) -> None:
        self.dataloader = dataloader
        self.length = length
        self._skipped: dict[int, int] = {}
        self.skipped_keys: list[str] = []

    def __len__(self) -> int:
        return self.length

    @property
    def num_skipped(self) -> int:
        return sum(self._skipped.values())

    def __iter__(self):
        self._skipped = {}
        self.skipped_keys = []
        for item in self.dataloader:
            meta = item[-1]
            self._skipped[meta["worker"]] = meta["skipped"]
            self.skipped_keys.extend(meta["new_keys"])
            if isinstance(item[0], str):  # ("__skips_only__", meta)
                continue
            yield tuple(item[:-1])


def _make_loader(
    dataset: IterableDataset, loader_workers: int, length: int, multiprocessing_context, pin_memory=None
) -> StreamLoader:
    kwargs = {}
    if loader_workers > 0:
        kwargs = dict(worker_init_fn=_worker_init, multiprocessing_context=multiprocessing_context)
    if pin_memory is None:  # page-locked batches where a GPU will take them (non_blocking copies)
        pin_memory = torch.cuda.is_available()
    dl = DataLoader(
        dataset, batch_size=None, num_workers=loader_workers, collate_fn=_identity,
        pin_memory=bool(pin_memory), **kwargs,
    )
    return StreamLoader(dl, length)


def _check_common(info: DatasetInfo, rank: int, world_size: int, loader_workers: int) -> None:
    if not info.shards:
        raise SegdistError(f"no shards in {info.root or 'the dataset'}: empty shard list")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {loader_workers}")


def train_loader(
    info: DatasetInfo,
    *,
    transform: TrainTransform,
    batch_size: int,
    batches_per_epoch: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    loader_workers: int = 1,
    shuffle_buffer: int = 256,
    on_bad_sample: str = "raise",
    multiprocessing_context=None,
    pin_memory: bool | None = None,
) -> StreamLoader:
    """Exactly `batches_per_epoch` batches (images, targets) on every rank, each sample
    augmented by `transform` (segdist.data.transforms.TrainTransform, e.g. from_recipe).

    images: uint8 [B, h, w, 4] (R, G, B and the edge map x255; segdist.data.batch turns them
    into normalised float32 on the device). targets: uint8 [B, h, w] in {0..C-1, 255} for label
    modes "hard" and "trimap"; float32 [B, C, h, w] soft targets for "edgemix" (all zero at
    void pixels). (h, w) = the transform's crop. pin_memory: page-locked batches (default: when
    CUDA is available).
    """
    _check_common(info, rank, world_size, loader_workers)
    _check_on_bad(on_bad_sample)
    if batch_size < 1 or batches_per_epoch < 1:
        raise ValueError("batch_size and batches_per_epoch must be at least 1")
    if transform.label_mode == "edgemix" and transform.num_classes != info.num_classes:
        raise SegdistError(f"{info.root}: edgemix targets need the shards' {info.num_classes} classes, "
                           f"the transform has {transform.num_classes}")
    dataset = _TrainStream(
        info,
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        transform=transform,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        loader_workers=loader_workers,
        shuffle_buffer=shuffle_buffer,
        on_bad_sample=on_bad_sample,
    )
    return _make_loader(dataset, loader_workers, batches_per_epoch, multiprocessing_context, pin_memory)


def val_samples_per_rank(info: DatasetInfo, rank: int, world_size: int, loader_workers: int = 1) -> int:
    """How many samples val_loader gives this rank (from dataset.json's shard sizes)."""
    workers = max(1, loader_workers)
    total = 0
    for worker in range(workers):
        slot = _Slot(rank * workers + worker, world_size * workers)
        shard_ids, by_index = _plan(info, slot)
        if not by_index:
            total += sum(info.shard_sizes[k] for k in shard_ids)
        else:
            n = info.num_samples
            total += len(range(slot.index, n, slot.count))
    return total


def val_loader(
    info: DatasetInfo,
    *,
    rank: int,
    world_size: int,
    loader_workers: int = 1,
    edges: bool = False,
    on_bad_sample: str = "raise",
    with_keys: bool = False,
    multiprocessing_context=None,
    pin_memory: bool | None = None,
) -> StreamLoader:
    """Whole images, batch size 1, each sample exactly once across all ranks.

    Yields (image float32 [1, 3|4, H, W], label int64 [1, H, W]) (+ key when with_keys).
    Ranks may get different counts (`val_samples_per_rank`).
    """
    _check_common(info, rank, world_size, loader_workers)
    _check_on_bad(on_bad_sample)
    dataset = _ValStream(
        info,
        rank=rank,
        world_size=world_size,
        loader_workers=loader_workers,
        transform=EvalTransform(edges=edges),
        on_bad_sample=on_bad_sample,
        with_keys=with_keys,
    )
    length = val_samples_per_rank(info, rank, world_size, loader_workers)
    return _make_loader(dataset, loader_workers, length, multiprocessing_context, pin_memory)
