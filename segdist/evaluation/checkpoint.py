"""Checkpoints written by training (train.fit): reading one and rebuilding its model.

    trained = load_model("best_checkpoint")   # a checkpoint.pt, or a folder holding one
    probs = trained.model(images).softmax(1)  # (segdist.models exports load_model too)

    state = load_checkpoint("checkpoint.pt")  # the raw dict ...
    model, trial, classes = model_from_checkpoint(state, "checkpoint.pt")  # ... and its model
    check_classes_match(classes, dataset_info, "checkpoint.pt")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segdist.errors import SegdistError

CHECKPOINT_FILE = "checkpoint.pt"  # what train.fit writes into each Ray checkpoint folder


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` itself, or its checkpoint.pt when it is a folder."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict train.fit saves (model, trial, classes, epoch, ...), on the CPU.
    `path`: a checkpoint.pt, or a folder holding one (a Ray checkpoint, or an MLflow run's
    best_checkpoint artifact). SegdistError naming the file if it is missing or not one."""
    path = checkpoint_file(path)
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


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's model, ready for inference (see load_model).

    model: the rebuilt network, eval mode, on the requested device; takes float32 images
      [N, 3, H, W] normalised as in training (segdist.data.transforms.normalize: ImageNet
      mean/std of 0..1 RGB; edge variants, `model.needs_edges`, also an edge map [N, 1, H, W]
      in 0..1) and returns logits [N, C, H, W] at input size.
    trial: the checkpoint's segdist.config.TrialConfig (recipe: model, train and eval parts).
    classes: the C class names, in logit order.
    epoch: the last finished epoch (0-based) when the checkpoint was saved, None if unknown.
    history: [(epoch, metrics dict), ...] of every epoch up to it ([] if not recorded).
    path: the checkpoint file read.
    """

    model: nn.Module
    trial: Any
    classes: list[str]
    epoch: int | None
    history: list = field(default_factory=list)
    path: Path | None = None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> TrainedModel:
    """A training checkpoint as a TrainedModel in one call: the model rebuilt from the
    checkpoint's own recipe and class list, its weights loaded, in eval mode on `device`.

    path: a checkpoint.pt, or a folder holding one, e.g. an MLflow run's best checkpoint
      (`mlflow.artifacts.download_artifacts("runs:/<run_id>/best_checkpoint")` gives the
      folder) or a Ray Tune trial's checkpoint_<n> folder.
    Raises SegdistError (one line naming the file) when it is missing, not a segdist
    checkpoint, its recipe cannot be rebuilt or its weights do not fit the recipe's model.
    """
    file = checkpoint_file(path)
    state = load_checkpoint(file)
    model, trial, classes = model_from_checkpoint(state, str(file))
    epoch = state.get("epoch")
    return TrainedModel(
        model=model.to(device).eval(), trial=trial, classes=classes,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        history=list(state.get("history") or []), path=file,
    )


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
