"""The middle level of a study in MLflow: one run per configuration, between the study's run
and its seed runs (study -> configuration -> seed), so that the MLflow UI compares
configurations directly.

A configuration's run holds the configuration's params (every recipe field but the seed,
its model facts and its readable label) and, updated each time one of its seeds finishes,
the seed aggregates of the headline metric as metrics at step n (the number of finished
seeds): `<metric>_mean`, `_std`, `_ci_low`, `_ci_high` (95%, t distribution; segdist.stats),
`seeds`, and, against the study's baseline, `<metric>_delta` and `<metric>_welch_p`; its seed
plot is the artifact `seeds.png`. Values are fractions (0..1), as the seed runs log them.
Failed, diverged and early-stopped seeds are not averaged (segdist.report counts them).
"""

from __future__ import annotations

import math
from typing import Any

from segdist.stats import HEADLINE_METRIC, summarize, welch_p_value

CONFIGURATION_ROLE = "configuration"


def configuration_handle(config_id: str) -> str:
    """The tracker handle (and trial-key tag) of a configuration's run."""
    return f"configuration {config_id}"


def aggregate_metrics(values: list[float], baseline: list[float] | None,
                      metric: str = HEADLINE_METRIC) -> dict[str, float]:
    """A configuration's seed aggregates (module docstring) for its finished seeds' `values`;
    the delta and Welch's p against `baseline`'s values when given (None: no baseline, or
    this configuration is it). The interval is clipped to 0..1 (an mIoU cannot leave it).
    Non-finite values (a one-seed interval, p of < 2 seeds) are left out, as MLflow charts
    cannot show them."""
    summary = summarize(values)
    # clipped to 0..1, as the report shows it: a t interval of two seeds is usually wider
    low, high = (max(0.0, summary.ci_low), min(1.0, summary.ci_high)) if summary.n > 1 else (math.nan, math.nan)
    metrics = {"seeds": float(summary.n), f"{metric}_mean": summary.mean, f"{metric}_std": summary.std,
               f"{metric}_ci_low": low, f"{metric}_ci_high": high}
    if baseline:
        metrics[f"{metric}_delta"] = summary.mean - summarize(baseline).mean
        metrics[f"{metric}_welch_p"] = welch_p_value(values, baseline)
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


def finished_values(runs: dict[str, Any], metric: str = HEADLINE_METRIC) -> dict[str, dict[int, float]]:
    """config_id -> {seed: `metric`} of the seed runs (trial key -> MLflow run) that finished."""
    from segdist.mlflow_store import STATUS_TAG
    from segdist.outcome import FINISHED

    values: dict[str, dict[int, float]] = {}
    for run in runs.values():
        params, value = run.data.params, run.data.metrics.get(metric)
        if run.data.tags.get(STATUS_TAG) == FINISHED and value is not None and "config_id" in params:
            values.setdefault(params["config_id"], {})[int(params.get("train.seed", -1))] = value
    return values


class ConfigurationRuns:
    """The configuration runs of one study, written through its StudyTracker.

    `existing`: handle -> MLflow run of configuration runs a resumed study already has;
    `finished`: config_id -> {seed: headline value} of its seeds that already finished;
    `baseline`: the study's baseline (a variant, label or config_id), or None."""

    def __init__(self, tracker, existing: dict[str, Any] | None = None,
                 finished: dict[str, dict[int, float]] | None = None, baseline: str | None = None):
        self.tracker, self.existing, self.baseline = tracker, dict(existing or {}), baseline
        self.values: dict[str, dict[int, float]] = {k: dict(v) for k, v in (finished or {}).items()}
        self.names: dict[str, set[str]] = {}  # config_id -> what a baseline may call it
        self.labels: dict[str, str] = {}
        self.started: set[str] = set()

    def start(self, config_id: str, label: str, variant: str, params: dict[str, Any]) -> str:
        """The handle of the configuration's run, queued (or reopened) on its first seed."""
        handle = configuration_handle(config_id)
        self.names[config_id], self.labels[config_id] = {config_id, label, variant}, label
        if handle not in self.started:
            previous = self.existing.get(handle)
            self.tracker.start_trial(label, handle, params, role=CONFIGURATION_ROLE,
                                     run_id=previous.info.run_id if previous is not None else None)
            self.started.add(handle)
        return handle

    def record(self, config_id: str, seed: int, value: float) -> None:
        """A seed of the configuration finished with `value`: its aggregates and seed plot
        again, and every other configuration's delta when it is the baseline."""
        self.values.setdefault(config_id, {})[seed] = value
        base = self._baseline_id()
        for other in (self.values if config_id == base else [config_id]):
            self._log(other, base)

    def end(self) -> None:
        """At the study's end: every configuration run started here ends FINISHED."""
        for handle in sorted(self.started):
            self.tracker.finish(handle, "FINISHED")

    def _baseline_id(self) -> str | None:
        return next((c for c, names in self.names.items() if self.baseline in names), None)

    def _log(self, config_id: str, base: str | None) -> None:
        handle = configuration_handle(config_id)
        if handle not in self.started or not self.values.get(config_id):
            return
        values = list(self.values[config_id].values())
        baseline = list(self.values.get(base, {}).values()) if base not in (None, config_id) else None
        self.tracker.log_metrics(handle, aggregate_metrics(values, baseline), step=len(values))
        from segdist.report import ConfigRow, seeds_figure  # report reads MLflow through mlflow_store

        row = ConfigRow(config_id, self.labels[config_id], values=values, seeds=list(self.values[config_id]))
        self.tracker.log_image(handle, seeds_figure([row], HEADLINE_METRIC), "seeds.png")
