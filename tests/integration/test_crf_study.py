"""Train -> save MSF probabilities -> DenseCRF grid as a Tune study, logged to MLflow."""

import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.test_train import run, tiny_trial

pytestmark = pytest.mark.integration


def test_crf_grid_study_over_saved_probabilities(tmp_path, tiny_shards):
    (*_, (_, state)) = run(tiny_trial(*tiny_shards, epochs=1))
    state.pop("pictures", None)
    torch.save(state, tmp_path / "checkpoint.pt")
    saved = subprocess.run(
        [sys.executable, "-m", "segdist.evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"),
         "--shards", str(tiny_shards[1]), "--save-probs", str(tmp_path / "probs"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stderr
    space = tmp_path / "crf.yaml"
    space.write_text(yaml.safe_dump({
        "kind": "crf_grid", "name": "crf_tiny", "probabilities": str(tmp_path / "probs"),
        "search": {"bi_rgb_std": [3, 10]}, "workers": 1, "max_concurrent_trials": 1,
    }))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "segdist.tune", "--space", str(space), "--tracking-uri", uri,
         "--storage", str(tmp_path / "ray_results")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bi_rgb_std=3 " in result.stdout and "bi_rgb_std=10 " in result.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("crf_tiny")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("segdist.role") == "trial"]
    assert len(children) == 2
    assert {r.data.params["bi_rgb_std"] for r in children} == {"3.0", "10.0"}
    assert all(r.info.status == "FINISHED" and 0 <= r.data.metrics["val_miou"] <= 1 for r in children)
