"""python -m segdist.bench: performance figures as JSON.

Subcommands (one function pair each: `_add_<name>(subparsers)` builds its parser,
`_run_<name>(args) -> dict` measures; add new ones to SUBCOMMANDS):

    data   samples per second per core: shards (read + decode + augment), the same samples
           from the raw VOC-layout folder with the same transforms, and bare JPEG + PNG
           decode of the same files (the limit)

All figures are measured on this machine when the command runs; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from segdist.errors import SegdistError, exit_on_user_error

# ----------------------------------------------------------------------------- data


def _add_data(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "data",
        help="data pipeline throughput (samples/s per core)",
        description="Throughput of the data pipeline in one process with one thread (= per core): "
        "shards_per_s (train_loader: tar read + decode + validate + augment, in-process), "
        "folder_per_s (the same samples read with the VOC reader from the folder, same "
        "decode and transforms), decode_limit_per_s (bare JPEG + PNG decode of the same bytes, "
        "already in memory). Default data: the generated synthetic set.",
    )
    p.add_argument(
        "--root", default=None, help="VOC-layout folder to read (default: generate the synthetic set)"
    )
    p.add_argument("--split", default="train", help="split of --root (default train)")
    p.add_argument(
        "--dataset", default="synthetic", choices=["synthetic", "voc"], help="class list of --root"
    )
    p.add_argument("--samples", type=int, default=600, help="synthetic images to generate (default 600)")
    p.add_argument("--min-size", type=int, default=96, help="smallest synthetic image side (default 96)")
    p.add_argument("--max-size", type=int, default=128, help="largest synthetic image side (default 128)")
    p.add_argument("--crop", type=int, default=96, help="training crop size (default 96)")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.7, 1.5), metavar=("LOW", "HIGH"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per figure; the median is reported")
    p.add_argument(
        "--work-dir", default=None, help="where to put generated data and shards (default: a temp dir)"
    )
    return p


def _timed(fn: Callable[[], int], repeats: int) -> float:
    """Median samples/s over `repeats` runs of fn (which returns the samples it handled), after a warm-up."""
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _run_data(args) -> dict:
    import numpy as np
    import torch

    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.sample import decode_image, decode_label_png, invalid_label_lut
    from segdist.data.shard_writer import build_from_source
    from segdist.data.stream import decode_sample, iter_shard, make_batches, read_dataset_info, train_loader
    from segdist.data.synthetic import write_synthetic_voc
    from segdist.data.transforms import TrainTransform
    from segdist.data.voc import VocSource

    torch.set_num_threads(1)
    if args.samples < args.batch_size or args.repeats < 1:
        raise SegdistError("--samples must be at least --batch-size and --repeats at least 1")
    classes = DATASET_CLASSES[args.dataset]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "synthetic")
            write_synthetic_voc(
                root, seed=0, n_train=args.samples, n_val=1, min_size=args.min_size, max_size=args.max_size
            )
        source = VocSource(root, args.split, classes)
        keys = source.keys()
        shard_dir = os.path.join(tmp, "shards", args.split)
        build_from_source(source, shard_dir, dataset=args.dataset, classes=classes, shard_size=64, workers=1)
        info = read_dataset_info(shard_dir)
        n_batches = info.num_samples // args.batch_size
        transform = TrainTransform(args.crop, tuple(args.scale_range))

        def shards() -> int:
            loader = train_loader(
                info,
                batch_size=args.batch_size,
                batches_per_epoch=n_batches,
                crop_size=args.crop,
                scale_range=tuple(args.scale_range),
                seed=0,
                epoch=0,
                rank=0,
                world_size=1,
                loader_workers=0,
            )
            return sum(images.shape[0] for images, _ in loader)

        def folder() -> int:
            def decoded():
                for key in keys[: n_batches * args.batch_size]:
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

        raw = [
            (source.image_path(k).read_bytes(), source.label_path(k).read_bytes())
            for k in keys[: n_batches * args.batch_size]
        ]

        def decode_limit() -> int:
            for image_bytes, label_bytes in raw:
                decode_image(image_bytes, "")
                decode_label_png(label_bytes, "")
            return len(raw)

        result = {
            "shards_per_s": round(_timed(shards, args.repeats), 1),
            "folder_per_s": round(_timed(folder, args.repeats), 1),
            "decode_limit_per_s": round(_timed(decode_limit, args.repeats), 1),
        }
        # not a target, a diagnosis: shard read + decode + label check, without augmentation
        result["shards_no_augment_per_s"] = round(_timed(shards_no_augment, args.repeats), 1)
        result.update(
            {
                "shards_vs_folder": round(result["shards_per_s"] / result["folder_per_s"], 3),
                "shards_vs_decode_limit": round(result["shards_per_s"] / result["decode_limit_per_s"], 3),
                "samples": n_batches * args.batch_size,
                "image_sizes": [args.min_size, args.max_size] if args.root is None else None,
                "crop": args.crop,
                "scale_range": list(args.scale_range),
                "batch_size": args.batch_size,
                "data": "synthetic (generated)" if args.root is None else os.path.abspath(root),
                "threads": 1,
                "cpu": _cpu_name(),
            }
        )
        return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- CLI

# name -> (add parser, run); others add "train", "ray", "scale", "gpu" here.
SUBCOMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], dict]]] = {
    "data": (_add_data, _run_data),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.bench",
        description="Measure segdist's performance figures and print them (JSON with --json).",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (default: key = value lines)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _run in SUBCOMMANDS.values():
        p = add(sub)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _add, run = SUBCOMMANDS[args.command]
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
