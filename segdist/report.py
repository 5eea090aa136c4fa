"""`python -m segdist.report`: a study's results aggregated over seeds, from MLflow.

One row per configuration (the seed taken out): mean ± std of the final epoch's metric,
the number of seeds, the 95% confidence interval (t distribution), min–max, the
difference to a baseline configuration with Welch's t-test p-value, boundary/inner
statistics when the study measured them, and the trials that did not finish (failed,
diverged or stopped early by screening), which are counted but never averaged.

With no arguments it reports the latest study in the store (and says which on stderr),
against the baseline its study file names; an interval of fewer than three seeds is
flagged, and clipped to 0-100.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.entities import LifecycleStage, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segdist.errors import SegdistError, exit_on_user_error
from segdist.mlflow_store import (
    CONFIGURATION_PARAM,
    PARENT_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_RUN_TAG,
    client_for,
    experiment_by_name,
    mlflow_key,
    quote_filter_value,
    resolve_tracking_uri,
)
from segdist.outcome import FAILED, FINISHED
from segdist.stats import HEADLINE_METRIC, Summary, summarize, welch_p_value

# The final epoch's evaluation with the study's settings (MSF, flip) is what seeds compare.
BOUNDARY_METRIC = re.compile(r"^final_(boundary|inner)(\d+)_miou$")


@dataclass
class ConfigRow:
    config_id: str
    label: str
    variant: str = ""
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)  # boundary/inner metrics
    not_finished: dict[str, int] = field(default_factory=dict)
    restarts: int = 0  # worker-group restarts (lost workers or nodes, resumed studies)
    decision: str = ""

    @property
    def summary(self) -> Summary:
        return summarize(self.values)


def config_label(params: dict[str, str]) -> str:
    """What distinguishes a configuration: its variant plus the values the search chose (the
    run's `configuration` param, mlflow_callback.configuration_label; rebuilt for older runs)."""
    if CONFIGURATION_PARAM in params:
        return params[CONFIGURATION_PARAM]
    label = params.get("model.variant", "?")
    chosen = " ".join(part for part in params.get("overrides", "").split() if not part.startswith("model.variant="))
    return f"{label} {chosen}".strip()


def collect_rows(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str) -> list[ConfigRow]:
    quoted = quote_filter_value(parent_run_id)
    if quoted is None:
        raise SegdistError(f"{parent_run_id!r} is not an MLflow run id")
    runs = client.search_runs(  # seed runs (under their configuration's run since it exists)
        [experiment_id], filter_string=f"tags.`{STUDY_RUN_TAG}` = {quoted} and tags.`{ROLE_TAG}` = 'trial'",
        max_results=50000,
    ) or client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = {quoted}", max_results=50000)
    metric = mlflow_key(metric)  # the key the tracker logged the metric under
    rows: dict[str, ConfigRow] = {}
    for run in runs:
        params = run.data.params
        config_id = params.get("config_id", run.info.run_id)
        row = rows.setdefault(config_id, ConfigRow(config_id, config_label(params), params.get("model.variant", "")))
        status = run.data.tags.get(STATUS_TAG, "running" if run.info.status == "RUNNING" else FAILED)
        row.restarts += int(run.data.metrics.get("worker_restarts", 0))
        value = run.data.metrics.get(metric)
        if status == FINISHED and value is not None:
            row.values.append(value)
            row.seeds.append(int(params.get("train.seed", -1)))
            for key, extra in run.data.metrics.items():
                if BOUNDARY_METRIC.match(key):
                    row.extra.setdefault(key, []).append(extra)
        else:
            row.not_finished[status] = row.not_finished.get(status, 0) + 1
    return sorted(rows.values(), key=lambda r: (-r.summary.mean if r.values else float("inf"), r.label))


def find_baseline(rows: list[ConfigRow], baseline: str | None) -> ConfigRow | None:
    if baseline is None:
        return None
    matches = [r for r in rows if baseline in (r.variant, r.label, r.config_id)]
    if not matches:
        raise SegdistError(f"--baseline {baseline!r} matches no configuration; have: "
                           + ", ".join(sorted({r.label for r in rows})))
    return matches[0]


def table_rows(rows: list[ConfigRow], metric: str, baseline: ConfigRow | None) -> tuple[list[str], list[list[str]]]:
    extra_keys = sorted({k for r in rows for k in r.extra},
                        key=lambda k: (int(BOUNDARY_METRIC.match(k).group(2)), k))
    header = ["configuration", "config_id", "n", f"{metric} mean ± std (%)", "95% CI (%)", "min–max (%)"]
    if baseline is not None:
        header.append(f"Δ vs {baseline.label} (p, Welch)")
    show_restarts = any(r.restarts for r in rows)
    header += [f"{k} (%)" for k in extra_keys] + ["not finished"]
    header += ["worker restarts"] if show_restarts else []
    header += ["seeds stopped because"]
    body = []
    for row in rows:
        s = row.summary
        if row.values:
            mean = f"{100 * s.mean:.2f}" + (f" ± {100 * s.std:.2f}" if s.n > 1 else "")
            ci = interval_text(s)
            span = f"{100 * min(row.values):.2f}–{100 * max(row.values):.2f}"
        else:
            mean = ci = span = "—"
        line = [row.label, row.config_id, str(s.n), mean, ci, span]
        if baseline is not None:
            if row is baseline or not row.values or not baseline.values:
                line.append("baseline" if row is baseline else "—")
            else:
                delta = 100 * (s.mean - baseline.summary.mean)
                line.append(f"{delta:+.2f} (p={welch_p_value(row.values, baseline.values):.3g})")
        for key in extra_keys:
            values = row.extra.get(key, [])
            line.append(f"{100 * summarize(values).mean:.2f}" if values else "—")
        line.append(", ".join(f"{n} {status}" for status, n in sorted(row.not_finished.items())) or "0")
        if show_restarts:
            line.append(str(row.restarts))
        line.append(row.decision)
        body.append(line)
    return header, body


FEW_SEEDS = 3  # below this many seeds a t interval is too wide to say much (t = 12.7 at n = 2)


def interval_text(summary: Summary) -> str:
    """The 95% CI in percent, clipped to 0–100 (an mIoU cannot leave it; a t interval of
    two seeds usually does) and flagged below FEW_SEEDS seeds; "—" for one seed."""
    if summary.n < 2:
        return "—"
    low, high = max(0.0, 100 * summary.ci_low), min(100.0, 100 * summary.ci_high)
    flag = f" (n={summary.n}: too few seeds)" if summary.n < FEW_SEEDS else ""
    return f"{low:.2f}–{high:.2f}{flag}"


def format_table(header: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return out.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def study_table(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str = HEADLINE_METRIC,
                baseline: str | None = None, fmt: str = "md", decisions: dict | None = None) -> str:
    rows = collect_rows(client, experiment_id, parent_run_id, metric)
    if decisions is None:
        decisions = load_decisions(client, parent_run_id)
    for row in rows:
        row.decision = decision_text(decisions.get(row.config_id, {}))
    header, body = table_rows(rows, metric, find_baseline(rows, baseline))
    return format_table(header, body, fmt)


def decision_text(decided: dict) -> str:
    """The "seeds stopped because" cell of one configuration's seed decisions
    (seeds.SeedScheduler.decisions): why its seeds stopped, and which seed replaced which."""
    replaced = [f"failed seed {seed} replaced by seed {new}" for seed, new in decided.get("replaced_seeds", {}).items()]
    return "; ".join(part for part in (decided.get("stop_reason", ""), *replaced) if part)


def load_decisions(client: MlflowClient, parent_run_id: str) -> dict:
    try:
        path = client.download_artifacts(parent_run_id, "seed_decisions.json")
    except Exception:  # noqa: BLE001 - a study without the artifact (interrupted) has none
        return {}
    with open(path) as handle:
        return json.load(handle)


def seeds_figure(rows: list[ConfigRow], metric: str) -> bytes:
    """A PNG with every seed's result per configuration, the mean and its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.values]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(shown), 1)))
    for y, row in enumerate(shown):
        s = row.summary
        ax.scatter([100 * v for v in row.values], [y] * len(row.values), s=18, color="tab:blue", zorder=3)
        if s.n > 1:
            ax.errorbar(100 * s.mean, y, xerr=[[100 * (s.mean - s.ci_low)], [100 * (s.ci_high - s.mean)]],
                        fmt="|", color="black", capsize=4, zorder=2)
    ax.set_yticks(range(len(shown)), [r.label for r in shown])
    ax.set_xlabel(f"{metric} (%) — dots: seeds; bars: mean and 95% CI")
    ax.invert_yaxis()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def latest_study_run(client: MlflowClient, experiment_ids: list[str]) -> Run | None:
    """The most recently started study (parent) run in these experiments, or None."""
    if not experiment_ids:
        return None
    runs = client.search_runs(
        experiment_ids, filter_string=f"tags.`{ROLE_TAG}` = 'study'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def study_names(client: MlflowClient) -> list[str]:
    """The active experiments of the store that hold a study run (segdist's studies)."""
    names = []
    for experiment in client.search_experiments(max_results=1000):
        if latest_study_run(client, [experiment.experiment_id]) is not None:
            names.append(experiment.name)
    return sorted(names)


def study_baseline(client: MlflowClient, run: Run) -> str | None:
    """The `baseline` the study file of this study run named (its `study.baseline` param, or,
    for a study recorded before that param, its study.yaml artifact), or None."""
    if "study.baseline" in run.data.params:
        return run.data.params["study.baseline"] or None
    try:
        text = client.download_artifacts(run.info.run_id, "study.yaml")
        raw = yaml.safe_load(Path(text).read_text())
    except (MlflowException, OSError, yaml.YAMLError):
        return None
    baseline = raw.get("baseline") if isinstance(raw, dict) else None
    return str(baseline) if baseline else None


def pick_study(client: MlflowClient, uri: str, experiment_name: str | None, run_id: str | None):
    """(experiment, study run): --run, else the latest study of --experiment, else the latest
    study in the store. SegdistError naming what is missing (an unknown experiment: the
    studies the store holds)."""
    if experiment_name is None:
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        run = client.get_run(run_id) if run_id else latest_study_run(client, ids)
        if run is None:
            raise SegdistError(f"no study in {uri} yet; run `python -m segdist.tune` first")
        return client.get_experiment(run.info.experiment_id), run
    experiment = experiment_by_name(client, experiment_name)
    if experiment is None:
        studies = ", ".join(study_names(client)) or "none"
        raise SegdistError(f"no MLflow experiment named {experiment_name!r} in {uri}; its studies: {studies}")
    if experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise SegdistError(
            f"MLflow experiment {experiment_name!r} (id {experiment.experiment_id}) in {uri} is deleted; restore "
            f"it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}` (running the study again also restores it)")
    run = client.get_run(run_id) if run_id else latest_study_run(client, [experiment.experiment_id])
    if run is None:
        raise SegdistError(f"experiment {experiment_name!r} has no study runs yet; run `python -m segdist.tune` first")
    if run.info.experiment_id != experiment.experiment_id:
        raise SegdistError(f"--run {run_id}: a run of experiment id {run.info.experiment_id}, "
                           f"not of {experiment_name!r} (id {experiment.experiment_id})")
    return experiment, run


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.report",
        description="Print a study's results aggregated over seeds, read from MLflow: mean ± std, "
        "95% CI, Δ vs a baseline with Welch's p-value. Also saved to the study's parent run.",
    )
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (= study name); default: the latest study in the store")
    parser.add_argument("--run", default=None, help="parent (study) run id; default: the latest study run")
    parser.add_argument("--baseline", default=None,
                        help="variant, label or config_id to compare against; default: the study's own baseline")
    parser.add_argument("--metric", default=HEADLINE_METRIC,
                        help="metric to aggregate (default final_miou: the final epoch evaluated with the "
                        "study's eval settings; val_miou: the last epoch's whole-image score)")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the table's
    uri = resolve_tracking_uri(args.tracking_uri)
    from segdist.mlflow_store import check_reachable

    check_reachable(uri)
    client = client_for(uri)
    if args.run:
        try:
            client.get_run(args.run)
        except MlflowException:
            raise SegdistError(f"--run {args.run!r}: no such run in {uri}") from None
    experiment, run = pick_study(client, uri, args.experiment, args.run)
    parent = run.info.run_id
    baseline = args.baseline or study_baseline(client, run)
    print(f"segdist.report: study {experiment.name!r} (run {parent}) in {uri}"
          + (f"; baseline {baseline}" if baseline else ""), file=sys.stderr)
    table = study_table(client, experiment.experiment_id, parent, args.metric, baseline, args.format)
    print(table)
    suffix = mlflow_key(args.metric).replace("/", "_")  # --metric is the user's: one safe file name
    client.log_text(parent, table, f"report_{suffix}.{args.format}")
    rows = collect_rows(client, experiment.experiment_id, parent, args.metric)
    client.log_image(parent, png_image(seeds_figure(rows, args.metric)), f"seeds_{suffix}.png")
    return 0


def png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


if __name__ == "__main__":
    sys.exit(main())
