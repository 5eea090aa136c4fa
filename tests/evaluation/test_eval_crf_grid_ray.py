"""The CRF grid as a real Ray Tune study (local Ray, 2 trials) over saved probabilities."""

import numpy as np
import pytest
import yaml

from segdist.crf import load_crf_grid, run_crf_grid, write_meta, write_sample


@pytest.mark.integration
def test_crf_grid_runs_as_a_tune_study(tmp_path):
    ray = pytest.importorskip("ray")
    h, w = 20, 32
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :16] = (200, 30, 30)
    rgb[:, 16:] = (30, 30, 200)
    p1 = 1 / (1 + np.exp(-(np.arange(w) - 11) / 3.0))
    probs = np.stack([1 - p1, p1])[:, None, :].repeat(h, 1)
    label = np.zeros((h, w), np.uint8)
    label[:, 16:] = 1
    folder = tmp_path / "probs"
    write_meta(folder, {"classes": ["a", "b"]})
    for key in ("x", "y"):
        write_sample(folder, key, probs, rgb, label)
    study = tmp_path / "crf_grid.yaml"
    study.write_text(yaml.safe_dump({
        "kind": "crf_grid", "name": "tiny_crf_grid", "probabilities": str(folder),
        "crf": {"pos_w": 0}, "search": {"bi_w": [0, 4]}, "workers": 1, "max_concurrent_trials": 1,
    }))
    grid = load_crf_grid(study)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        results = run_crf_grid(grid, storage_path=str(tmp_path / "ray"))
    finally:
        ray.shutdown()
    assert not results.errors
    by_weight = {r.config["bi_w"]: r.metrics["val_miou"] for r in results}
    assert set(by_weight) == {0, 4}
    assert by_weight[4] == 1.0 > by_weight[0]  # the colour term snaps the boundary to the edge
    assert results.get_best_result().config["bi_w"] == 4
