"""The configuration level of a study in MLflow (segdist.configuration_runs), on a real
sqlite store without Ray: aggregates as seeds finish, the baseline's delta and p, resume."""

import math

import pytest
from mlflow.tracking import MlflowClient

from segdist.configuration_runs import (
    ConfigurationRuns,
    aggregate_metrics,
    configuration_handle,
    finished_values,
)
from segdist.mlflow_store import STATUS_TAG, STUDY_RUN_TAG
from segdist.stats import summarize, welch_p_value
from segdist.tracking import StudyTracker


def test_aggregates_of_one_seed_leave_out_what_one_seed_cannot_say():
    assert aggregate_metrics([0.6], None) == {"seeds": 1.0, "final_miou_mean": 0.6}


def test_the_interval_of_two_seeds_is_clipped_to_what_an_miou_can_be():
    metrics = aggregate_metrics([0.52, 0.67], None)  # t(0.975, 1) = 12.7: 0.595 +- 0.95
    assert (metrics["final_miou_ci_low"], metrics["final_miou_ci_high"]) == (0.0, 1.0)


def test_aggregates_against_a_baseline():
    values, base = [0.60, 0.62, 0.64], [0.55, 0.56, 0.60]
    metrics = aggregate_metrics(values, base)
    s = summarize(values)
    assert metrics["final_miou_ci_low"] == pytest.approx(s.ci_low) and metrics["seeds"] == 3
    assert metrics["final_miou_delta"] == pytest.approx(0.62 - 0.57)
    assert metrics["final_miou_welch_p"] == pytest.approx(welch_p_value(values, base))


def test_configuration_runs_hold_the_seed_aggregates_as_seeds_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "agg", "agg")
    runs = ConfigurationRuns(tracker, baseline="naked")
    base = runs.start("c0", "naked", "naked", {"model.variant": "naked"})
    other = runs.start("c1", "naked lr=0.1", "naked", {"model.variant": "naked", "train.lr": 0.1})
    assert runs.start("c0", "naked", "naked", {}) == base  # one run per configuration
    for seed, value in enumerate([0.50, 0.54]):
        tracker.start_trial(f"naked · seed {seed}", f"c0-seed{seed}", {"train.seed": seed}, parent=base)
        runs.record("c0", seed, value)
    runs.record("c1", 0, 0.60)
    runs.record("c1", 1, 0.64)
    runs.end()
    assert tracker.drain(timeout_s=5)
    client = MlflowClient(uri)
    configuration = client.get_run(tracker.run_ids[other])
    assert configuration.info.status == "FINISHED" and configuration.info.run_name == "naked lr=0.1"
    assert configuration.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert configuration.data.tags[STUDY_RUN_TAG] == tracker.parent_run_id
    metrics = configuration.data.metrics
    assert metrics["seeds"] == 2 and metrics["final_miou_mean"] == pytest.approx(0.62)
    assert metrics["final_miou_delta"] == pytest.approx(0.62 - 0.52)
    assert math.isfinite(metrics["final_miou_welch_p"])
    assert [m.step for m in client.get_metric_history(configuration.info.run_id, "final_miou_mean")] == [1, 2]
    assert "final_miou_delta" not in client.get_run(tracker.run_ids[base]).data.metrics  # it is the baseline
    seed_run = client.get_run(tracker.run_ids["c0-seed1"])
    assert seed_run.data.tags["mlflow.parentRunId"] == tracker.run_ids[base]
    assert [a.path for a in client.list_artifacts(configuration.info.run_id)] == ["seeds.png"]


def test_a_resumed_study_reopens_its_configuration_runs_and_keeps_their_seeds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = StudyTracker(uri, "res", "res")
    runs = ConfigurationRuns(first)
    handle = runs.start("c0", "naked", "naked", {})
    first.start_trial("naked · seed 0", "c0-seed0", {"config_id": "c0", "train.seed": 0}, parent=handle)
    first.log_metrics("c0-seed0", {"final_miou": 0.5}, step=0)
    first.set_tags("c0-seed0", {STATUS_TAG: "finished"})
    runs.record("c0", 0, 0.5)
    assert first.drain(timeout_s=5)

    again = StudyTracker(uri, "res", "res", parent_run_id=first.parent_run_id)
    existing = again.existing_trials()
    assert set(existing) == {"c0-seed0"}
    configurations = again.existing_trials("configuration")
    assert set(configurations) == {configuration_handle("c0")}
    resumed = ConfigurationRuns(again, existing=configurations, finished=finished_values(existing))
    assert resumed.start("c0", "naked", "naked", {}) == handle
    resumed.record("c0", 1, 0.7)
    resumed.end()
    assert again.drain(timeout_s=5)
    run = MlflowClient(uri).get_run(first.run_ids[handle])
    assert run.data.metrics["seeds"] == 2 and run.data.metrics["final_miou_mean"] == pytest.approx(0.6)
    assert again.run_ids[handle] == first.run_ids[handle] and run.info.status == "FINISHED"
