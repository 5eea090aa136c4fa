"""What a trial's worker reports to the driver after each epoch, in explicit parts.

    worker: train.fit / crf.crf_grid_trial --EpochReport.result()--> ray.train.report / ray.tune.report
    driver: Tune result --EpochReport.from_result()--> mlflow_callback.MlflowTrialCallback (MLflow)

Tune's searcher, schedulers and stoppers read a result's metrics as its top-level keys
(`val_miou`, `final_miou`, `epoch`); Ray and Tune add their own bookkeeping keys beside them
(`training_iteration`, `timestamp`, ...). So the result carries the metrics at the top for
Tune, and the whole report once more as one JSON string under REPORT_KEY, which is what
segdist's driver reads: nothing is sorted into metrics, facts and bookkeeping by its name.

Static facts of the model (parameters, FLOPs, output stride) are not reported: the driver
computes them once per configuration from the recipe (`train.model_facts`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from segdist.errors import SegdistError

REPORT_KEY = "segdist_report"  # the result key of the JSON-encoded EpochReport

Fact = str | int | float | bool


@dataclass(frozen=True)
class EpochReport:
    """One epoch of one trial, as rank 0 saw it (other ranks send the same metrics, no facts).

    epoch: 0-based index of the epoch just trained (a CRF trial reports one epoch, 0).
    metrics: name -> value of this epoch's training and evaluation figures (`val_miou` in
        [0, 1], `train_loss`, `lr`, `skipped_*` counts, `train_images_per_s`, `final_*` at the
        last epoch, ...): MLflow metrics at step `epoch`.
    facts: what this worker group's device and weights made of the recipe (`precision`,
        `channels_last`, `tf32`, `pretrained_sha256`); MLflow params `model_<name>`. Sent with
        the first epoch a worker group trains, empty after.
    history: (epoch, metrics) of the epochs before this one that the checkpoint a worker group
        resumed from holds, oldest first; sent with its first epoch, empty otherwise. The
        driver may have died before logging them.
    worker_started_at: time.time() (seconds since the epoch, this host's clock) when the
        training function started on this rank; a new value means the worker group restarted.
    pictures: the final evaluation's pictures are saved beside this report's checkpoint
        (folder `train.PICTURES_DIR`).
    diverged: why training stopped in this epoch with a non-finite loss (train.TrainingDiverged),
        "" otherwise; a diverged trial's last report (its metrics NaN) and a result, not a fault.
    """

    epoch: int
    metrics: dict[str, float]
    facts: dict[str, Fact] = field(default_factory=dict)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    worker_started_at: float = 0.0
    pictures: bool = False
    diverged: str = ""

    def result(self) -> dict[str, Any]:
        """The Tune result: {"epoch", **metrics, REPORT_KEY: this report as JSON}."""
        return {"epoch": self.epoch, **self.metrics, REPORT_KEY: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> EpochReport:
        """The report inside a Tune result made by `result()`. Raises SegdistError when the
        result has none (a trainable that is not segdist's)."""
        if REPORT_KEY not in result:
            raise SegdistError(f"a trial result without {REPORT_KEY!r}: its trainable does not report an EpochReport")
        parts = json.loads(result[REPORT_KEY])
        parts["history"] = [(int(epoch), metrics) for epoch, metrics in parts["history"]]
        return cls(**parts)
