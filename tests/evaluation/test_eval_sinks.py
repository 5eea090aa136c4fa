"""Prediction sinks: the CRF post-processor, the fan-out, PNGs and examples."""

import numpy as np
import torch
from PIL import Image

from segdist.crf import CrfParams, CrfPool, crf_labels
from segdist.evaluation.results import Accumulator, EvalResult
from segdist.evaluation.sinks import CrfPostProcessor, ExampleCollector, PredictionPngWriter, Sample, Sinks
from segdist.metrics import confusion_matrix


def samples(count: int = 5, classes: int = 3, size=(10, 12)):
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for n in range(count):
        probs = torch.rand(classes, *size, generator=gen).softmax(0)
        label = torch.randint(0, classes, size, generator=gen)
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        yield Sample(f"s{n}", probs, probs.argmax(0), image, label)


def test_crf_post_processor_scores_and_passes_on_crf_labels_in_order():
    params = CrfParams(bi_rgb_std=10.0)
    kept = ExampleCollector(10)
    with CrfPool(0) as pool:
        crf = CrfPostProcessor(pool, params, Accumulator(3, "cpu", (3,)), then=kept)
        assert crf.needs_image and not crf.needs_keys
        inputs = list(samples())
        for sample in inputs:
            crf.add(sample)
        assert len(kept.examples) == len(inputs) - 2  # two wait for their CRF (2 x max(1, workers))
        crf.finish()
    expected = [crf_labels(s.probs.to(torch.float16).numpy(), s.image, params) for s in inputs]
    assert [e[0] for e in kept.examples] == [s.key for s in inputs]
    assert all(np.array_equal(e[3], x) for e, x in zip(kept.examples, expected, strict=True))
    before = EvalResult(torch.ones(3, 3, dtype=torch.int64), num_images=5)
    result = crf.result(before)
    total = sum(confusion_matrix(torch.from_numpy(x).long(), s.label, 3) for x, s in zip(expected, inputs, strict=True))
    assert torch.equal(result.confusion, total) and torch.equal(result.before_crf, before.confusion)
    assert result.num_images == 5 and set(result.boundary) == {3}


def test_fan_out_asks_for_what_any_sink_needs_and_writes_pngs(tmp_path):
    examples = ExampleCollector(1)
    sinks = Sinks(PredictionPngWriter(tmp_path, "voc"), examples)
    assert sinks.needs_image and not sinks.needs_keys
    for sample in samples(count=2):
        sinks.add(sample)
    sinks.finish()
    assert not sinks.needs_image and [e[0] for e in examples.examples] == ["s0"]
    with Image.open(tmp_path / "s1.png") as im:
        assert im.mode == "P" and im.size == (12, 10)
