"""The study files of tune_spaces/ against the results log's recipes.

tune_spaces/recipes.csv is a machine-readable copy of reference/recipes.md: one line per log
row (a row trained under two formulas is two lines), its study and variant, which metric
reads it, and the original script's value of every recipe field (before segdist's fixes,
which the `fixes` column names). Every configuration of every study must resolve to its rows'
recipes, with the fixes applied; a change that breaks a row fails here. Every configuration
is then trained for one tiny epoch (the `--smoke` sizes) in this process, without Ray.
"""

import csv
import math

import pytest
import torch
import yaml

from segdist.config import expand_configs, load_study, smoke_study
from segdist.train import fit
from tests.conftest import ROOT, run_cli

SPACES = ROOT / "tune_spaces"
TRAINING_STUDIES = ("sobel_fpn", "sobel", "gcn", "trimap", "voc_baseline", "cityscapes", "boundary_stats")
# Fixes (the named bugs of reference/variants.md) and deliberate differences that change a
# recipe field: {name: {field: segdist's value}} (tune_spaces/README.md lists each).
FIXES = {
    "eval_flip": {"eval.flip": "True"},
    "gcn_paper": {"model.gcn_style": "paper"},
    "crf_bilateral": {"crf.bilateral": "True"},
    "crf_log_weights": {"crf.pos_w": "3", "crf.bi_w": "4"},
    "whole_image_val": {"eval.tile": "-"},  # the "no MSF" row is read from the whole-image val_miou
}
# Fixes that segdist applies everywhere, in code paths no recipe field names (tune_spaces/README.md).
ALWAYS_FIXED = {"labels_nearest", "tile_overlap", "tile_mean_pad", "rrf_swap", "edgemix_soft", "sqrt_floor",
                "boundary_reference", "ignore_255_only"}
DOC_COLUMNS = ("study", "row", "result", "variant", "reading", "script", "confidence", "uncertain", "fixes",
               "original_label_resize")
CRF_FIELDS = ("crf.iter_max", "crf.pos_w", "crf.pos_xy_std", "crf.bi_w", "crf.bi_xy_std", "crf.bi_rgb_std",
              "crf.bilateral")


def log_rows() -> list[dict[str, str]]:
    with open(SPACES / "recipes.csv", newline="") as f:
        return list(csv.DictReader(f))


def text(value) -> str:
    """A recipe value as recipes.csv writes it."""
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def expected(row: dict[str, str]) -> dict[str, str]:
    """The row's recipe fields with its fixes applied ("n/a": not compared)."""
    fields = {k: v for k, v in row.items() if k not in DOC_COLUMNS and v != "n/a"}
    for fix in filter(None, row["fixes"].split(";")):
        assert fix in FIXES or fix in ALWAYS_FIXED, f"unknown fix {fix!r} in recipes.csv"
        fields.update({k: v for k, v in FIXES.get(fix, {}).items() if k in fields})
    return fields


def study_configs(name: str) -> dict[str, object]:
    return {c.recipe.model.variant: c for c in expand_configs(load_study(SPACES / f"{name}.yaml"))}


def row_config(row: dict[str, str]):
    """The configuration that trains a row (the CRF rows read a trained voc.size512 of voc_baseline)."""
    return study_configs("voc_baseline" if row["study"] == "crf_grid" else row["study"])[row["variant"]]


def test_the_table_covers_every_study():
    assert {r["study"] for r in log_rows()} == {*TRAINING_STUDIES, "crf_grid"}


def test_the_table_has_a_line_for_every_row_of_the_log_and_back():
    log = ROOT.parent / "shared" / "reference" / "000_228ee7611dc2548c.txt"
    if not log.is_file():
        pytest.skip(f"the results log is not in this checkout ({log})")
    rows = log_rows()
    lines = [line for line in log.read_text().splitlines()
             if "|" in line and not line.lstrip().startswith(("Arch", "Params", "----"))]
    assert len(lines) == 57
    for line in lines:
        assert any(r["row"] in line for r in rows), line
    for r in rows:
        assert any(r["row"] in line for line in lines), r["row"]


@pytest.mark.parametrize("study_name", TRAINING_STUDIES)
def test_every_configuration_is_a_row_and_every_row_a_configuration(study_name):
    configs = study_configs(study_name)
    variants = [r["variant"] for r in log_rows() if r["study"] == study_name]
    if study_name == "voc_baseline":
        variants += [r["variant"] for r in log_rows() if r["study"] == "crf_grid"]
    assert set(variants) == set(configs), study_name
    study = load_study(SPACES / f"{study_name}.yaml")
    assert study.protocol == "original" and study.baseline in configs


def actual(row: dict[str, str]) -> dict[str, str]:
    """What segdist trains and reads for a row: its configuration's recipe, the evaluation
    its `reading` names, and the CRF setting of crf_grid.yaml that scores it."""
    from segdist.crf import load_crf_grid
    from segdist.recipe import show
    from segdist.train import WHOLE_IMAGE

    recipe = row_config(row).recipe
    flat = {k: text(v) for k, v in recipe.flat().items()}
    reading = row["reading"]
    if reading == "val_miou":  # every epoch's whole-image evaluation
        flat.update({f"eval.{k}": text(show(f"eval.{k}", v)) for k, v in vars(WHOLE_IMAGE).items()})
    elif reading.startswith("final_boundary"):  # one of the kernels of the final evaluation
        k = reading.split()[0].removeprefix("final_boundary")
        flat["eval.boundary_kernels"] = k if int(k) in recipe.eval.boundary_kernels else flat["eval.boundary_kernels"]
    if row["study"] == "crf_grid":  # the grid setting with the row's parameters, if crf_grid.yaml has it
        want, names = expected(row), ("iter_max", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std")
        grid = [vars(p) for p in load_crf_grid(SPACES / "crf_grid.yaml").combinations()]
        found = next((p for p in grid if all(text(float(p[n])) == want[f"crf.{n}"] for n in names)), None)
        flat.update({f"crf.{n}": text(float(found[n])) if found else "-" for n in names})
        flat["crf.bilateral"] = "True" if found else "-"  # segdist's DenseCRF always runs the bilateral term
    return flat


@pytest.mark.parametrize("row", log_rows(), ids=lambda r: f"{r['study']}:{r['variant']}:{r['result'][:12]}")
def test_each_row_trains_as_its_script_did(row):
    flat = actual(row)
    wrong = {k: (flat[k], v) for k, v in expected(row).items() if flat[k] != v}
    assert not wrong, f"{row['row']}: (segdist, recipes.md) {wrong}"


def test_a_row_without_a_fix_keeps_the_original_value():
    """The fixes are the only differences: a row whose flip were not fixed would fail."""
    row = next(r for r in log_rows() if r["variant"] == "naked.gcn.lr10")
    assert expected(row)["eval.flip"] == "True" and row["eval.flip"] == "False"
    assert expected(row)["model.gcn_style"] == "paper" and row["model.gcn_style"] == "original"
    crf = next(r for r in log_rows() if r["row"] == "bi_xy_std = 67, bi_rgb_std = 3")
    assert (crf["crf.pos_w"], crf["crf.bi_w"], crf["crf.bilateral"]) == ("4", "5", "False")  # the code's
    assert (expected(crf)["crf.pos_w"], expected(crf)["crf.bi_w"], expected(crf)["crf.bilateral"]) == ("3", "4", "True")


def test_every_fix_and_every_rows_uncertainty_is_in_the_readme():
    readme = (SPACES / "README.md").read_text()
    for fix in set(FIXES) | ALWAYS_FIXED:
        assert f"`{fix}`" in readme, fix
    for r in log_rows():
        assert f"`{r['variant']}`" in readme, r["variant"]
        assert r["uncertain"].replace("|", "\\|") in readme, r["row"]


@pytest.mark.parametrize("study_name", TRAINING_STUDIES)
def test_studies_run_on_gpus_with_at_least_three_seeds(study_name):
    study = load_study(SPACES / f"{study_name}.yaml")
    assert study.max_concurrent_trials > 1 and study.screening is None  # ASHA would bias the statistics
    assert len(study.seeds.initial) >= 3 and study.seeds.max_seeds >= 3
    for config in expand_configs(study):
        r = config.recipe.resources
        assert r.gpus_per_worker >= 1 and r.cpus_per_worker >= 4
        assert config.recipe.model.depth == 101 and config.recipe.model.pretrained == "tensorpack"
        data = config.data
        dataset = config.recipe.train.dataset
        assert dataset in data.train_shards and dataset in data.val_shards
        assert data.train_shards.endswith(config.recipe.train.train_list)


def test_per_configuration_resources_and_passes():
    """The 4-GPU row: 4 workers x its per-GPU batch 8, 32 passes per epoch (each GPU draws its
    own batches, as tensorpack's trainer did); the 1-GPU rows 8."""
    configs = study_configs("voc_baseline")
    four, one = configs["naked.4gpu.bs8"].recipe, configs["naked.bs8"].recipe
    assert (four.resources.workers, four.train.batch_size, four.passes_per_epoch) == (4, 8, 32)
    assert (one.resources.workers, one.train.batch_size, one.passes_per_epoch) == (1, 8, 8)
    # 10582 train_aug images: floor(10582 / 8) x 8 steps per epoch whatever the workers
    assert four.steps_per_epoch(10582, 4) == one.steps_per_epoch(10582, 1) == 1322 * 8


def test_crf_grid_is_the_logs_grid_with_the_bilateral_term():
    from segdist.crf import load_crf_grid

    grid = load_crf_grid(SPACES / "crf_grid.yaml")
    combos = [(p.iter_max, p.pos_w, p.pos_xy_std, p.bi_w, p.bi_xy_std, p.bi_rgb_std) for p in grid.combinations()]
    assert combos == [(10, 3, 1, 4, 67, 3), (10, 3, 1, 4, 67, 10)]


# ----------------------------------------------------------------- --smoke: train every configuration

SMOKE_CASES = [(name, variant) for name in TRAINING_STUDIES for variant in sorted(study_configs(name))]


@pytest.mark.parametrize(("study_name", "variant"), SMOKE_CASES, ids=[f"{s}:{v}" for s, v in SMOKE_CASES])
def test_every_configuration_trains_one_smoke_epoch(study_name, variant, tiny_shards):
    train_dir, val_dir = tiny_shards
    study = smoke_study(load_study(SPACES / f"{study_name}.yaml"), str(train_dir), str(val_dir))
    (config,) = [c for c in expand_configs(study) if c.recipe.model.variant == variant]
    r = config.recipe
    # the tiny sizes hold whatever the variant's tokens say (size512, 4gpu, scale8, full)
    assert (r.model.depth, r.model.width, r.model.pretrained) == (18, 4, None)
    assert (r.train.epochs, r.train.batch_size, r.train.crop_size, r.train.epoch_scale) == (1, 2, (32, 32), 1.0)
    assert r.resources.workers == 1 and r.eval.tile in (None, (32, 32))
    reports = []
    fit(config, rank=0, world_size=1, device=torch.device("cpu"),
        report=lambda report, state: reports.append(report))
    assert [report.epoch for report in reports] == [0]
    metrics = reports[0].metrics
    assert math.isfinite(metrics["val_miou"]) and 0.0 <= metrics["val_miou"] <= 1.0
    assert math.isfinite(metrics["train_loss"])
    # the recipe's own evaluation (scales, flip, tiles, boundary statistics) ran at the last epoch
    assert math.isfinite(metrics["final_miou"])
    for k in r.eval.boundary_kernels:
        assert {f"final_boundary{k}_miou", f"final_inner{k}_miou"} <= set(metrics), k


@pytest.mark.parametrize("study_name", TRAINING_STUDIES)
def test_smoke_dry_run_lists_every_configuration_once(study_name, tmp_path, monkeypatch, capsys):
    from segdist.tune import main

    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(SPACES / f"{study_name}.yaml"), "--smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = len(study_configs(study_name))
    assert f"{n} trials ({n} configurations x seeds; seeds [0]; protocol original)" in out
    for variant in study_configs(study_name):
        assert f"variant={variant} " in out


def test_explain_prints_every_configurations_recipe(capsys):
    from segdist.tune import main

    assert main(["--space", str(SPACES / "voc_baseline.yaml"), "--explain", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "protocol original, 3 configurations" in out
    assert "| train.optimizer | adam_tf1 |" in out  # shared by all: once, in the common table
    assert "| eval.scales | 0.9,1,1.1 |" in out
    for variant in study_configs("voc_baseline"):
        assert f" {variant} |" in out
    header = next(line for line in out.splitlines() if line.startswith("| configuration |"))
    assert "resources.workers" in header and "train.crop_size" in header and "model.classifier_bias" in header


# ----------------------------------------------------------------- the real runner, smoke-sized


@pytest.mark.integration
def test_gcn_study_smoke_runs_on_ray_and_records_one_child_run_per_configuration(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    result = run_cli(["segdist.tune", "--space", str(SPACES / "gcn.yaml"), "--smoke",
                      "--tracking-uri", f"sqlite:///{db}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("gcn-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("segdist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("segdist.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["model.variant"] for r in children) == sorted(study_configs("gcn"))
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("segdist.status") == "finished"
        assert run.data.tags["segdist.study_run"] == parents[0].info.run_id
        assert run.data.params["train.seed"] == "0"
        # every recipe field is a param of the trial
        assert run.data.params["train.optimizer"] == "adam_tf1" and run.data.params["recipe.protocol"] == "original"
        assert run.data.params["train.multipliers.decoder"] == "W x10, b x20, decay"
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert [m.step for m in history] == [0] and math.isfinite(history[0].value)
        assert math.isfinite(run.data.metrics["final_miou"])  # the recipe's evaluation
    report = open(client.download_artifacts(parents[0].info.run_id, "report.md")).read()
    assert "naked.gcn.lr10" in report and "naked.fpn.lr10.scale8" in report


@pytest.mark.integration
def test_crf_grid_smoke_saves_probabilities_of_a_smoke_model_and_runs_the_grid(tmp_path):
    """`--smoke` for kind: crf_grid needs no checkpoint: an untrained smoke-size voc.size512
    writes its probabilities over the generated set, and the log's grid runs over them."""
    from mlflow.tracking import MlflowClient

    from segdist.crf import load_crf_grid, read_meta, saved_keys

    db = tmp_path / "mlflow.db"
    result = run_cli(["segdist.tune", "--space", str(SPACES / "crf_grid.yaml"), "--smoke",
                      "--tracking-uri", f"sqlite:///{db}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probs = tmp_path / "data/smoke/probs"
    assert read_meta(probs)["variant"] == "voc.size512" and len(saved_keys(probs)) == 4
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"{load_crf_grid(SPACES / 'crf_grid.yaml').name}-smoke")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("segdist.role") == "trial"]
    assert len(children) == len(load_crf_grid(SPACES / "crf_grid.yaml").combinations())
    assert all(r.info.status == "FINISHED" and 0 <= r.data.metrics["val_miou"] <= 1 for r in children)


@pytest.mark.integration
def test_a_study_with_an_awkward_name_runs_and_reports(tmp_path):
    """Quotes, spaces, parentheses and non-ASCII in a study's name reach the MLflow
    experiment, run names, filter strings, the Tune storage path and the report."""
    name = "it's a \"test\" (Straße) 日本"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": name, "model": {"variant": "naked"}, "seeds": [0]},
                                                        allow_unicode=True))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(["segdist.tune", "--space", "study.yaml", "--smoke", "--tracking-uri", uri,
                      "--storage", str(tmp_path / "rr")], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rr" / f"{name}-smoke").is_dir()
    report = run_cli(["segdist.report", "--experiment", f"{name}-smoke", "--tracking-uri", uri], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "| naked |" in report.stdout and "| 1 |" in report.stdout
