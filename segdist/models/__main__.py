"""`python -m segdist.models describe VARIANT`: parameter count, fp32 size and GFLOPs."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from segdist.errors import SegdistError, exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.models",
        description="Inspect the segmentation models that segdist builds from a variant name "
        "(e.g. naked, aspp, naked.fpn.learnable.sobel.channelwise.1order).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "describe",
        help="print parameter count, fp32 size (MiB) and GFLOPs of one forward",
        description="Build VARIANT on the meta device (no memory, no compute) and print "
        '{"variant", "params", "size_mb", "gflops"}. size_mb = params x 4 bytes / 2**20; '
        "gflops = FLOPs (multiply-add = 2) of one forward of a 1x3xSxS image.",
    )
    d.add_argument("variant", help="variant name, dot-separated tokens as in the results log")
    d.add_argument("--classes", type=int, default=21, help="number of classes (default 21, VOC; Cityscapes 19)")
    d.add_argument("--size", type=int, default=321, help="square input size S for the FLOP count (default 321)")
    d.add_argument("--depth", type=int, default=101, help="ResNet depth: 18, 34, 50, 101, 152 (default 101)")
    d.add_argument("--width", type=int, default=64, help="ResNet stem width (default 64, the real network)")
    d.add_argument("--output-stride", type=int, default=None,
                   help="8, 16 or 32 (default: the protocol's for the variant; FPN/GCN/resnet101 use 32)")
    d.add_argument("--protocol", choices=("deeplab", "original"), default="deeplab",
                   help="resolve the variant as DeepLab's recipe (default) or as the original script did "
                   "(segdist.protocols): module formulas, biases and output stride follow it")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of aligned text")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from segdist.models import build_model, describe_model
    from segdist.resolve import resolve_recipe

    if args.classes < 1:
        raise SegdistError(f"--classes must be at least 1, got {args.classes}")
    if args.size < 16:
        raise SegdistError(f"--size must be at least 16, got {args.size}")
    if args.width < 1:
        raise SegdistError(f"--width must be positive, got {args.width}")
    values = {"model.variant": args.variant, "model.width": args.width, "model.pretrained": None}
    if args.depth != 101:
        values["model.depth"] = args.depth
    if args.output_stride is not None:
        values["model.output_stride"] = args.output_stride
    recipe = resolve_recipe(values, args.protocol, "describe")
    with torch.device("meta"):
        model = build_model(recipe.model, args.classes, load_pretrained=False)
    info = {"variant": args.variant, "protocol": args.protocol,
            **describe_model(model, args.classes, input_size=args.size)}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>8}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
