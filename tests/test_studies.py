"""The study files of tune_spaces/: one per table of the research log
(/work/shared/reference/000_228ee7611dc2548c.txt), each row mapped to a configuration.

ROWS lists, per study, every log row it reproduces and the variant that trains it, so a
row dropped from (or added to) a YAML fails here. Every configuration of every study is
then trained for one tiny epoch (the `--smoke` sizes) in this process, without Ray.
"""

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch

from segdist.config import apply_variant_tokens, expand_configs, load_study, smoke_study
from segdist.models.variant import parse_variant
from segdist.train import fit
from tests.conftest import ROOT, run_cli

SPACES = ROOT / "tune_spaces"

# study -> {log row (its Arch/Params cell, minus checkpoint sizes): variant}. Rows that map
# to the same variant are one trained configuration read twice (see tune_spaces/README.md).
ROWS = {
    "sobel_fpn": {
        "deeplabv2.naked.fpn.standard(lr10,scale8)": "naked.fpn.standard.lr10.scale8",
        "deeplabv2.naked.fpnstandard.learnable.sobel.channelwise(lr10)":
            "naked.fpn.standard.learnable.sobel.channelwise.lr10",
        "deeplabv2.naked.fpn.standard.scale10(lr10)": "naked.fpn.standard.scale10.lr10",
        "deeplabv2.naked.fpn.standard.scale10(lr12)": "naked.fpn.standard.scale10.lr12",
        "deeplabv2.naked.fpn(lr10,scale8)": "naked.fpn.lr10.scale8",
        "deeplabv2.naked.fpn.learnable.sobel.channelwise(lr10,2order)":
            "naked.fpn.learnable.sobel.channelwise.2order.lr10",
        "deeplabv2.naked.fpn.learnable.sobel.channelwise.1order(lr10)":
            "naked.fpn.learnable.sobel.channelwise.1order.lr10",
        "deeplabv2.naked.fpn.learnable.sobel.channelcross.1order.py(lr10)":
            "naked.fpn.learnable.sobel.channelcross.1order.lr10",
        "deeplabv2.naked.fpn.learnable.sobel.channelwise.1order.relu":
            "naked.fpn.learnable.sobel.channelwise.1order.relu",
        "deeplabv2.naked.fpn.learnable.sobel.resblock.1order.py(lr10)":
            "naked.fpn.learnable.sobel.resblock.1order.lr10",
        "deeplabv2.naked.fpn.scale10(lr10)": "naked.fpn.scale10.lr10",
        "deeplabv2.naked.fpn.scale12(lr10)": "naked.fpn.scale12.lr10",
        "deeplabv2.naked.fpn.bilinear(lr10)": "naked.fpn.bilinear.lr10",
        "deeplabv2.naked.fpn.lr1": "naked.fpn.lr1",
        "deeplabv2.naked.fpn.learnable.sobel.channelwise.lr1": "naked.fpn.learnable.sobel.channelwise.lr1",
        "deeplabv2.naked.fpn.learnable.sobel.channelcross.lr1": "naked.fpn.learnable.sobel.channelcross.lr1",
    },
    "sobel": {
        "deeplabv2.naked": "naked",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,edge)": "naked.edge",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,edgescale)": "naked.edgescale",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,edge.conv3)": "naked.edge.conv3",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,sobel.lr10)": "naked.sobel.lr10",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,sobel)": "naked.sobel",
        # struck through in the log, but trained: real configurations
        "~~Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,sobel-res234)~~": "naked.sobel-res234",
        "~~Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,sobellast)~~": "naked.sobellast",
        "~~Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,sobel.head)~~": "naked.sobel.head",
        "deeplabv2.naked.edge.learnable.sobel": "naked.edge.learnable.sobel",
        "deeplabv2.naked.edge.learnable.sobel.channelwise": "naked.edge.learnable.sobel.channelwise",
        "deeplabv2.naked.edge.learnable.sobel.channelwise.lr10": "naked.edge.learnable.sobel.channelwise.lr10",
        "deeplabv2.naked.edge.learnable.sobel.channelwise.lr1.newcode":
            "naked.edge.learnable.sobel.channelwise.lr1.newcode",
        "deeplabv2.naked.edge.learnable.sobel.channelwise.lr10.newcode":
            "naked.edge.learnable.sobel.channelwise.lr10.newcode",
    },
    "gcn": {
        "deeplabv2.naked.gcn(lr10)": "naked.gcn.lr10",
        # control from the "sobel FPN" table: the GCN table has no baseline row
        "deeplabv2.naked.fpn(lr10,scale8)": "naked.fpn.lr10.scale8",
    },
    "trimap": {
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8,trimap)": "naked.trimap",
        "Deeplabv2-resnet101-pascal(edgemix)": "naked.voc.edgemix",
        # control from the "sobel" table: the trimap table has no hard-label row
        "deeplabv2.naked": "naked",
    },
    "voc_baseline": {
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,4GPU,bs32)": "naked.bs32",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF,1GPU,bs8)": "naked.bs8",
        "Deeplabv2-resnet101(no multi-branch,no ASPP,no MSF,1GPU,bs8)": "naked.bs8",  # same model, single scale
        "deeplabv2.voc.size512": "voc.size512",
        "deeplabv2.voc.size512.randomresizefix": "voc.size512",  # segdist always resizes labels nearest
    },
    "cityscapes": {
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF(321x321),1GPU,bs8, 321x321,scale3)":
            "cs.naked.size321.bs8.scale3",
        "deeplabv2.cs.resnet101.scale3": "cs.naked.size321.bs8.scale3",  # the same tokens under the defaults
        "Deeplabv2-resnet101(no multi-branch,no ASPP,with MSF(1024x2048),1GPU,bs1,full,scale3)":
            "cs.naked.full.bs1.scale3",
        "deeplabv2.cs.resnet101.scale8(randomresizefix,full,aug,bs1,msf)":
            "cs.resnet101.scale8.randomresizefix.full.aug.bs1.msf",
        "deeplabv2.cs.resnet101.scale8": "cs.resnet101.scale8",
        "deeplabv2.cs.naked.fpn(lr10)": "cs.naked.fpn.lr10",
        "deeplabv2.cs.naked.fpn.learnable.sobel.resblock.1order": "cs.naked.fpn.learnable.sobel.resblock.1order",
        "deeplabv2.cs.naked.fpn.learnable.sobel.channelwise.1order(lr10)":
            "cs.naked.fpn.learnable.sobel.channelwise.1order.lr10",
        "Deeplabv2-resnet101-cs(edgemix)": "cs.naked.edgemix",
    },
    "boundary_stats": {
        **{f"SPK,kernel={k}": "naked.spk" for k in (19, 15, 11)},
        **{f"baseline,kernel={k}": "naked" for k in (19, 15, 11)},
    },
}

BASELINES = {
    "sobel_fpn": "naked.fpn.lr10.scale8",
    "sobel": "naked",
    "gcn": "naked.fpn.lr10.scale8",
    "trimap": "naked",
    "voc_baseline": "naked.bs8",
    "cityscapes": "cs.naked.size321.bs8.scale3",
    "boundary_stats": "naked",
}

ADAPTIVE = {"sobel_fpn", "sobel"}  # many close variants: seeds go where the ranking is uncertain
TRAIN_TOKENS = ("head_lr_mult", "epoch_scale", "crop_size", "batch_size")


def model_facts(variant) -> dict:
    """What a Variant says besides its name and training tokens. `randomresizefix` is left
    out: segdist always resizes labels nearest, so the flag is a marker only."""
    skip = {"name", "randomresizefix", *TRAIN_TOKENS}
    return {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant) if f.name not in skip}


def configurations(study_name: str) -> list[str]:
    return list(dict.fromkeys(ROWS[study_name].values()))


def study_path(study_name: str) -> Path:
    return SPACES / f"{study_name}.yaml"


def test_every_table_of_the_log_has_a_study():
    assert sorted(ROWS) == sorted(BASELINES)
    shipped = {p.stem for p in SPACES.glob("*.yaml")} - {"quickstart", "crf_grid"}
    assert set(ROWS) <= shipped


@pytest.mark.parametrize("study_name", sorted(ROWS))
def test_study_has_one_configuration_per_mapped_log_row(study_name):
    study = load_study(study_path(study_name))
    configs = expand_configs(study)
    assert study.name == study_name
    # The exact list, in order: a row dropped from the YAML (or one added) fails here.
    assert [c.model.variant for c in configs] == configurations(study_name)
    assert len({c.config_id for c in configs}) == len(configs)
    for config in configs:
        parse_variant(config.model.variant)  # raises on an unknown token


@pytest.mark.parametrize("study_name", sorted(ROWS))
def test_each_variant_trains_what_its_log_row_says(study_name):
    """Where the log's own name parses, it and the study's variant agree on the model and,
    under the study's defaults, on the training values: the rewriting lost no token."""
    study = load_study(study_path(study_name))
    base = study.base.train
    checked = 0
    for row, variant in ROWS[study_name].items():
        if not row.lower().startswith("deeplabv2."):
            continue  # a description, not a variant name (checked by hand in the README)
        assert model_facts(parse_variant(variant)) == model_facts(parse_variant(row)), f"{row} -> {variant}"
        assert apply_variant_tokens(base, row) == apply_variant_tokens(base, variant), f"{row} -> {variant}"
        checked += 1
    assert checked or study_name == "boundary_stats"


@pytest.mark.parametrize("study_name", sorted(ROWS))
def test_study_runs_on_gpus_with_at_least_three_seeds(study_name):
    study = load_study(study_path(study_name))
    res = study.resources
    assert res.gpus_per_worker >= 1 and res.cpus_per_worker >= 4 and res.max_concurrent_trials > 1
    assert len(study.seeds.initial) >= 3 and study.seeds.max_seeds >= 3
    assert study.seeds.adaptive == (study_name in ADAPTIVE)
    if study.seeds.adaptive:
        assert study.seeds.max_seeds > len(study.seeds.initial)
    assert study.baseline == BASELINES[study_name]
    assert study.baseline in configurations(study_name)
    base = study.base
    assert base.model.depth == 101 and base.model.width == 64 and base.model.pretrained
    assert base.train.precision == "bf16" and base.train.optimizer == "sgd"
    assert base.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5) and base.eval.flip
    assert study.screening is None  # ASHA would bias the seed statistics


@pytest.mark.parametrize("study_name", sorted(ROWS))
def test_cityscapes_rows_run_only_on_cityscapes_shards(study_name):
    study = load_study(study_path(study_name))
    datasets = {parse_variant(c.model.variant).dataset for c in expand_configs(study)}
    if study_name == "cityscapes":
        assert datasets == {"cityscapes"}
        assert "cityscapes" in study.base.data.train_shards and "cityscapes" in study.base.data.val_shards
    else:
        assert "cityscapes" not in datasets
        assert "voc" in study.base.data.train_shards and "voc" in study.base.data.val_shards


def test_study_specific_settings():
    assert load_study(study_path("boundary_stats")).base.eval.boundary_kernels == (11, 15, 19)
    by_variant = {c.model.variant: c.train for c in expand_configs(load_study(study_path("voc_baseline")))}
    assert (by_variant["naked.bs32"].batch_size, by_variant["naked.bs8"].batch_size) == (32, 8)
    assert by_variant["voc.size512"].crop_size == 512
    by_variant = {c.model.variant: c.train for c in expand_configs(load_study(study_path("cityscapes")))}
    assert by_variant["cs.naked.full.bs1.scale3"].batch_size == 1
    assert by_variant["cs.naked.size321.bs8.scale3"].epoch_scale == 3
    # A row without lrN trains at 1x (the original's multiplier matched no variable).
    by_variant = {c.model.variant: c.train for c in expand_configs(load_study(study_path("sobel")))}
    assert by_variant["naked.sobel"].head_lr_mult == 1 and by_variant["naked.sobel.lr10"].head_lr_mult == 10


# ----------------------------------------------------------------- --smoke: train every configuration

SMOKE_CASES = [(name, variant) for name in sorted(ROWS) for variant in configurations(name)]


@pytest.mark.parametrize(("study_name", "variant"), SMOKE_CASES, ids=[f"{s}:{v}" for s, v in SMOKE_CASES])
def test_every_configuration_trains_one_smoke_epoch(study_name, variant, tiny_shards):
    train_dir, val_dir = tiny_shards
    study = smoke_study(load_study(study_path(study_name)), str(train_dir), str(val_dir))
    (config,) = [c for c in expand_configs(study) if c.model.variant == variant]
    # the tiny sizes hold whatever the variant's tokens say (size512, bs32, scale8, full)
    assert (config.model.depth, config.model.width, config.model.pretrained) == (18, 4, None)
    assert (config.train.epochs, config.train.batch_size, config.train.crop_size, config.train.epoch_scale) == (
        1, 2, 32, 1.0)
    reports = []
    started = time.perf_counter()
    fit(config, rank=0, world_size=1, device=torch.device("cpu"),
        report=lambda metrics, state: reports.append(metrics))
    assert time.perf_counter() - started < 60
    assert [m["epoch"] for m in reports] == [0]
    assert math.isfinite(reports[0]["val_miou"]) and 0.0 <= reports[0]["val_miou"] <= 1.0
    assert math.isfinite(reports[0]["train_loss"])
    # the study's own evaluation (MSF + flip, boundary statistics) ran at the last epoch
    assert math.isfinite(reports[0]["final_miou"])
    for k in config.eval.boundary_kernels:
        assert {f"final_boundary{k}_miou", f"final_inner{k}_miou"} <= set(reports[0]), k


@pytest.mark.parametrize("study_name", sorted(ROWS))
def test_smoke_dry_run_lists_every_configuration_once(study_name, tmp_path, monkeypatch, capsys):
    from segdist.tune import main

    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(study_path(study_name)), "--smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = len(configurations(study_name))
    assert f"{n} trials ({n} configurations x seeds; seeds [0])" in out
    for variant in configurations(study_name):
        assert f"variant={variant} " in out


# ----------------------------------------------------------------- the real runner, smoke-sized


@pytest.mark.integration
def test_gcn_study_smoke_runs_on_ray_and_records_one_child_run_per_configuration(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    result = run_cli(["segdist.tune", "--space", str(study_path("gcn")), "--smoke",
                      "--tracking-uri", f"sqlite:///{db}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("gcn-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("segdist.role") == "study"]
    children = [r for r in runs if r.data.tags.get("segdist.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["model.variant"] for r in children) == sorted(configurations("gcn"))
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("segdist.status") == "finished"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["train.seed"] == "0"
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert [m.step for m in history] == [0] and math.isfinite(history[0].value)
        assert math.isfinite(run.data.metrics["final_miou"])  # the study's MSF evaluation
    report = open(client.download_artifacts(parents[0].info.run_id, "report.md")).read()
    assert "naked.gcn.lr10" in report and "naked.fpn.lr10.scale8" in report
