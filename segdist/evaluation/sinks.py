"""Prediction sinks: what segdist.evaluation.loop.evaluate_split hands every sample to, after
scoring it, in loader order.

    sink = Sinks(PredictionPngWriter("pred", "voc"), ExampleCollector(4))
    result = evaluate_split(model, loader, num_classes, device, sink=sink)

A sink subclasses PredictionSink: `add(sample)` for every Sample, `finish()` once after the
last. Its `needs_image` (read before each sample) asks the loop for the RGB image, its
`needs_keys` for a loader that gives sample keys.

DenseCRF is a sink too: CrfPostProcessor runs it on each sample's probabilities, scores its
labels in its own Accumulator and passes the CRF-labelled samples on to the sink after it.

segdist.predict hands its unlabelled images (label None) to the same writers
(PredictionPngWriter, OverlayWriter), through a CrfPostProcessor without scores for --crf.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segdist.crf import CrfParams, CrfPool, write_sample
from segdist.evaluation.folders import write_prediction_png
from segdist.evaluation.results import Accumulator, EvalResult


@dataclass(frozen=True)
class Sample:
    """One evaluated sample.

    key: the loader's sample key, or "rank<r>_<i>" when the loader gives none.
    probs: MSF probabilities, float [C, H, W] on the evaluation device; None in the samples
      a CrfPostProcessor passes on.
    pred: int64 [H, W] on the device: the MSF argmax, or the CRF labels after a CrfPostProcessor.
    image: uint8 RGB [H, W, 3] (numpy) when the sink's needs_image was true for it, else None.
    label: int64 [H, W] ground truth on the device (255: not scored); None for images
      without labels (segdist.predict).
    """

    key: str
    probs: torch.Tensor | None
    pred: torch.Tensor
    image: np.ndarray | None
    label: torch.Tensor | None


class PredictionSink:
    """Base class of the sinks: override `add`, and `finish` when there is work left at the end."""

    needs_image: bool = False
    needs_keys: bool = False

    def add(self, sample: Sample) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once, after the last sample."""


def _uint8(values: torch.Tensor) -> np.ndarray:
    return values.cpu().numpy().astype(np.uint8)


class Sinks(PredictionSink):
    """Hands every sample to each of `sinks`, in order."""

    def __init__(self, *sinks: PredictionSink):
        self.sinks = sinks

    @property
    def needs_image(self) -> bool:
        return any(s.needs_image for s in self.sinks)

    @property
    def needs_keys(self) -> bool:
        return any(s.needs_keys for s in self.sinks)

    def add(self, sample: Sample) -> None:
        for sink in self.sinks:
            sink.add(sample)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


class ProbabilityWriter(PredictionSink):
    """Writes every sample's probabilities (float16), image and label into `folder` in
    segdist.crf's saved-probabilities layout (meta.json is the caller's: save_probabilities)."""

    needs_image = True
    needs_keys = True

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder

    def add(self, sample: Sample) -> None:
        write_sample(self.folder, sample.key, sample.probs.cpu().numpy(), sample.image, _uint8(sample.label))


class PredictionPngWriter(PredictionSink):
    """Writes every prediction as <folder>/<key>.png in `dataset`'s official format
    (write_prediction_png)."""

    def __init__(self, folder: str | os.PathLike, dataset: str):
        self.folder = folder
        self.dataset = dataset

    def add(self, sample: Sample) -> None:
        write_prediction_png(self.folder, sample.key, _uint8(sample.pred), self.dataset)


class OverlayWriter(PredictionSink):
    """Writes every prediction as <folder>/<key>.png: an RGB picture of the class colours
    (VOC colour map) blended over the image (segdist.visualize.overlay, alpha 0.55)."""

    needs_image = True

    def __init__(self, folder: str | os.PathLike):
        from segdist.visualize import overlay  # matplotlib: only when overlays are asked for

        self.folder = Path(folder)
        self._overlay = overlay

    def add(self, sample: Sample) -> None:
        path = self.folder / f"{sample.key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self._overlay(sample.image, _uint8(sample.pred)), mode="RGB").save(path)


class ExampleCollector(PredictionSink):
    """Keeps the first `count` samples as (key, rgb uint8 [H, W, 3], gt uint8 [H, W],
    pred uint8 [H, W]) in `examples`, for segdist.visualize.overlays_png."""

    def __init__(self, count: int):
        self.count = count
        self.examples: list = []

    @property
    def needs_image(self) -> bool:
        return len(self.examples) < self.count

    def add(self, sample: Sample) -> None:
        if sample.image is not None and len(self.examples) < self.count:
            self.examples.append((sample.key, sample.image, _uint8(sample.label), _uint8(sample.pred)))


class CrfPostProcessor(PredictionSink):
    """DenseCRF (segdist.crf) on each sample's probabilities in `pool`, the labels scored in
    `scores` and passed on to `then` as the sample's prediction, in loader order. At most
    2 x pool.workers samples wait for their CRF at a time.

    result(before) is then the CRF's EvalResult, with before.confusion as before_crf.
    With scores None (images without labels, segdist.predict) nothing is scored and the
    CRF labels are on the CPU.
    """

    needs_image = True

    def __init__(self, pool: CrfPool, params: CrfParams, scores: Accumulator | None,
                 then: PredictionSink | None = None):
        self.pool = pool
        self.params = params
        self.scores = scores
        self.then = then
        self._pending: collections.deque = collections.deque()

    @property
    def needs_keys(self) -> bool:
        return self.then is not None and self.then.needs_keys

    def add(self, sample: Sample) -> None:
        probs = sample.probs.to(torch.float16).cpu().numpy()
        future = self.pool.labels(probs, sample.image, self.params)
        self._pending.append((future, sample.key, sample.image, sample.label))
        self._drain(keep=2 * max(1, self.pool.workers))

    def finish(self) -> None:
        self._drain(keep=0)
        if self.then is not None:
            self.then.finish()

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future, key, image, label = self._pending.popleft()
            device = label.device if label is not None else "cpu"
            pred = torch.from_numpy(future.result()).to(device=device, dtype=torch.int64)
            if self.scores is not None and label is not None:
                self.scores.add(pred, label)
            if self.then is not None:
                self.then.add(Sample(key, None, pred, image, label))

    def result(self, before: EvalResult) -> EvalResult:
        return dataclasses.replace(self.scores.result(), before_crf=before.confusion)
