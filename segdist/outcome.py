"""How a trial ended, decided in one place for the seed searcher (segdist.tune), the MLflow
callback (segdist.mlflow_callback), the study runner's exit status and the report.

    finished       its last report is the last epoch's: the trial has a headline value
    stopped_early  ended without an error before its last epoch (ASHA screening stopped it)
    diverged       a non-finite loss (segdist.train.TrainingDiverged): its last report says so
                   (EpochReport.diverged) or its error names it; a result, not a fault
    failed         any other error, retries included (Ray Train's max_failures)

Only `finished` trials enter the seed statistics; the others are counted in the report.
"""

from __future__ import annotations

from typing import Any

from segdist.epoch_report import REPORT_KEY, EpochReport

FINISHED, STOPPED_EARLY, DIVERGED, FAILED = "finished", "stopped_early", "diverged", "failed"


def trial_outcome(last_result: dict[str, Any] | None, epochs: int, error: object = None) -> str:
    """The outcome of a trial from its last Tune result (None: it reported nothing), its
    recipe's epoch count and the error Tune gave it (None or "" when it ended cleanly; any
    object, read as text: Ray wraps the worker's exception)."""
    text = str(error or "")
    if text:
        return DIVERGED if "TrainingDiverged" in text else FAILED
    last = last_result or {}
    if REPORT_KEY in last and EpochReport.from_result(last).diverged:
        return DIVERGED
    return FINISHED if last.get("epoch", -1) >= epochs - 1 else STOPPED_EARLY
