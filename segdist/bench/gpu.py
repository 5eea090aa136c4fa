"""bench gpu (CUDA only): DeepLabv2 ResNet-101 `naked` training steps at 321 and 513:
images/s, MFU against the device's peak from a data-sheet table, peak memory, for fp32,
bf16 + channels_last and bf16 + channels_last + torch.compile.

The step is segdist's own (segdist.train.training_setup of the DeepLab protocol's recipe,
SGD, with its L2 term; segdist.train.train_one_epoch), so fp32 is segdist's fp32: no TF32
convolutions or matmuls, and its MFU is against the FP32 peak. What differs from a trial,
and why: one random batch already on the device, repeated, so that the step is timed without
data cost; the precision is set per mode rather than by the recipe; torch.compile, which a
trial does not use, is measured as what it would give.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from segdist.bench.common import (
    bench_setup,
    big_trial,
    fixed_batches,
    quickstart_trial,
    run_steps,
    train_flops_per_image,
    with_train,
)
from segdist.errors import SegdistError

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the
# device name torch reports. fp32 = the CUDA-core FP32 peak; tf32 = the tensor-core
# TF32 peak (what cuDNN convolutions use in "fp32" while TF32 is allowed).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.8, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
}
MODES = ["fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"]


def gpu_peak(name: str) -> tuple[str, dict[str, float]] | None:
    """(table row, peaks) for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    upper = name.upper()
    if "H200" in upper:
        return "H200", GPU_PEAK_TFLOPS["H200"]
    if "H100" in upper:
        row = "H100 PCIe" if "PCIE" in upper else "H100 NVL" if "NVL" in upper else "H100 SXM"
        return row, GPU_PEAK_TFLOPS[row]
    for row in ("A100", "L40S", "L4"):
        if row in upper.split() or f" {row}" in f" {upper}":
            return row, GPU_PEAK_TFLOPS[row]
    return None


def utilisation(flops_per_image: float, images_per_s: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s (flops per image x images/s) over a peak: MFU or a roofline ratio."""
    if peak_flops_per_s <= 0:
        raise ValueError("peak must be positive")
    return flops_per_image * images_per_s / peak_flops_per_s


HELP = "(CUDA) ResNet-101 images/s, MFU, peak memory: fp32, bf16 + channels_last, torch.compile"
DESCRIPTION = (
    "On a CUDA device: DeepLabv2 ResNet-101 `naked` (OS 8, 21 classes) training steps "
    "(segdist.train.training_setup + train_one_epoch, SGD) at 321x321 and 513x513 for fp32, bf16 "
    "autocast + channels_last, and bf16 autocast + channels_last + torch.compile: images/s, MFU = "
    "FLOPs per image (forward + backward, torch.utils.flop_counter) x images/s / the "
    "device's peak from a data-sheet table (bf16 tensor-core peak for bf16; for fp32 the FP32 "
    "peak, or the TF32 tensor-core peak should cuDNN still use TF32), and peak "
    "memory. Without CUDA: {\"gpu\": \"no CUDA device\"}."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 4],
                   help="batch per size, in the order of --sizes (default 8 4)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16_channels_last", "bf16_channels_last_compile"],
                   choices=MODES)
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--classes", type=int, default=21)


def _tf32_convs() -> bool:
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None) if conv is not None else None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def measure_mode(trial, mode: str, size: int, batch: int, steps: int, warmup: int, classes: int,
                 device) -> dict[str, Any]:
    """Training steps of `trial`'s set-up (bench_setup) on `device` in one mode (fp32 | bf16 |
    bf16_channels_last | bf16_channels_last_compile) at crop `size`, batch `batch`: images/s
    over `steps` after `warmup` untimed steps (torch.compile compiles there), the peak memory
    (CUDA) and whether cuDNN could use TF32 (the peak an fp32 figure is compared with)."""
    import dataclasses

    import torch

    cuda = device.type == "cuda"
    bf16 = mode.startswith("bf16")
    step_trial = with_train(trial, precision="bf16" if bf16 else "fp32", channels_last="channels_last" in mode,
                            batch_size=batch, crop_size=(size, size))
    setup = bench_setup(step_trial, classes, (max(warmup, 1) + steps) * batch, device=device)
    if mode.endswith("compile"):
        setup = dataclasses.replace(setup, net=torch.compile(setup.net))
    tf32 = cuda and _tf32_convs()  # as the set-up left it
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run_steps(setup, fixed_batches(batch, size, classes, max(warmup, 1), device), 0, batch)
        if cuda:
            torch.cuda.synchronize()
        timed = fixed_batches(batch, size, classes, steps, device)
        start = time.perf_counter()
        run_steps(setup, timed, 0, batch)  # ends with a host read of the loss
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    finally:
        setup = None
    return {
        "img_per_s": steps * batch / elapsed,
        "peak_memory_bytes": float(torch.cuda.max_memory_allocated()) if cuda else float("nan"),
        "tf32": tf32,
    }


def run(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device"}
    if len(args.batch_sizes) != len(args.sizes):
        raise SegdistError("--batch-sizes needs one batch size per --sizes entry")
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak(name)
    trial = big_trial(quickstart_trial(), args.depth, 64)
    result: dict[str, Any] = {
        "gpu": name,
        "peak_table_row": peak[0] if peak else None,
        "peak_tflops": peak[1] if peak else None,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "model": f"DeepLabv2 naked ResNet-{args.depth} width 64 OS 8, {args.classes} classes",
    }
    for size, batch in zip(args.sizes, args.batch_sizes, strict=True):
        result.update(_measure_size(args, trial, size, batch, peak))
    return result


def _measure_size(args, trial, size: int, batch: int, peak) -> dict[str, Any]:
    """Every mode's figures at one crop size (keys end in _<size>); a mode that fails (out of
    memory, torch.compile) gets an error entry and the others go on."""
    import torch

    from segdist.models import build_model

    torch.manual_seed(trial.seed)
    flops = train_flops_per_image(build_model(trial.recipe.model, args.classes), size, args.classes)
    out: dict[str, Any] = {f"gflops_per_image_fwd_bwd_{size}": round(flops / 1e9, 2)}
    for mode in args.modes:
        key = f"{mode}_{size}"
        try:
            measured = measure_mode(trial, mode, size, batch, args.steps, args.warmup, args.classes,
                                    torch.device("cuda"))
        except torch.cuda.OutOfMemoryError:
            out[f"{key}_error"] = "out of memory"
            continue
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile failing: report, go on
            out[f"{key}_error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        img_per_s = measured["img_per_s"]
        out[f"img_per_s_{key}"] = round(img_per_s, 2)
        out[f"peak_memory_gib_{key}"] = round(measured["peak_memory_bytes"] / 2**30, 2)
        out[f"achieved_tflops_{key}"] = round(flops * img_per_s / 1e12, 1)
        if peak:
            dtype = "bf16" if mode.startswith("bf16") else ("tf32" if measured["tf32"] else "fp32")
            out[f"mfu_{key}"] = round(utilisation(flops, img_per_s, peak[1][dtype] * 1e12), 4)
            if dtype != "bf16":
                out["fp32_peak_used"] = dtype
        if not mode.startswith("bf16"):
            out["cudnn_tf32"] = measured["tf32"]  # what the fp32 mode ran with
        out[f"batch_size_{size}"] = batch
    return out
