"""`python -m segdist.tune` refuses bad input with one line and exit 2, before training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def tune(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "segdist.tune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("segdist: error: ")]
    # Exactly one error line, and it is the last thing said (Ray may log before it).
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_dry_run_lists_every_configuration_and_seed(tmp_path):
    space = write(tmp_path / "s.yaml", {"seeds": [0, 1, 2], "search": {"train.lr": {"grid": [0.1, 0.2]}}})
    result = tune("--space", str(space), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 trials (2 configurations x seeds; seeds [0, 1, 2]; protocol deeplab)" in result.stdout
    assert result.stdout.count("variant=naked") == 2


def test_dry_run_of_adaptive_seeds_says_so(tmp_path):
    space = write(tmp_path / "s.yaml", {"seeds": {"min": 2, "max": 6, "ci_halfwidth": 0.5}})
    result = tune("--space", str(space), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "adaptive seeds: 2 to 6 per configuration" in result.stdout


def test_default_space_is_the_quickstart(tmp_path):
    result = tune("--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "variant=naked" in result.stdout


def test_broken_yaml(tmp_path):
    space = tmp_path / "broken.yaml"
    space.write_text("train: {lr: [0.1\n")
    assert_one_line_error(tune("--space", str(space), cwd=tmp_path), "broken.yaml", "broken YAML")


def test_unknown_key(tmp_path):
    space = write(tmp_path / "s.yaml", {"train": {"learning_rate": 0.1}})
    assert_one_line_error(tune("--space", str(space), cwd=tmp_path), "s.yaml", "unknown key 'learning_rate'")


def test_missing_data_folder(tmp_path):
    space = write(tmp_path / "s.yaml", {"data": {"train_shards": str(tmp_path / "nowhere"),
                                                  "val_shards": str(tmp_path / "nowhere")}})
    assert_one_line_error(tune("--space", str(space), cwd=tmp_path), "nowhere")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    space = write(tmp_path / "s.yaml", {"data": {"train_shards": str(tmp_path / "empty"),
                                                  "val_shards": str(tmp_path / "empty")}})
    assert_one_line_error(tune("--space", str(space), cwd=tmp_path), "empty")


def test_unreachable_mlflow_server(tmp_path):
    space = write(tmp_path / "s.yaml", {})
    result = tune("--space", str(space), "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    assert_one_line_error(result, "http://127.0.0.1:9", "unreachable")


@pytest.mark.parametrize("flags, lost", [
    ((), "the MLflow store and the storage would be lost"),
    (("--tracking-uri", "http://127.0.0.1:9"), "the storage would be lost"),  # refused before it is tried
    (("--storage", "OUTSIDE"), "the MLflow store would be lost"),
])
def test_inside_a_ray_job_no_store_goes_into_the_jobs_temporary_copy(tmp_path, flags, lost):
    """`ray job submit -- python -m segdist.tune` runs in a copy of the working directory that
    Ray deletes with the job: a default store there would vanish with every run in it."""
    job = tmp_path / "job"  # what Ray makes of --working-dir
    job.mkdir()
    space = write(job / "s.yaml", {})
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SEGDIST_STORAGE")}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = "{}"  # what Ray sets in a job's driver
    flags = [str(tmp_path / "outside") if flag == "OUTSIDE" else flag for flag in flags]
    result = tune("--space", str(space), *flags, cwd=job, env=env)
    assert_one_line_error(result, "inside a Ray job", lost, "MLFLOW_TRACKING_URI", "SEGDIST_STORAGE")
    assert sorted(p.name for p in job.iterdir()) == ["s.yaml"]  # nothing written there


def test_the_environment_names_the_stores_when_no_flag_does(tmp_path, monkeypatch):
    """What the cluster YAMLs give the head's Ray processes reaches a job without flags;
    flags win over the environment."""
    from segdist.tune import resolve_stores

    job, shared = tmp_path / "job", tmp_path / "shared"
    job.mkdir()
    shared.mkdir()
    monkeypatch.chdir(job)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared / 'mlflow.db'}")
    monkeypatch.setenv("SEGDIST_STORAGE", str(shared / "ray_results"))
    assert resolve_stores(None, None) == (f"sqlite:///{shared / 'mlflow.db'}", str(shared / "ray_results"))
    assert resolve_stores(f"sqlite:///{shared / 'other.db'}", str(shared / "mine")) == (
        f"sqlite:///{shared / 'other.db'}", str(shared / "mine"))
    assert sorted(p.name for p in shared.iterdir()) == ["mine", "ray_results"]


@pytest.mark.integration
def test_resources_that_cannot_fit_fail_before_training(tmp_path, tiny_shards):
    from tests.conftest import write_study

    # one configuration fits, the other asks for its own 64 workers (the Ngpu token): refused,
    # naming that configuration, before any training
    space = write_study(tmp_path / "big.yaml", *tiny_shards, search={"model.variant": {"grid": ["naked", "naked.64gpu"]}},
                        resources={"cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1})
    result = tune("--space", str(space), cwd=tmp_path)
    assert_one_line_error(result, "big.yaml", "resources of naked.64gpu (64 workers) do not fit", "64 CPUs per trial")


def test_a_cityscapes_variant_on_voc_layout_shards_is_refused(tmp_path, tiny_shards):
    from tests.conftest import write_study

    space = write_study(tmp_path / "cs.yaml", *tiny_shards, model={"variant": "cs.naked", "depth": 18, "width": 4})
    assert_one_line_error(tune("--space", str(space), cwd=tmp_path), "cs.yaml", "'cs.naked' is for cityscapes",
                          "synthetic shards")


def test_a_generated_data_set_fills_the_train_list_placeholder(tmp_path):
    """synthetic_root with data.train_shards .../{train_list}: the shards land under the
    configuration's list name, never under a literal '{train_list}' folder."""
    from segdist.config import parse_study
    from segdist.tune import prepare_data

    raw = {"name": "t", "seeds": [0], "model": {"variant": "naked", "depth": 18, "width": 4},
           "data": {"train_shards": str(tmp_path / "shards" / "{train_list}"),
                    "val_shards": str(tmp_path / "shards" / "val"), "synthetic_root": str(tmp_path / "synthetic")}}
    study = parse_study(raw, "t.yaml")
    prepare_data(study)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train_aug", "val"]


def test_explain_of_a_crf_grid_lists_its_parameter_sets(tmp_path):
    result = tune("--space", str(ROOT / "tune_spaces" / "crf_grid.yaml"), "--explain", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2 CRF trials over ") and len(lines) == 3
    assert all("bi_xy_std=67" in line and "pos_w=3" in line for line in lines[1:])
