"""How a trial ended: the one decision every consumer uses (segdist.outcome)."""

import math

import pytest

from segdist.epoch_report import EpochReport
from segdist.outcome import DIVERGED, FAILED, FINISHED, STOPPED_EARLY, trial_outcome

# what segdist.train.ray_train_loop reports when the loss of epoch 2 became NaN
DIVERGED_REPORT = EpochReport(2, {"val_miou": math.nan}, diverged="loss is not finite in epoch 2").result()


@pytest.mark.parametrize("last, epochs, error, expected", [
    ({"epoch": 2, "final_miou": 0.5}, 3, None, FINISHED),
    ({"epoch": 1}, 3, None, STOPPED_EARLY),  # ASHA ended it cleanly before its last epoch
    (None, 3, None, STOPPED_EARLY),
    ({"epoch": 2}, 3, "", FINISHED),  # an empty error is no error
    ({"epoch": 2}, 3, "ray.exceptions.RayTaskError(TrainingDiverged): loss is not finite", DIVERGED),
    ({"epoch": 0}, 3, RuntimeError("worker died"), FAILED),
    (None, 1, "failed", FAILED),
    (DIVERGED_REPORT, 3, None, DIVERGED),  # a diverged last epoch is no finished trial
    (DIVERGED_REPORT, 5, None, DIVERGED),
    (EpochReport(2, {"val_miou": 0.5}).result(), 3, None, FINISHED),
])
def test_trial_outcome(last, epochs, error, expected):
    assert trial_outcome(last, epochs, error) == expected


def test_only_the_outcome_module_names_the_outcomes():
    """No other module spells an outcome or re-derives one from the error text."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "segdist"
    for path in root.rglob("*.py"):
        if path.name == "outcome.py":
            continue
        text = path.read_text()
        for needle in ('"stopped_early"', '"diverged"', '"TrainingDiverged" in'):
            assert needle not in text, f"{path}: {needle}"
