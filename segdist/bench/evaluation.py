"""bench eval: seconds per image of the evaluation stages, whole-image inference, MSF and
DenseCRF, on random images with a randomly initialised model.

    python -m segdist.bench eval [--images 2] [--tile 321] [--crf-workers 1] [--device cpu]
    timings = benchmark(size=(375, 500), images=2, device="cpu")
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segdist.crf import CrfParams, CrfPool
from segdist.evaluation.loop import DEFAULT_MSF_SCALES
from segdist.msf import MultiScaleInference

HELP = "seconds per image: whole-image inference, MSF and DenseCRF"
DESCRIPTION = (
    "Seconds per image for whole-image inference, MSF (0.5..1.5 + flip, sliding tiles of --tile) and "
    "DenseCRF (DeepLab's parameters, --crf-workers processes) on --images random 500x375 images with a "
    "random-weight naked ResNet-101 (output stride 8, 21 classes)."
)


def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=2, help="random images (default 2)")
    p.add_argument("--tile", type=int, default=321, help="MSF tile size in pixels (default 321)")
    p.add_argument("--crf-workers", type=int, default=1, help="CRF processes (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args) -> dict[str, Any]:
    return benchmark(images=args.images, tile_size=args.tile, crf_workers=args.crf_workers, device=args.device)


def benchmark(
    *,
    size: tuple[int, int] = (375, 500),
    images: int = 2,
    depth: int = 101,
    width: int = 64,
    variant: str = "naked",
    num_classes: int = 21,
    output_stride: int = 8,
    scales: Sequence[float] = DEFAULT_MSF_SCALES,
    tile_size: int = 321,
    crf_workers: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per image for whole-image inference, MSF (scales + flip, sliding tiles) and
    DenseCRF (DeepLab defaults) on `images` random images of `size` (height, width) with a
    randomly initialised model; JSON-ready (times rounded to milliseconds)."""
    from segdist.models import build_model
    from segdist.resolve import resolve_recipe

    torch.manual_seed(seed)
    device_t = torch.device(device)
    recipe = resolve_recipe({"model.variant": variant, "model.depth": depth, "model.width": width,
                             "model.output_stride": output_stride}, "deeplab", "benchmark")
    model = build_model(recipe.model, num_classes).to(device_t).eval()
    height, width = size
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.randn(1, 3, height, width, generator=gen) for _ in range(images)]
    whole_times, _ = _timed(MultiScaleInference(model), batch, device_t)
    msf = MultiScaleInference(model, scales, flip=True, tile_size=tile_size)
    msf_times, probs = _timed(msf, batch, device_t)
    rng = np.random.default_rng(seed)
    rgbs = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in batch]
    params = CrfParams()
    return {
        "image_size": f"{width}x{height}",
        "images": images,
        "model": f"{variant} ResNet-{depth} OS{output_stride}, {num_classes} classes, random weights",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "whole_image_s_per_image": _stats(whole_times),
        "msf_s_per_image": _stats(msf_times),
        "msf": {"scales": list(scales), "flip": True, "tile_size": tile_size,
                "tile_passes_per_image": msf.tiles_run / len(batch)},
        "crf_s_per_image": _stats(_crf_times(probs, rgbs, params, crf_workers)),
        "crf": {**dataclasses.asdict(params), "workers": crf_workers},
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _timed(msf: MultiScaleInference, batch: list[torch.Tensor], device: torch.device) -> tuple[list[float], list]:
    """(seconds per image, probabilities on the CPU) of `msf` over `batch`, after one
    warm-up pass; msf.tiles_run then counts the timed passes only."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, outs = [], []
    with torch.inference_mode():
        msf(batch[0][:, :, :64, :64].to(device))  # warm-up (allocator, kernels)
        msf.tiles_run = 0
        for x in batch:
            sync()
            start = time.perf_counter()
            outs.append(msf(x.to(device)).cpu())
            sync()
            times.append(time.perf_counter() - start)
    return times, outs


def _crf_times(probs: list[torch.Tensor], rgbs: list[np.ndarray], params: CrfParams, workers: int) -> list[float]:
    """Seconds per image of the CRF: each image alone with one worker; with more, the
    pool's throughput (wall time / images) for every image."""
    times = []
    with CrfPool(workers) as pool:
        pool.labels(probs[0][0].numpy()[:, :32, :32], rgbs[0][:32, :32].copy(), params).result()  # start workers
        if workers <= 1:
            for p, rgb in zip(probs, rgbs, strict=True):
                start = time.perf_counter()
                pool.labels(p[0].to(torch.float16).numpy(), rgb, params).result()
                times.append(time.perf_counter() - start)
        else:  # throughput of the pool: wall time / images
            start = time.perf_counter()
            futures = [pool.labels(p[0].to(torch.float16).numpy(), rgb, params) for p, rgb in zip(probs, rgbs, strict=True)]
            for f in futures:
                f.result()
            times = [(time.perf_counter() - start) / len(probs)] * len(probs)
    return times


def _stats(times: list[float]) -> dict[str, Any]:
    return {
        "median": round(float(np.median(times)), 3),
        "min": round(min(times), 3),
        "all": [round(t, 3) for t in times],
    }
