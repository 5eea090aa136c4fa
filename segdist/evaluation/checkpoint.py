"""Checkpoints written by training (train.fit): reading one and rebuilding its model.

    state = load_checkpoint("checkpoint.pt")
    model, trial, classes = model_from_checkpoint(state, "checkpoint.pt")
    check_classes_match(classes, dataset_info, "checkpoint.pt")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segdist.errors import SegdistError


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict train.fit saves; SegdistError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SegdistError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SegdistError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not {"model", "trial", "classes"} <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise SegdistError(f"{path}: not a segdist checkpoint (needs keys model, trial, classes; has {have})")
    return state


def model_from_checkpoint(state: dict[str, Any], where: str):
    """(model with the checkpoint's weights, TrialConfig, classes) — the model rebuilt from
    the checkpoint's own recipe and class list, on the CPU, without its ImageNet file.
    SegdistError naming `where` when the recipe cannot be rebuilt or the weights do not fit."""
    from segdist.config import trial_from_dict
    from segdist.models import build_model

    try:
        trial = trial_from_dict(state["trial"])
    except (KeyError, TypeError, ValueError, SegdistError) as err:
        raise SegdistError(f"{where}: cannot rebuild the trial's recipe ({type(err).__name__}: {err}); "
                           "was it written by an older segdist?") from None
    classes = list(state["classes"])
    try:
        # the weights come from the checkpoint: never load the ImageNet file it started from
        model = build_model(trial.recipe.model, len(classes), load_pretrained=False)
    except SegdistError as err:
        raise SegdistError(f"{where}: {err}") from None
    details = _weight_mismatches(state["model"], model.state_dict())
    if details:
        m = trial.recipe.model
        raise SegdistError(
            f"{where}: weights do not fit variant {m.variant!r} (depth {m.depth}, width {m.width}) with "
            f"{len(classes)} classes: " + ", ".join(details)
        )
    model.load_state_dict(state["model"])
    return model, trial, classes


def _weight_mismatches(weights: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """What keeps `weights` from loading into a model whose state dict is `own`: counts of
    missing, unexpected and other-shape tensors with one example each ([] if they fit)."""
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    details = []
    if missing:
        details.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        details.append(f"{len(shapes)} of another shape (e.g. {k}: {list(weights[k].shape)} vs {list(own[k].shape)})")
    return details


def check_classes_match(ckpt_classes: Sequence[str], info, ckpt_where: str) -> None:
    """SegdistError unless the checkpoint's class names are the shards' (`info`: a
    segdist.data.stream dataset info, with .classes, .root, .dataset), in order."""
    if list(ckpt_classes) != list(info.classes):
        what = (
            f"{len(ckpt_classes)} classes" if len(ckpt_classes) != len(info.classes) else "other class names"
        )
        raise SegdistError(
            f"{ckpt_where}: checkpoint has {what} ({', '.join(ckpt_classes[:3])}, ...) but shards {info.root} "
            f"({info.dataset}) have {len(info.classes)} ({', '.join(info.classes[:3])}, ...)"
        )
