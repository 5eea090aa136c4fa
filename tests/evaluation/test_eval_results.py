"""EvalResult's flat layout, the Accumulator, summaries, MLflow names and the pictures."""

import io
import math

import torch
from PIL import Image

from segdist.boundary import boundary_confusions
from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.stream import read_dataset_info, val_loader
from segdist.evaluation.checkpoint import load_checkpoint, model_from_checkpoint
from segdist.evaluation.loop import evaluate_split
from segdist.evaluation.results import Accumulator, EvalResult, flat_metrics, summarize
from segdist.evaluation.sinks import ExampleCollector
from segdist.metrics import confusion_matrix, confusion_matrix_with_void, scores
from segdist.visualize import confusion_matrix_png, overlays_png

C = len(SYNTHETIC_CLASSES)


def test_summary_flat_metrics_and_pictures(eval_shards, tiny_checkpoint):
    model, _, classes = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    loader = val_loader(read_dataset_info(eval_shards), rank=0, world_size=1, loader_workers=0, with_keys=True)
    pictures = ExampleCollector(2)
    result = evaluate_split(model, loader, C, "cpu", scales=(1.0,), flip=True, boundary_kernels=(11,),
                            sink=pictures)
    summary = summarize(result, classes)
    assert summary["miou"] == scores(result.confusion)["miou"] or math.isnan(summary["miou"])
    flat = flat_metrics(summary)
    assert {"val_miou", "val_pixel_acc", "val_mean_acc", "val_boundary11_miou", "val_inner11_pixel_acc"} <= set(flat)
    assert all(math.isfinite(v) for v in flat.values())
    assert len(pictures.examples) == 2 and pictures.examples[0][1].shape[-1] == 3

    for png in (confusion_matrix_png(result.confusion, classes), overlays_png(pictures.examples, classes)):
        with Image.open(io.BytesIO(png)) as im:
            im.verify()


def test_flat_round_trip():
    m = lambda v: torch.full((2, 2), v, dtype=torch.int64)  # noqa: E731
    result = EvalResult(m(1), {11: (m(2), m(3)), 15: (m(4), m(5))}, m(6), 7)
    back = result.with_flat(result.flat() * 2)
    assert back.num_images == 14 and torch.equal(back.before_crf, m(12))
    assert torch.equal(back.boundary[15][1], m(10)) and torch.equal(back.confusion, m(2))


def test_accumulator_sums_whole_and_boundary_matrices_with_or_without_void():
    gen = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (12, 14), generator=gen) for _ in range(2)]
    preds = [torch.randint(0, 3, (12, 14), generator=gen) for _ in range(2)]
    preds[1][0, :4] = 255  # "no class": only the void matrices take it
    for void, matrix in ((False, confusion_matrix), (True, confusion_matrix_with_void)):
        acc = Accumulator(3, "cpu", (3, 5), void=void)
        for pred, label in zip(preds if void else preds[:1], labels, strict=False):
            acc.add(pred, label)
        n = 2 if void else 1
        result = acc.result()
        pred, label = torch.stack(preds[:n]), torch.stack(labels[:n])
        assert result.num_images == n and torch.equal(result.confusion, matrix(pred, label, 3))
        for k, (b, i) in boundary_confusions(pred, label, 3, (3, 5), matrix).items():
            assert torch.equal(result.boundary[k][0], b) and torch.equal(result.boundary[k][1], i)
