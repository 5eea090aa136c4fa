"""The evaluation loop: a model over one rank's share of a split, scored sample by sample.

    result = evaluate_split(model, loader, num_classes, device,
                            scales=(1.0,), flip=False, boundary_kernels=(), sink=None)
    result = all_reduce_result(result)   # segdist.evaluation.results: the only collective

Whole-image evaluation is scales=(1.0,), flip=False, tile_size=None (segdist.msf).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from segdist.boundary import check_kernels
from segdist.crf import write_meta
from segdist.data.classes import IMAGENET_MEAN, IMAGENET_STD
from segdist.distributed import rank_and_world_size
from segdist.evaluation.results import Accumulator, EvalResult
from segdist.evaluation.sinks import PredictionSink, ProbabilityWriter, Sample, Sinks
from segdist.msf import MultiScaleInference
from segdist.recipe import NAMED_SCALES

DEFAULT_MSF_SCALES = NAMED_SCALES["deeplab"]

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3|4, H, W] image (segdist.data.transforms.normalize) -> uint8 RGB
    [H, W, 3]; exact for images that came from uint8."""
    rgb = image[:3].detach().float().cpu() * _STD + _MEAN
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _keys(item: Sequence) -> Sequence[str] | None:
    keys = item[2] if len(item) > 2 else None
    return [keys] if isinstance(keys, str) else keys


def _samples(msf: MultiScaleInference, loader: Iterable, device: torch.device, sink: PredictionSink | None,
             limit: int) -> Iterator[Sample]:
    """The loader's samples with their MSF probabilities and argmax, in order; the image
    only while the sink asks for it. Stops after `limit` images (0: never)."""
    rank = rank_and_world_size()[0]
    seen = 0
    for item in loader:
        keys = _keys(item)
        if keys is None and sink is not None and sink.needs_keys:
            raise ValueError("this sink needs a loader that gives sample keys (val_loader(..., with_keys=True))")
        images = item[0].to(device, non_blocking=True)
        labels = item[1].to(device, non_blocking=True)
        probs = msf(images)
        for n in range(images.shape[0]):
            key = keys[n] if keys is not None else f"rank{rank}_{seen}"
            image = denormalize(images[n]) if sink is not None and sink.needs_image else None
            yield Sample(key, probs[n], probs[n].argmax(0), image, labels[n].to(torch.int64))
            seen += 1
        del probs
        if limit and seen >= limit:
            break


@torch.inference_mode()
def evaluate_split(
    model: torch.nn.Module,
    loader: Iterable,
    num_classes: int,
    device,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    boundary_kernels: Sequence[int] = (),
    tile_size: int | tuple[int, int] | None = None,
    tile_batch: int = 4,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    limit: int = 0,
    sink: PredictionSink | None = None,
) -> EvalResult:
    """This rank's confusion matrices (int64 [C, C], on `device`) of the MSF argmax over its
    share of `loader`. Runs no collective: call all_reduce_result, or all-reduce
    `result.flat()` yourself.

    loader: yields (images [N, 3|4, H, W] normalised, labels [N, H, W]) or (..., keys),
    e.g. segdist.data.stream.val_loader. A DDP wrapper is looked through.
    scales / flip / tile_size / tile_batch / amp_dtype / channels_last: segdist.msf.
    MultiScaleInference (defaults: one whole-image pass in the model's dtype).
    boundary_kernels: K values for boundary/inner matrices (SegdistError unless odd >= 3).
    limit: stop after this many images on this rank (0 = all; for quick looks only).
    sink: gets every sample after it is scored (segdist.evaluation.sinks); sink.finish()
    runs after the last. ValueError when it needs keys and the loader gives none.
    """
    kernels = check_kernels(boundary_kernels)
    device = torch.device(device)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient sync; the bare model has needs_edges
    model.eval()
    msf = MultiScaleInference(
        model, scales, flip, tile_size=tile_size, tile_batch=tile_batch, amp_dtype=amp_dtype, channels_last=channels_last
    )
    acc = Accumulator(num_classes, device, kernels)
    for sample in _samples(msf, loader, device, sink, limit):
        acc.add(sample.pred, sample.label)
        if sink is not None:
            sink.add(sample)
    if sink is not None:
        sink.finish()
    return acc.result()


def save_probabilities(
    model: torch.nn.Module,
    loader: Iterable,
    folder: str | os.PathLike,
    classes: Sequence[str],
    device,
    *,
    scales: Sequence[float] = DEFAULT_MSF_SCALES,
    flip: bool = True,
    tile_size: int | tuple[int, int] | None = None,
    tile_batch: int = 4,
    meta: dict[str, Any] | None = None,
    sink: PredictionSink | None = None,
    **kwargs,
) -> EvalResult:
    """evaluate_split that also writes every sample's float16 probabilities, RGB image and
    label to `folder` (the input of the CRF grid, segdist.crf), plus meta.json (rank 0:
    classes, scales, flip, tile_size and `meta`). The loader must give keys
    (val_loader(..., with_keys=True)). `sink` gets every sample too; kwargs go to
    evaluate_split. Returns the scores of the MSF argmax."""
    if rank_and_world_size()[0] == 0:
        info = {"classes": list(classes), "scales": list(scales), "flip": bool(flip), "tile_size": tile_size}
        write_meta(folder, {**info, **(meta or {})})
    writer = ProbabilityWriter(folder) if sink is None else Sinks(ProbabilityWriter(folder), sink)
    return evaluate_split(
        model, loader, len(classes), device, scales=scales, flip=flip, tile_size=tile_size,
        tile_batch=tile_batch, sink=writer, **kwargs,
    )
