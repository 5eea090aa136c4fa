"""python -m segdist.shards: make and check webdataset shards.

synth    write the generated data set in the VOC layout
build    turn a dataset folder (VOC, SBD, Cityscapes, synthetic) into shards
inspect  read every shard of a built folder and print a summary
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from segdist.errors import SegdistError, exit_on_user_error


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _add_synth_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `synth` sub-command's arguments to its parser p."""
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train", type=_positive_int, default=600, help="number of train images (default 600)")
    p.add_argument("--val", type=_positive_int, default=150, help="number of val images (default 150)")


def _add_build_source_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `build` sub-command's arguments that say what to read and where to write it to
    its parser p."""
    p.add_argument(
        "--dataset",
        required=True,
        choices=["voc", "sbd", "cityscapes", "synthetic"],
        help="source layout (synthetic = the VOC layout written by `synth`)",
    )
    p.add_argument(
        "--root",
        required=True,
        help="dataset folder: VOC2012 for voc/synthetic and for --split train_aug; SBD's "
        "benchmark_RELEASE for sbd train/val; the folder holding leftImg8bit/ and gtFine/ for cityscapes",
    )
    p.add_argument("--split", required=True, help="split name, e.g. train, val (VOC/SBD also train_aug)")
    p.add_argument("--out", required=True,
                   help="output folder, e.g. shards/voc/train, or a URI such as s3://bucket/shards/voc/train "
                   "(built in a temporary local folder, then uploaded, dataset.json last; credentials "
                   "and AWS_ENDPOINT_URL from the environment)")
    p.add_argument(
        "--sbd-root",
        default=None,
        help="with --split train_aug: the SBD folder (benchmark_RELEASE[/dataset]); without it, "
        "ROOT/SegmentationClassAug/ is used",
    )


def _add_build_option_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `build` sub-command's arguments that say how to build (shard size, processes,
    downscale, bad samples, progress lines) to its parser p."""
    p.add_argument("--shard-size", type=_positive_int, default=64, help="samples per shard (default 64)")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--downscale",
        type=_fraction,
        default=1.0,
        help="resize factor applied at build time, e.g. 0.5 for half-resolution Cityscapes "
        "(default 1: original bytes)",
    )
    p.add_argument(
        "--on-bad",
        choices=["raise", "skip"],
        default="raise",
        help="a bad source sample stops the build (raise, default) or is skipped, counted "
        "and listed in dataset.json (skip)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `inspect` sub-command's arguments to its parser p."""
    p.add_argument("path", help="shard folder (local path or URL)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.shards",
        description="Make and check the webdataset shards that segdist trains from.",
        epilog="Example: python -m segdist.shards synth --out data/synthetic && "
        "python -m segdist.shards build --dataset synthetic --root data/synthetic --split train "
        "--out shards/synthetic/train",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth",
        help="write the generated data set in the VOC layout",
        description="Write the generated (synthetic) data set in the PASCAL VOC layout: "
        "JPEGImages/, SegmentationClass/ (palette PNG, 255 = ignore) and "
        "ImageSets/Segmentation/{train,val}.txt. Deterministic from --seed.",
    )
    _add_synth_arguments(p)

    p = sub.add_parser(
        "build",
        help="turn a dataset folder into shards",
        description="Read a dataset folder with its real reader and write webdataset .tar "
        "shards, manifest.parquet and dataset.json into --out. Uses all cores; safe to "
        "interrupt and re-run (finished shards are kept unless a file they were read from "
        "changed size or modification time).",
    )
    _add_build_source_arguments(p)
    _add_build_option_arguments(p)

    p = sub.add_parser(
        "inspect",
        help="check every shard of a built folder",
        description="Read every shard listed in PATH/dataset.json: sample counts, "
        "decodability, label range, agreement with manifest.parquet. Exit status 2 "
        "if anything is wrong.",
    )
    _add_inspect_arguments(p)
    return parser


def _cmd_synth(args) -> int:
    from segdist.data.synthetic import write_synthetic_voc

    start = time.perf_counter()
    write_synthetic_voc(args.out, seed=args.seed, n_train=args.train, n_val=args.val)
    print(
        f"wrote {args.train} train + {args.val} val images to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _build_counts(result) -> str:
    """'3 written (1 because its sources changed), 2 kept from an earlier run'."""
    changed = ""
    if result.changed:
        whose = "its sources" if result.changed == 1 else "their sources"
        changed = f" ({result.changed} because {whose} changed)"
    return f"{result.written} written{changed}, {result.reused} kept from an earlier run"


def _cmd_build(args) -> int:
    from segdist.data.classes import DATASET_CLASSES
    from segdist.data.shard_writer import build_from_source
    from segdist.data.sources import make_source

    if not os.path.isdir(args.root):
        raise SegdistError(f"{args.root}: dataset folder not found")
    source = make_source(args.dataset, args.root, args.split, sbd_root=args.sbd_root)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\r{done}/{total} shards", end="", file=sys.stderr, flush=True)

    try:
        result = build_from_source(
            source,
            args.out,
            dataset=args.dataset,
            classes=DATASET_CLASSES[args.dataset],
            shard_size=args.shard_size,
            prefix=os.path.basename(os.path.normpath(args.out)),
            workers=args.workers,
            downscale=args.downscale,
            on_bad=args.on_bad,
            progress=progress,
        )
    finally:
        if not args.quiet:
            print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(
        f"{result.num_samples} samples in {len(result.shards)} shards at {args.out} "
        f"({_build_counts(result)}) in {elapsed:.1f} s"
    )
    if result.skipped_keys:
        shown = ", ".join(result.skipped_keys[:10])
        more = f" and {len(result.skipped_keys) - 10} more" if len(result.skipped_keys) > 10 else ""
        print(
            f"skipped {len(result.skipped_keys)} bad sample(s): {shown}{more} "
            f"(reasons in {args.out.rstrip('/')}/dataset.json)"
        )
    return 0


def _cmd_inspect(args) -> int:
    from segdist.data.check import inspect_shards

    report = inspect_shards(args.path)
    summary = report.as_dict()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"{args.path}: dataset {report.dataset}, split {report.split}, {report.shards} shards, "
            f"{report.samples}/{report.expected_samples} samples readable"
        )
        if report.min_size:
            print(
                f"image sizes {report.min_size[0]}x{report.min_size[1]} .. "
                f"{report.max_size[0]}x{report.max_size[1]}"
            )
        freq = ", ".join(f"{c} {f:.4f}" for c, f in summary["class_frequency"].items())
        print(f"class pixel frequency: {freq}")
        if report.skipped_at_build:
            print(f"{report.skipped_at_build} sample(s) were skipped at build time (see dataset.json)")
        for problem in report.problems:
            print(f"problem: {problem}")
    if report.problems:
        raise SegdistError(f"{args.path}: {len(report.problems)} problem(s); first: {report.problems[0]}")
    if not args.json:
        print("ok")
    return 0


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        return _cmd_synth(args)
    if args.command == "build":
        return _cmd_build(args)
    return _cmd_inspect(args)


if __name__ == "__main__":
    sys.exit(main())
