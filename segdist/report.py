"""`python -m segdist.report`: the seed-aggregated results table of a study, from MLflow.

One row per configuration (the seed taken out): mean ± std of the final epoch's metric,
the number of seeds, min–max. Trials that failed or diverged are counted, not averaged.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from segdist.errors import SegdistError, exit_on_user_error
from segdist.tracking import PARENT_TAG, STUDY_TAG, resolve_tracking_uri


@dataclass
class ConfigRow:
    config_id: str
    label: str
    values: list[float] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    failed: int = 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else float("nan")


def config_label(params: dict[str, str]) -> str:
    """What distinguishes a configuration: its variant plus the values the search chose."""
    label = params.get("model.variant", "?")
    chosen = params.get("overrides", "")
    return f"{label} {chosen}".strip() if chosen not in ("", "{}") else label


def collect_rows(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str) -> list[ConfigRow]:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50000
    )
    rows: dict[str, ConfigRow] = {}
    for run in runs:
        params = run.data.params
        config_id = params.get("config_id", run.info.run_id)
        row = rows.setdefault(config_id, ConfigRow(config_id, config_label(params)))
        value = run.data.metrics.get(metric)
        if run.info.status == "FINISHED" and value is not None:
            row.values.append(value)
            row.seeds.append(params.get("train.seed", "?"))
        else:
            row.failed += 1
    return sorted(rows.values(), key=lambda r: (-r.mean if r.values else float("inf"), r.label))


def format_markdown(rows: list[ConfigRow], metric: str) -> str:
    lines = [
        f"| configuration | config_id | {metric} (mean ± std, %) | seeds | min–max (%) | failed |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.values:
            spread = "" if len(row.values) < 2 else f" ± {100 * row.std:.2f}"
            mean = f"{100 * row.mean:.2f}{spread}"
            span = f"{100 * min(row.values):.2f}–{100 * max(row.values):.2f}"
        else:
            mean, span = "—", "—"
        lines.append(f"| {row.label} | {row.config_id} | {mean} | {len(row.values)} | {span} | {row.failed} |")
    return "\n".join(lines)


def study_table(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str = "val_miou") -> str:
    return format_markdown(collect_rows(client, experiment_id, parent_run_id, metric), metric)


def latest_study_run(client: MlflowClient, experiment_id: str) -> str:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` != ''",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise SegdistError("the experiment has no study runs yet; run `python -m segdist.tune` first")
    return runs[0].info.run_id


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.report",
        description="Print a study's results aggregated over seeds (markdown), read from MLflow.",
    )
    parser.add_argument("--experiment", default="quickstart", help="MLflow experiment (= study name)")
    parser.add_argument("--run", default=None, help="parent (study) run id; default: the latest study run")
    parser.add_argument("--metric", default="val_miou", help="final-epoch metric to aggregate")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    from segdist.tracking import check_reachable

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SegdistError(f"no MLflow experiment named {args.experiment!r} in {uri}")
    parent = args.run or latest_study_run(client, experiment.experiment_id)
    print(study_table(client, experiment.experiment_id, parent, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
