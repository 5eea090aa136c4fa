from pathlib import Path

import numpy as np
import pytest
import torch

from segdist.crf import (
    CrfParams,
    CrfPool,
    confusion_numpy,
    crf_grid_metrics,
    crf_grid_param_space,
    crf_grid_trial,
    crf_labels,
    load_crf_grid,
    load_sample,
    parse_crf_grid,
    read_meta,
    saved_keys,
    score_saved,
    write_meta,
    write_sample,
)
from segdist.epoch_report import EpochReport
from segdist.errors import SegdistError
from segdist.metrics import confusion_matrix

ROOT = Path(__file__).resolve().parents[2]


def colour_edge_case(h: int = 24, w: int = 40, edge: int = 20):
    """Red left of column `edge`, blue right of it; the unary's boundary is at column 15."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :edge] = (200, 30, 30)
    rgb[:, edge:] = (30, 30, 200)
    p1 = 1 / (1 + np.exp(-(np.arange(w) - 14) / 4.0))
    probs = np.stack([1 - p1, p1])[:, None, :].repeat(h, 1).astype(np.float32)
    return probs, rgb


def first_class1_column(labels: np.ndarray) -> int:
    row = labels[labels.shape[0] // 2].tolist()
    return row.index(1)


def test_both_weights_zero_give_the_argmax_of_the_unary():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 30, 34)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(0)
    rgb = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
    labels = crf_labels(probs.astype(np.float32), rgb, CrfParams(pos_w=0, bi_w=0))
    assert np.array_equal(labels, probs.argmax(0))


def test_the_bilateral_term_moves_a_boundary_to_the_colour_edge():
    probs, rgb = colour_edge_case()
    assert first_class1_column(probs.argmax(0)) == 15
    gaussian_only = crf_labels(probs, rgb, CrfParams(bi_w=0))
    assert abs(first_class1_column(gaussian_only) - 15) <= 1  # smoothing alone: no edge to snap to
    full = crf_labels(probs, rgb, CrfParams())  # DeepLab's defaults, bilateral on
    assert first_class1_column(full) == 20
    assert (full[:, :20] == 0).all() and (full[:, 20:] == 1).all()
    # it follows the colour edge wherever it is
    for edge in (18, 23):
        probs, rgb = colour_edge_case(edge=edge)
        assert first_class1_column(crf_labels(probs, rgb, CrfParams())) == edge


def test_a_process_pool_gives_the_same_labels():
    probs, rgb = colour_edge_case()
    expected = crf_labels(probs, rgb, CrfParams())
    with CrfPool(2) as pool:
        futures = [pool.labels(probs, rgb, CrfParams()) for _ in range(3)]
        assert all(np.array_equal(f.result(), expected) for f in futures)
    with CrfPool(0) as pool:  # in-process
        assert np.array_equal(pool.labels(probs, rgb, CrfParams()).result(), expected)


def test_parameters_are_validated():
    assert CrfParams.from_dict({"bi_w": 5, "iter_max": 3}) == CrfParams(bi_w=5.0, iter_max=3)
    for bad in ({"bi_weight": 1}, {"bi_w": -1}, {"bi_rgb_std": 0}, {"iter_max": 0.5}, {"pos_w": "x"}):
        with pytest.raises(SegdistError):
            CrfParams.from_dict(bad)


def test_confusion_numpy_matches_torch():
    rng = np.random.default_rng(2)
    gt = rng.choice([0, 1, 2, 255], size=(9, 11)).astype(np.uint8)
    pred = rng.integers(0, 3, (9, 11)).astype(np.uint8)
    expected = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt).long(), 3).numpy()
    assert np.array_equal(confusion_numpy(pred, gt, 3), expected)


@pytest.fixture
def saved_folder(tmp_path):
    """Three saved samples of the colour-edge case (labels: the true edge at column 20)."""
    probs, rgb = colour_edge_case()
    label = np.zeros(probs.shape[1:], np.uint8)
    label[:, 20:] = 1
    label[0] = 255
    write_meta(tmp_path, {"classes": ["left", "right"], "scales": [1.0], "flip": False})
    for key in ("a", "b", "c"):
        write_sample(tmp_path, key, probs, rgb, label)
    return tmp_path


def test_saved_folder_round_trip(saved_folder):
    assert saved_keys(saved_folder) == ["a", "b", "c"]
    probs, rgb, label = load_sample(saved_folder, "b")
    assert probs.dtype == np.float16 and probs.shape == (2, 24, 40)
    assert rgb.shape == (24, 40, 3) and label[0, 0] == 255
    assert read_meta(saved_folder)["classes"] == ["left", "right"]
    (saved_folder / "c.label.png").unlink()
    with pytest.raises(SegdistError, match="c.label.png"):
        saved_keys(saved_folder)


def test_scores_with_and_without_crf(saved_folder):
    without = score_saved(saved_folder, None)
    with_crf = score_saved(saved_folder, CrfParams(), workers=2)
    assert without.sum() == with_crf.sum() == 3 * 23 * 40
    assert np.trace(with_crf) == with_crf.sum() > np.trace(without)  # the CRF fixes columns 15..19
    assert score_saved(saved_folder, CrfParams(), limit=1).sum() == 23 * 40


def test_grid_trial_reports_val_miou(saved_folder):
    reported = []
    config = {"probabilities": str(saved_folder), "workers": 1, "limit": 0, "bi_w": 4, "bi_rgb_std": 3}
    assert crf_grid_trial(config, report=reported.append) is None  # a returned dict would be a 2nd result
    (result,) = reported
    metrics = crf_grid_metrics(config)
    assert EpochReport.from_result(result) == EpochReport(0, metrics)
    assert result["val_miou"] == metrics["val_miou"] == 1.0 and metrics["num_images"] == 3
    assert "val_iou_left" in metrics and "crf_bi_w" not in metrics  # the parameters are the trial's config
    assert crf_grid_metrics({**config, "bi_w": 0, "pos_w": 0})["val_miou"] < 1.0


def test_the_shipped_grid_file_parses():
    grid = load_crf_grid(ROOT / "tune_spaces" / "crf_grid.yaml")
    assert grid.name == "crf_grid_voc"
    assert grid.base.iter_max == 10 and grid.base.pos_w == 3.0
    assert len(grid.combinations()) == 2  # the log's grid: bi_rgb_std 3 and 10 (tests/test_studies.py)
    assert {(p.bi_rgb_std) for p in grid.combinations()} == {3.0, 10.0}
    space = crf_grid_param_space(grid)
    assert space["bi_rgb_std"] == {"grid_search": [3.0, 10.0]}
    assert space["pos_xy_std"] == 1.0 and Path(space["probabilities"]).is_absolute()


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"probabilities": "x"}, "kind: crf_grid"),
        ({"kind": "crf_grid"}, "probabilities"),
        ({"kind": "crf_grid", "probabilities": "x", "serch": {}}, "unknown key 'serch'"),
        ({"kind": "crf_grid", "probabilities": "x", "search": {"bi_w": 4}}, "non-empty list"),
        ({"kind": "crf_grid", "probabilities": "x", "search": {"bi_q": [1]}}, "unknown CRF parameter"),
        ({"kind": "crf_grid", "probabilities": "x", "crf": {"bi_rgb_std": 0}}, "bi_rgb_std"),
        ({"kind": "crf_grid", "probabilities": "x", "workers": 0}, "workers"),
    ],
)
def test_bad_grid_files_are_one_line(raw, message):
    with pytest.raises(SegdistError, match=message):
        parse_crf_grid(raw, "grid.yaml")
