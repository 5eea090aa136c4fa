"""`--resume` for real (Ray, MLflow, tiny shards), once per seed policy: the driver is killed
(its process group, with the local Ray it started) where trials have ended and one is
running; the resumed study must run no ended trial again (its run's end_time unchanged),
continue the running one, make no second run of any trial and log every epoch once. And the
issue-17 case: a study that finished in Ray but whose last trial's status, and the study's
end, never reached MLflow."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_study
from tests.integration.driver import finish, kill_driver, start_tune, steps, trial_runs

pytestmark = pytest.mark.integration

# Two epochs, long enough that a trial is seen between them.
EPOCHS = {"epochs": 2, "batch_size": 2, "crop_size": 40, "scale_range": [0.8, 1.2], "lr": 0.01, "epoch_scale": 4}


def kill_when(process: subprocess.Popen, client: MlflowClient, ended: int, timeout: float = 600):
    """SIGKILL the driver's process group once `ended` trials have their status in MLflow and
    another one has logged an epoch; returns the ended runs as they were then."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        runs = trial_runs(client)
        done = [r for r in runs if "segdist.status" in r.data.tags]
        running = [r for r in runs if "segdist.status" not in r.data.tags and steps(client, r)]
        if len(done) >= ended and running:
            kill_driver(process)
            return done
        time.sleep(0.5)
    code, output = finish(process, timeout=1)
    raise AssertionError(f"{ended} ended trials and one running never seen (exit {code}):\n{output[-6000:]}")


def resume_and_check(space: Path, cwd: Path, client: MlflowClient, before: list, trials: int, epochs: int):
    code, output = finish(start_tune(space, cwd, "--resume"))
    assert code == 0, output[-6000:]
    runs = trial_runs(client)
    assert len(runs) == trials  # no second run of any trial
    assert len({r.data.tags["segdist.trial_key"] for r in runs}) == trials
    for earlier in before:  # ended trials did not run again
        again = next(r for r in runs if r.info.run_id == earlier.info.run_id)
        assert again.info.end_time == earlier.info.end_time
        assert again.data.tags["segdist.status"] == earlier.data.tags["segdist.status"]
    for run in runs:
        assert "segdist.status" in run.data.tags and run.info.status in ("FINISHED", "FAILED")
        logged = steps(client, run)
        assert logged == sorted(set(logged))  # every epoch once
        if run.data.tags["segdist.status"] == "finished":
            assert logged == list(range(epochs))
    return runs, output


def test_fixed_seeds_resume_runs_no_finished_trial_again(tmp_path, tiny_shards):
    space = write_study(tmp_path / "f.yaml", *tiny_shards, train=EPOCHS, seeds=[0, 1])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = kill_when(start_tune(space, tmp_path), client, ended=1)
    runs, _ = resume_and_check(space, tmp_path, client, before, trials=2, epochs=2)
    assert all(r.data.tags["segdist.status"] == "finished" for r in runs)
    (resumed,) = [r for r in runs if r.info.run_id not in {b.info.run_id for b in before}]
    assert int(resumed.data.tags["segdist.resumed_at_epoch"]) >= 1  # continued from its checkpoint


@pytest.mark.slow
def test_adaptive_seeds_resume_runs_no_trial_of_an_extra_round_again(tmp_path, tiny_shards):
    """Seeds 0, 1, then one per round up to 4 (the interval target is never met): killed
    while seed 3 runs, after seed 2 of an extra round ended, which a resume must not re-run."""
    space = write_study(tmp_path / "a.yaml", *tiny_shards, train=EPOCHS,
                        seeds={"min": 2, "max": 4, "ci_halfwidth": 1.0e-6})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = kill_when(start_tune(space, tmp_path), client, ended=3)
    assert {r.data.tags["segdist.trial_key"].rsplit("seed", 1)[-1] for r in before} >= {"2"}
    runs, _ = resume_and_check(space, tmp_path, client, before, trials=4, epochs=2)
    assert sorted(r.data.tags["segdist.trial_key"].rsplit("seed", 1)[-1] for r in runs) == ["0", "1", "2", "3"]


@pytest.mark.slow  # ASHA stops nothing here for sure: the fixed-seed test covers the same path by default
def test_asha_screened_resume_runs_no_ended_trial_again(tmp_path, tiny_shards):
    """An ASHA-stopped trial has ended too (stopped_early): whichever way the first trial
    ended, a resume must not train it again."""
    space = write_study(tmp_path / "s.yaml", *tiny_shards, train=EPOCHS, seeds=[0, 1],
                        screening={"asha": {"grace_period": 1, "reduction_factor": 2}})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = kill_when(start_tune(space, tmp_path), client, ended=1)
    resume_and_check(space, tmp_path, client, before, trials=2, epochs=2)


def test_a_study_whose_end_never_reached_mlflow_resumes(tmp_path, tiny_shards):
    """Issue 17: one trial of one epoch finished in Ray (its checkpoint is its last epoch's),
    but its status tag and the study's end never reached MLflow. --resume must report that
    last epoch again, without training, and end the run and the study."""
    train = {**EPOCHS, "epochs": 1, "epoch_scale": 1}
    space = write_study(tmp_path / "e.yaml", *tiny_shards, train=train, seeds=[0])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, output = finish(start_tune(space, tmp_path))
    assert code == 0, output[-4000:]
    (run,) = trial_runs(client)
    client.delete_tag(run.info.run_id, "segdist.status")
    client.update_run(run.info.run_id, status="RUNNING")
    client.update_run(run.data.tags["segdist.study_run"], status="RUNNING")
    final = run.data.metrics["final_miou"]

    code, output = finish(start_tune(space, tmp_path, "--resume"))
    assert code == 0, output[-6000:]
    (again,) = trial_runs(client)
    assert again.info.run_id == run.info.run_id
    assert again.data.tags["segdist.status"] == "finished" and again.info.status == "FINISHED"
    assert steps(client, again) == [0]  # the epoch is not logged twice, nor trained again
    assert again.data.metrics["final_miou"] == final
    assert client.get_run(run.data.tags["segdist.study_run"]).info.status == "FINISHED"


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_named_in_one_line_and_nothing_finished_is_lost(tmp_path, tiny_shards, damage):
    """The running trial's checkpoint is torn or gone when the study resumes: one warning line
    names it, the trial trains again from epoch 0 (logging no epoch twice), the finished one
    stays as it was."""
    space = write_study(tmp_path / "b.yaml", *tiny_shards, train=EPOCHS, seeds=[0, 1])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = kill_when(start_tune(space, tmp_path), client, ended=1)
    running = next(r for r in trial_runs(client) if "segdist.status" not in r.data.tags)
    key = running.data.tags["segdist.trial_key"]
    checkpoints = sorted(c for c in (tmp_path / "ray_results").glob(f"tiny/*/{key}/checkpoint_*") if c.is_dir())
    assert checkpoints
    for checkpoint in checkpoints:  # Ray keeps the latest and the best
        if damage == "truncated":
            data = (checkpoint / "checkpoint.pt").read_bytes()
            (checkpoint / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        else:
            shutil.rmtree(checkpoint)
    runs, output = resume_and_check(space, tmp_path, client, before, trials=2, epochs=2)
    warnings = [line for line in output.splitlines() if "segdist: warning: checkpoint" in line]
    assert len(warnings) == 1 and any(str(c) in warnings[0] for c in checkpoints), output[-6000:]
    assert all(r.data.tags["segdist.status"] == "finished" for r in runs)
