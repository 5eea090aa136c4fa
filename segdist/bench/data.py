"""bench data: samples per second per core of the data pipeline. It trains nothing: the
loader is built with the crop and scale range given on the command line, not from a recipe.

    shards_per_s         train_loader in-process: tar read + decode + validate + augment
    folder_per_s         the same samples read with the VOC reader from the folder, same
                         decode and transforms
    decode_limit_per_s   bare JPEG + PNG decode of the same bytes, already in memory (the limit)

With --remote URI (s3://bucket/prefix; credentials and AWS_ENDPOINT_URL from the
environment) the same shards are uploaded there and streamed from there too, timed by the
wall clock (waiting on the network counts) in turns with the local shards:

    remote_wall_per_s    train_loader over URI, in-process, samples per wall-clock second
    local_wall_per_s     the same over the local shards, in the same rounds
    remote_vs_local      per round, then the median
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable

from segdist.bench.common import cpu_timed_rounds, median
from segdist.bench.machine import cpu_name
from segdist.errors import SegdistError

HELP = "data pipeline throughput (samples/s per core)"
DESCRIPTION = (
    "Throughput of the data pipeline in one process with one thread (= per core): "
    "shards_per_s (train_loader: tar read + decode + validate + augment, in-process), "
    "folder_per_s (the same samples read with the VOC reader from the folder, same "
    "decode and transforms), decode_limit_per_s (bare JPEG + PNG decode of the same bytes, "
    "already in memory). The three are timed in turns, on this process's CPU time (so other "
    "load on the machine does not count), `--repeats` rounds; medians are reported. "
    "Default data: generated images in the VOC layout at VOC's sizes (sides 375-500) with "
    "the log's VOC augmentation (scale 0.5-1.5, crop 321); --min-size 96 --max-size 128 "
    "--crop 96 --scale-range 0.7 1.5 measures at the quick start's sizes."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root", default=None, help="VOC-layout folder to read (default: generate the synthetic set)"
    )
    p.add_argument("--split", default="train", help="split of --root (default train)")
    p.add_argument(
        "--dataset", default="synthetic", choices=["synthetic", "voc"], help="class list of --root"
    )
    p.add_argument("--samples", type=int, default=400, help="synthetic images to generate (default 400)")
    p.add_argument("--min-size", type=int, default=375, help="smallest synthetic image side (default 375)")
    p.add_argument("--max-size", type=int, default=500, help="largest synthetic image side (default 500)")
    p.add_argument("--crop", type=int, default=321, help="training crop size (default 321)")
    p.add_argument(
        "--scale-range", type=float, nargs=2, default=(0.5, 1.5), metavar=("LOW", "HIGH"),
        help="random resize range (default 0.5 1.5)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument(
        "--work-dir", default=None, help="where to put generated data and shards (default: a temp dir)"
    )
    p.add_argument(
        "--remote", default=None, metavar="URI",
        help="also upload the shards to this folder URI (e.g. s3://bucket/bench) and time streaming them "
        "from there against the local ones, by wall clock (credentials and AWS_ENDPOINT_URL from the environment)",
    )


def run(args) -> dict:
    import torch

    if args.samples < args.batch_size or args.repeats < 1:
        raise SegdistError("--samples must be at least --batch-size and --repeats at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenCV is single-threaded already (segdist/data/__init__.py)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root, source, info = _source_and_shards(args, tmp)
        samples = info.num_samples // args.batch_size * args.batch_size
        rates = cpu_timed_rounds(_readers(args, source, info, samples), args.repeats)
        figures = _figures(args, rates, root, samples)
        if args.remote:
            figures.update(_remote_figures(args, info, samples))
    return figures


def _remote_figures(args, info, samples: int) -> dict:
    """Upload the shards of `info` to --remote, then stream `samples` samples from there and
    from the local folder in turns (a warm-up pass each), timed by the wall clock."""
    import time

    from segdist.data.sample import DATASET_JSON
    from segdist.data.stream import read_dataset_info, train_loader
    from segdist.data.transforms import TrainTransform
    from segdist.storage import check_writable, upload_folder

    check_writable(args.remote, "--remote")
    upload_folder(info.root, args.remote, last=DATASET_JSON)
    remote = read_dataset_info(args.remote)
    transform = TrainTransform(args.crop, tuple(args.scale_range))

    def stream(which) -> int:
        loader = train_loader(which, transform=transform, batch_size=args.batch_size,
                              batches_per_epoch=samples // args.batch_size, seed=0, epoch=0, rank=0, world_size=1,
                              loader_workers=0)
        return sum(images.shape[0] for images, _ in loader)

    rates: dict[str, list[float]] = {"remote": [], "local": []}
    stream(remote), stream(info)
    for _ in range(args.repeats):
        for name, which in (("remote", remote), ("local", info)):
            start = time.perf_counter()
            n = stream(which)
            rates[name].append(n / (time.perf_counter() - start))
    return {
        "remote_wall_per_s": round(median(rates["remote"]), 1),
        "local_wall_per_s": round(median(rates["local"]), 1),
        "remote_vs_local": round(median([r / b for r, b in zip(rates["remote"], rates["local"], strict=True)]), 3),
        "remote": args.remote,
        "remote_timer": "wall clock, one thread, rounds in turns",
    }


def _source_and_shards(args, tmp: str):
    """(folder, its VOC reader, the DatasetInfo of its shards): --root, or the synthetic set
    generated in `tmp`, sharded into `tmp`."""
    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.shard_writer import build_from_source
    from segdist.data.stream import read_dataset_info
    from segdist.data.synthetic import write_synthetic_voc
    from segdist.data.voc import VocSource

    classes = DATASET_CLASSES[args.dataset]
    root = args.root
    if root is None:
        root = os.path.join(tmp, "synthetic")
        write_synthetic_voc(root, seed=0, n_train=args.samples, n_val=1, min_size=args.min_size,
                            max_size=args.max_size)
    source = VocSource(root, args.split, classes)
    shard_dir = os.path.join(tmp, "shards", args.split)
    build_from_source(source, shard_dir, dataset=args.dataset, classes=classes, shard_size=64, workers=1)
    return root, source, read_dataset_info(shard_dir)


def _readers(args, source, info, samples: int) -> dict[str, Callable[[], int]]:
    """The ways to read the first `samples` samples, each returning how many it read:
    shards, folder, decode_limit, and shards_no_augment (a diagnosis, not a target)."""
    import numpy as np

    from segdist.data.sample import decode_image, decode_label_png, invalid_label_lut
    from segdist.data.stream import decode_sample, iter_shard, make_batches, train_loader
    from segdist.data.transforms import TrainTransform

    keys = source.keys()[:samples]
    transform = TrainTransform(args.crop, tuple(args.scale_range))

    def shards() -> int:
        loader = train_loader(info, transform=transform, batch_size=args.batch_size,
                              batches_per_epoch=samples // args.batch_size, seed=0, epoch=0, rank=0, world_size=1,
                              loader_workers=0)
        return sum(images.shape[0] for images, _ in loader)

    def folder() -> int:
        def decoded():
            for key in keys:
                sample = source.load(key)  # reads both files, decodes and checks the label
                yield key, decode_image(sample.image_bytes, key), sample.label

        batches = make_batches(decoded(), transform, args.batch_size, np.random.default_rng(0))
        return sum(images.shape[0] for images, _ in batches)

    def shards_no_augment() -> int:
        lut = invalid_label_lut(info.num_classes)
        n = 0
        for url, size in zip(info.shards, info.shard_sizes, strict=True):
            for sample in iter_shard(url, size):
                decode_sample(sample, info.num_classes, lut)
                n += 1
        return n

    raw = [(source.image_path(k).read_bytes(), source.label_path(k).read_bytes()) for k in keys]

    def decode_limit() -> int:
        for image_bytes, label_bytes in raw:
            decode_image(image_bytes, "")
            decode_label_png(label_bytes, "")
        return len(raw)

    return {"shards": shards, "folder": folder, "decode_limit": decode_limit, "shards_no_augment": shards_no_augment}


def _figures(args, rates: dict[str, list[float]], root: str, samples: int) -> dict:
    def ratio(a: str, b: str) -> float:  # per round (same load on the machine), then the median
        return round(median([x / y for x, y in zip(rates[a], rates[b], strict=True)]), 3)

    return {
        "shards_per_s": round(median(rates["shards"]), 1),
        "folder_per_s": round(median(rates["folder"]), 1),
        "decode_limit_per_s": round(median(rates["decode_limit"]), 1),
        # not a target, a diagnosis: shard read + decode + label check, without augmentation
        "shards_no_augment_per_s": round(median(rates["shards_no_augment"]), 1),
        "shards_vs_folder": ratio("shards", "folder"),
        "shards_vs_decode_limit": ratio("shards", "decode_limit"),
        "samples": samples,
        "image_sizes": [args.min_size, args.max_size] if args.root is None else None,
        "crop": args.crop,
        "scale_range": list(args.scale_range),
        "batch_size": args.batch_size,
        "data": "synthetic (generated)" if args.root is None else os.path.abspath(root),
        "threads": 1,
        "timer": "process CPU time, one thread, rounds in turns",
        "repeats": args.repeats,
        "cpu": cpu_name(),
    }
