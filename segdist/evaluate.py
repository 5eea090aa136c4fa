"""The `python -m segdist.evaluate` command line (run from the shell, the README's recipes,
tune_spaces/crf_grid.yaml's --save-probs step and the tests; code imports
segdist.evaluation instead):

    # a checkpoint over validation shards (model rebuilt from the checkpoint's config)
    python -m segdist.evaluate --checkpoint CKPT --shards DIR_OR_URL \\
        [--scales 0.5,0.75,1,1.25,1.5] [--flip] [--crf] [--boundary 11,15,19] [--json]
        [--save-probs DIR] [--save-pred DIR] [--pictures DIR]
    # folders of label PNGs in the dataset's official format
    python -m segdist.evaluate --pred-dir P --gt-dir G --dataset voc|cityscapes [--json]
        [--pred-ids auto|label|train]   # Cityscapes: labelIds (default) or trainIds

(Seconds per image of these stages: `python -m segdist.bench eval`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from segdist.boundary import DEFAULT_KERNELS, check_kernels
from segdist.crf import CrfParams, CrfPool
from segdist.errors import SegdistError, exit_on_user_error
from segdist.evaluation.checkpoint import check_classes_match, load_model
from segdist.evaluation.folders import CITYSCAPES_PRED_IDS, score_folders
from segdist.evaluation.loop import evaluate_split, save_probabilities
from segdist.evaluation.results import Accumulator, EvalResult, summarize
from segdist.evaluation.sinks import (
    CrfPostProcessor,
    ExampleCollector,
    PredictionPngWriter,
    PredictionSink,
    Sinks,
)
from segdist.evaluation.text import format_summary
from segdist.metrics import json_safe

PICTURE_EXAMPLES = 4  # overlays.png rows of --pictures


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after '=', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.evaluate",
        description="Score a checkpoint over validation shards (whole image or multi-scale + flip "
        "sliding window, optional DenseCRF and boundary statistics), or score folders of predicted "
        "label PNGs against ground truth in the dataset's official format.",
        epilog="Examples:\n"
        "  python -m segdist.evaluate --checkpoint ckpt.pt --shards shards/voc/val --scales 0.5,0.75,1,1.25,1.5 "
        "--flip --boundary --json\n"
        "  python -m segdist.evaluate --pred-dir results --gt-dir cityscapes/gtFine/val --dataset cityscapes --json\n"
        "Seconds per image of the evaluation stages: python -m segdist.bench eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _mode_arguments(parser.add_argument_group("what to score (one of)"))
    _checkpoint_arguments(parser.add_argument_group("checkpoint scoring"))
    _folder_arguments(parser.add_argument_group("folder scoring"))
    _output_arguments(parser.add_argument_group("output"))
    return parser


def _mode_arguments(mode) -> None:
    mode.add_argument("--checkpoint", help="checkpoint.pt written by training (model rebuilt from its config)")
    mode.add_argument("--pred-dir", help="folder of predicted label PNGs (VOC indices or VOC colours / Cityscapes "
                      "labelIds, or trainIds with --pred-ids train)")


def add_inference_arguments(group) -> None:
    """The inference options evaluate --checkpoint and segdist.predict share: MSF scales,
    flip, tiles, DenseCRF, device and autocast (what none says, the checkpoint's recipe does)."""
    group.add_argument("--scales", type=_float_list, default=None,
                       help="comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5 (default: the checkpoint's recipe, "
                       "eval.scales)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="also average the left-right mirrored prediction (default: the recipe's eval.flip)")
    group.add_argument("--tile", type=int, default=None,
                       help="sliding-window tile size in pixels (1/3 overlap); 0 = whole image per scale "
                       "(default: the recipe's eval.tile)")
    group.add_argument("--tile-batch", type=int, default=4, help="tiles per forward pass (default 4)")
    group.add_argument("--crf", action="store_true", help="DenseCRF on the MSF probabilities")
    group.add_argument("--crf-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="CRF parameter (iter_max, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std); "
                       "repeatable; defaults: DeepLab's 10, 3, 1, 4, 67, 3")
    group.add_argument("--crf-workers", type=int, default=None,
                       help="CRF processes (default: CPUs - 1)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    group.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (GPU)")


def _checkpoint_arguments(ck) -> None:
    ck.add_argument("--shards", help="validation shard folder or URL (with dataset.json)")
    add_inference_arguments(ck)
    ck.add_argument("--save-probs", metavar="DIR",
                    help="also write float16 probabilities + image + label per sample (input of the CRF grid)")
    ck.add_argument("--save-pred", metavar="DIR",
                    help="also write predicted label PNGs in the official format (<key>.png)")
    ck.add_argument("--pictures", metavar="DIR", help="also write confusion_matrix.png and overlays.png")
    ck.add_argument("--loader-workers", type=int, default=1, help="shard reading processes (default 1)")
    ck.add_argument("--limit", type=int, default=0, help="score only the first N images (quick look)")


def _folder_arguments(fo) -> None:
    fo.add_argument("--gt-dir", help="ground-truth folder (VOC SegmentationClass / Cityscapes gtFine/val)")
    fo.add_argument("--dataset", choices=("voc", "cityscapes"), help="format of both folders")
    fo.add_argument("--list", dest="id_list", metavar="FILE",
                    help="VOC: score only the names in this list (e.g. ImageSets/Segmentation/val.txt); "
                    "default: every PNG below --gt-dir")
    fo.add_argument("--pred-ids", choices=CITYSCAPES_PRED_IDS, default=None,
                    help="Cityscapes: what the predictions hold: label = labelIds (the official format), "
                    "train = trainIds 0..18 (255: no class), as an argmax gives; auto (default) = labelIds, "
                    "but a folder with values 0..18 only is refused as trainIds")


def _output_arguments(common) -> None:
    common.add_argument("--boundary", type=_int_list, nargs="?", const=DEFAULT_KERNELS, default=None,
                        metavar="K,K,...", help="boundary/inner statistics for these odd kernel sizes "
                        "(--boundary alone: 11,15,19; default: none, or the checkpoint recipe's "
                        "eval.boundary_kernels)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SegdistError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegdistError("--device cuda: no CUDA device available")
    return device


def _check_checkpoint_args(args) -> CrfParams | None:
    """SegdistError for checkpoint flags that cannot work; fills in --crf-workers; returns
    the CRF parameters (None without --crf)."""
    if not args.shards:
        raise SegdistError("--checkpoint needs --shards (the validation shards to score on)")
    if args.tile is not None and args.tile < 0:
        raise SegdistError(f"--tile must be >= 0, got {args.tile}")
    if args.crf_workers is None:
        args.crf_workers = max(1, (os.cpu_count() or 1) - 1)
    if args.tile_batch < 1 or args.crf_workers < 0 or args.limit < 0:
        raise SegdistError("--tile-batch must be >= 1, --crf-workers and --limit >= 0")
    crf = CrfParams.from_dict(dict(args.crf_param), "--crf-param") if args.crf else None
    if args.crf_param and not args.crf:
        raise SegdistError("--crf-param given without --crf")
    return crf


def _evaluation_options(args, own) -> dict[str, Any]:
    """evaluate_split's keyword arguments: the flags, and for what they do not say the
    checkpoint recipe's evaluation `own` (segdist.recipe.EvalRecipe)."""
    tile = own.tile if args.tile is None else (args.tile, args.tile) if args.tile else None
    return dict(
        scales=own.scales if args.scales is None else args.scales,
        flip=own.flip if args.flip is None else args.flip,
        tile_size=tile,
        tile_batch=args.tile_batch,
        boundary_kernels=check_kernels(own.boundary_kernels if args.boundary is None else args.boundary),
        amp_dtype={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp],
        limit=args.limit,
    )


def _prediction_sinks(args, dataset: str, examples: ExampleCollector) -> PredictionSink | None:
    """Where the final predictions go: --save-pred PNGs and --pictures examples."""
    sinks = [PredictionPngWriter(args.save_pred, dataset)] if args.save_pred else []
    if args.pictures:
        sinks.append(examples)
    return Sinks(*sinks) if sinks else None


def _evaluate(model, loader, classes, device, args, crf: CrfParams | None, options: dict[str, Any],
              sink: PredictionSink | None, meta: dict[str, Any]) -> EvalResult:
    """The checkpoint's EvalResult: of the MSF argmax, or with `crf` of the CRF labels (the
    MSF argmax as before_crf). With --save-probs the probabilities go to that folder too."""
    with CrfPool(args.crf_workers if crf is not None else 0) as pool:
        post = None
        if crf is not None:  # the boundary statistics are the CRF labels'
            scores = Accumulator(len(classes), device, options["boundary_kernels"])
            sink = post = CrfPostProcessor(pool, crf, scores, then=sink)
            options = {**options, "boundary_kernels": ()}
        if args.save_probs:
            result = save_probabilities(model, loader, args.save_probs, classes, device, meta=meta, sink=sink,
                                        **options)
        else:
            result = evaluate_split(model, loader, len(classes), device, sink=sink, **options)
    return result if post is None else post.result(result)


def _write_pictures(folder: Path, confusion: torch.Tensor, classes, examples: list) -> None:
    from segdist.visualize import confusion_matrix_png, overlays_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "confusion_matrix.png").write_bytes(confusion_matrix_png(confusion, classes))
    if examples:
        (folder / "overlays.png").write_bytes(overlays_png(examples, classes))


def _run_checkpoint(args) -> dict[str, Any]:
    from segdist.data.stream import read_dataset_info, val_loader

    crf = _check_checkpoint_args(args)
    device = _pick_device(args.device)
    info = read_dataset_info(args.shards)
    trained = load_model(args.checkpoint, device=device)
    model, trial, classes = trained.model, trained.trial, trained.classes
    check_classes_match(classes, info, args.checkpoint)
    options = _evaluation_options(args, trial.recipe.eval)
    loader = val_loader(
        info, rank=0, world_size=1, loader_workers=args.loader_workers,
        edges=bool(getattr(model, "needs_edges", False)), with_keys=True,
    )
    examples = ExampleCollector(PICTURE_EXAMPLES if args.pictures else 0)
    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "shards": str(args.shards), "dataset": info.dataset}
    started = time.perf_counter()
    result = _evaluate(model, loader, classes, device, args, crf, options,
                       _prediction_sinks(args, info.dataset, examples), meta)
    elapsed = time.perf_counter() - started
    summary = summarize(result, classes)
    tile = options["tile_size"]
    summary.update({
        "checkpoint": str(args.checkpoint), "shards": str(args.shards), "dataset": info.dataset,
        "variant": trial.recipe.model.variant, "scales": list(options["scales"]), "flip": bool(options["flip"]),
        "tile_size": list(tile) if tile else None, "crf": dataclasses.asdict(crf) if crf is not None else None,
        "seconds_per_image": round(elapsed / max(result.num_images, 1), 4),
    })
    if args.pictures:
        _write_pictures(Path(args.pictures), result.confusion, classes, examples.examples)
    return summary


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.pred_dir):
        parser.error("give exactly one of --checkpoint, --pred-dir")
    if args.pred_dir:
        if not args.gt_dir or not args.dataset:
            raise SegdistError("--pred-dir needs --gt-dir and --dataset voc|cityscapes")
        summary = score_folders(
            args.pred_dir, args.gt_dir, args.dataset, boundary_kernels=args.boundary or (), id_list=args.id_list,
            pred_ids=args.pred_ids,
        )
    else:
        summary = _run_checkpoint(args)
    if args.json:
        print(json.dumps(json_safe(summary), indent=1))
    else:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
