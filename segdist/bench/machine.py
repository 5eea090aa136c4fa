"""The machine the figures are measured on: CPU, cores, versions, device, commit, and
whether other processes kept it busy just before (the load average)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict[str, Any]:
    import torch

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    from segdist.data.transforms import RESIZE_BACKEND, cv2

    info["resize_backend"] = RESIZE_BACKEND
    info["opencv"] = cv2.__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        info["segdist_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["segdist_commit"] = None
    return info


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def load_note(before: float | None) -> str | None:
    """A warning when other processes kept the machine busy just before a measurement
    (1-minute load average above its cores). Only the load before is judged: the load after
    includes the benchmark's own processes (ray and scale run 4 busy ones)."""
    cores = os.cpu_count() or 1
    if before is None or before <= cores:
        return None
    return (f"the machine was busy before this ran (1-minute load average {before} on {cores} cores): "
            "other processes may have taken CPU time, so these figures may understate this code")
