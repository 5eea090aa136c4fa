"""The `python -m segdist.predict` command line: a checkpoint's predictions for a folder of
JPEG/PNG images without labels, written as label PNGs in an official format or as overlays.

    python -m segdist.predict --checkpoint CKPT --images DIR --out DIR \\
        [--format auto|voc|cityscapes|palette|overlay] [--scales 0.5,0.75,1] [--flip] [--tile T]
        [--crf [--crf-param KEY=VALUE ...]] [--device cpu|cuda] [--threads N] [--overwrite] [--json]

What is written, per input <DIR>/<sub>/<name>.jpg|.jpeg|.png (any depth; the sub-folders
are kept under --out):

    voc         <sub>/<name>.png: class indices 0..20 as a palette PNG in the VOC colour map
                (what the VOC evaluation server and devkit read); a 21-class VOC checkpoint
    cityscapes  <sub>/<core>_pred_labelIds.png: labelIds 0..33 (grayscale, uint8), <core> the
                name without its _leftImg8bit (the test server's format: cityscapesScripts
                finds <city>_<seq>_<frame>*.png); a 19-class Cityscapes checkpoint
    palette     <sub>/<name>.png: class indices in the VOC colour map, any class count
    overlay     <sub>/<name>.png: the class colours blended over the image (RGB)
    auto        voc or cityscapes for those checkpoints' classes, palette otherwise

Inference is segdist.msf.MultiScaleInference (what no flag says, the checkpoint recipe's
eval part does); --crf adds DenseCRF (segdist.crf) in a process pool. Images are decoded
with OpenCV and normalised as in training (segdist.data.transforms.EvalTransform).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segdist.crf import CrfParams, CrfPool
from segdist.data.classes import CITYSCAPES_CLASSES, VOC_CLASSES
from segdist.data.sample import decode_image
from segdist.data.transforms import EvalTransform
from segdist.errors import SegdistError, exit_on_user_error
from segdist.evaluate import _pick_device, add_inference_arguments  # the CLI conventions of evaluate
from segdist.evaluation.checkpoint import TrainedModel, load_model
from segdist.evaluation.sinks import (
    CrfPostProcessor,
    OverlayWriter,
    PredictionPngWriter,
    PredictionSink,
    Sample,
)
from segdist.msf import MultiScaleInference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMATS = ("auto", "voc", "cityscapes", "palette", "overlay")
FORMAT_CLASSES = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}
CITYSCAPES_IMAGE_TAG = "_leftImg8bit"  # <city>_<seq>_<frame>_leftImg8bit.png
CITYSCAPES_PRED_TAG = "_pred_labelIds"
PREFETCH = 4  # images decoded ahead of the model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.predict",
        description="Predict a folder of JPEG/PNG images (no labels) with a training checkpoint: whole image "
        "or multi-scale + flip (+ DenseCRF), written as VOC palette PNGs, Cityscapes labelIds PNGs (the test "
        "server's format), palette PNGs of any class set, or colour overlays.",
        epilog="Examples:\n"
        "  python -m segdist.predict --checkpoint ckpt.pt --images VOC2012/test/JPEGImages --out results "
        "--scales 0.5,0.75,1 --flip --crf\n"
        "  python -m segdist.predict --checkpoint ckpt.pt --images leftImg8bit/test --out results "
        "--format cityscapes\n"
        "  python -m segdist.predict --checkpoint ckpt.pt --images photos --out overlays --format overlay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt written by training, or a folder holding one (model rebuilt from it)")
    parser.add_argument("--images", required=True, help="folder of .jpg/.jpeg/.png images (searched at any depth)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new unless --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="voc: VOC palette PNGs; cityscapes: labelIds PNGs; palette: class indices in the VOC "
                        "colour map; overlay: colours over the image; auto (default): voc or cityscapes for those "
                        "checkpoints, else palette")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out folder that is not empty")
    _inference_arguments(parser.add_argument_group("inference"))
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it goes to stderr)")
    return parser


def _inference_arguments(group) -> None:
    add_inference_arguments(group)
    group.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: all CPUs; on a machine busy with "
                       "other jobs fewer, even 1, can be much faster)")


# ----------------------------------------------------------------------------- checking the input


def find_images(folder: str | os.PathLike, skip: str | os.PathLike | None = None) -> list[Path]:
    """The .jpg/.jpeg/.png files (any case) below `folder`, at any depth, sorted; hidden
    files and folders, and anything below `skip` (an output folder inside it), left out.
    SegdistError naming the folder when it is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegdistError(f"{folder}: images folder not found" if not folder.exists() else f"{folder}: not a folder")
    skip = Path(skip).resolve() if skip is not None else None
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (skip is None or Path(root, d).resolve() != skip)]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise SegdistError(f"{folder}: no images (.jpg, .jpeg or .png files, searched at any depth)")
    return sorted(found)


def output_keys(images: Sequence[Path], folder: Path, fmt: str) -> list[str]:
    """Each image's output path below --out, without .png: its path relative to `folder`
    without the suffix; for cityscapes with _leftImg8bit replaced by _pred_labelIds (or the
    latter appended). SegdistError naming both files when two images get the same name."""
    keys, seen = [], {}
    for path in images:
        rel = path.relative_to(folder).with_suffix("")
        if fmt == "cityscapes":
            stem = rel.name.removesuffix(CITYSCAPES_IMAGE_TAG)
            rel = rel.with_name(stem + CITYSCAPES_PRED_TAG)
        key = rel.as_posix()
        if key in seen:
            raise SegdistError(f"{path}: its prediction {key}.png would overwrite that of {seen[key]}; rename one")
        seen[key] = path
        keys.append(key)
    return keys


def check_readable(images: Sequence[Path]) -> None:
    """SegdistError naming the first file that cannot be opened as an image (its header is
    read; a file truncated further on is found when it is decoded)."""
    for path in images:
        try:
            Image.open(path).close()  # parses the header
        except Exception as err:  # PIL: UnidentifiedImageError, OSError, SyntaxError, ...
            raise SegdistError(f"{path}: cannot read image ({err})") from None


def check_out_folder(out: str | os.PathLike, overwrite: bool, images: str | os.PathLike) -> Path:
    """The output folder, refused (SegdistError) when it is a file, the `images` folder
    itself (its PNGs would be replaced), or a folder that is not empty and `overwrite` is false."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SegdistError(f"{out}: output folder is a file")
    if out.resolve() == Path(images).resolve():
        raise SegdistError(f"{out}: output folder is the images folder; predictions would replace its PNGs")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SegdistError(f"{out}: output folder exists and is not empty; pass --overwrite to write into it "
                           "(files of the same name are replaced)")
    return out


def resolve_format(fmt: str, classes: Sequence[str], where: str) -> str:
    """The format to write: `fmt`, or for auto the checkpoint's own (voc, cityscapes,
    else palette). SegdistError naming the checkpoint when its classes are not the format's."""
    if fmt == "auto":
        return next((f for f, names in FORMAT_CLASSES.items() if list(classes) == list(names)), "palette")
    wanted = FORMAT_CLASSES.get(fmt)
    if wanted is not None and list(classes) != list(wanted):
        what = f"{len(classes)} classes" if len(classes) != len(wanted) else "other class names"
        raise SegdistError(
            f"{where}: checkpoint has {what} ({', '.join(classes[:3])}, ...) but --format {fmt} needs the "
            f"{len(wanted)} {fmt} classes ({', '.join(wanted[:3])}, ...); use --format palette or overlay"
        )
    return fmt


def _check_options(args) -> CrfParams | None:
    """SegdistError for flags that cannot work; fills in --crf-workers and --threads;
    returns the CRF parameters (None without --crf)."""
    if args.tile is not None and args.tile < 0:
        raise SegdistError(f"--tile must be >= 0, got {args.tile}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.crf_workers = max(1, cpus - 1) if args.crf_workers is None else args.crf_workers
    args.threads = cpus if args.threads is None else args.threads
    if args.tile_batch < 1 or args.crf_workers < 0 or args.threads < 1:
        raise SegdistError("--tile-batch and --threads must be >= 1, --crf-workers >= 0")
    if args.crf_param and not args.crf:
        raise SegdistError("--crf-param given without --crf")
    return CrfParams.from_dict(dict(args.crf_param), "--crf-param") if args.crf else None


# ----------------------------------------------------------------------------- running


def read_image(path: Path, edges: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised float32 [1, 3|4, H, W] model input, uint8 RGB [H, W, 3]) of an image file,
    as evaluation sees it (EvalTransform; 4 channels with the Canny edge map when `edges`).
    SegdistError naming the file when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SegdistError(f"{path}: cannot read image ({err.strerror or err})") from None
    rgb = decode_image(data, str(path))
    image, _ = EvalTransform(edges=edges)(rgb, None)
    return torch.from_numpy(image).unsqueeze(0), rgb


def _prefetched(images: Sequence[Path], edges: bool) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """read_image of every path in order, PREFETCH decoded ahead in a thread (OpenCV
    releases the GIL) while the model runs."""
    with cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool:
        pending: collections.deque = collections.deque()
        for path in images:
            pending.append(pool.submit(read_image, path, edges))
            if len(pending) > PREFETCH:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with torch's and ray's dependencies
        from torch.hub import tqdm
    return tqdm(total=total, disable=quiet, file=sys.stderr, unit="img", dynamic_ncols=True)


@torch.inference_mode()
def predict_images(msf: MultiScaleInference, images: Sequence[Path], keys: Sequence[str], sink: PredictionSink,
                   device: torch.device, quiet: bool = True) -> int:
    """Hand every image's prediction to `sink` as a Sample (key from `keys`, MSF
    probabilities [C, H, W] float32 and argmax int64 [H, W] on `device`, the RGB image,
    label None), then sink.finish(). Returns the number of images. A progress bar on
    stderr unless `quiet`. SegdistError naming a file that cannot be decoded."""
    edges = bool(getattr(msf.model, "needs_edges", False))
    with _progress(len(images), quiet) as bar:
        for key, (image, rgb) in zip(keys, _prefetched(images, edges), strict=True):
            probs = msf(image.to(device, non_blocking=True))[0]
            sink.add(Sample(key, probs, probs.argmax(0), rgb, None))
            bar.update(1)
    sink.finish()
    return len(images)


def _writer(fmt: str, out: Path) -> PredictionSink:
    if fmt == "overlay":
        return OverlayWriter(out)
    return PredictionPngWriter(out, "cityscapes" if fmt == "cityscapes" else "voc")


def _msf(args, trained: TrainedModel) -> MultiScaleInference:
    """MultiScaleInference of the model: the flags, and the recipe's eval part for the rest."""
    own = trained.trial.recipe.eval
    tile = own.tile if args.tile is None else (args.tile, args.tile) if args.tile else None
    return MultiScaleInference(
        trained.model, own.scales if args.scales is None else args.scales,
        own.flip if args.flip is None else args.flip, tile_size=tile, tile_batch=args.tile_batch,
        amp_dtype={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp],
    )


def run(args) -> dict[str, Any]:
    """The command: check everything, predict, return the summary (format, counts, timing)."""
    crf = _check_options(args)
    images = find_images(args.images, skip=args.out)
    out = check_out_folder(args.out, args.overwrite, args.images)
    device = _pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    trained = load_model(args.checkpoint, device=device)
    fmt = resolve_format(args.format, trained.classes, str(args.checkpoint))
    keys = output_keys(images, Path(args.images), fmt)
    check_readable(images)
    msf = _msf(args, trained)
    started = time.perf_counter()
    with CrfPool(args.crf_workers if crf is not None else 0) as pool:
        sink = _writer(fmt, out)
        if crf is not None:
            sink = CrfPostProcessor(pool, crf, None, then=sink)
        count = predict_images(msf, images, keys, sink, device, quiet=args.quiet)
    elapsed = time.perf_counter() - started
    return {
        "images": count, "out": str(out), "format": fmt, "checkpoint": str(args.checkpoint),
        "classes": len(trained.classes), "scales": list(msf.scales), "flip": msf.flip,
        "tile_size": list(msf.tile_size) if msf.tile_size else None,
        "crf": dataclasses.asdict(crf) if crf is not None else None, "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "seconds": round(elapsed, 3), "images_per_second": round(count / elapsed, 3) if elapsed > 0 else None,
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['images']} predictions ({summary['format']}) in {summary['out']}: "
              f"{summary['seconds']} s, {summary['images_per_second']} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
