"""bench study: a study of hundreds of short trials through segdist's own driver machinery
(the seed searcher, Ray Tune, MlflowTrialCallback and StudyTracker, into a real MLflow store),
each trial a trivial function that reports one epoch as segdist.train does. Measures what the
driver costs per trial and checks that every child run and metric reached MLflow and that the
driver's memory and write queue stay bounded."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HELP = "a study of many short trials: driver overhead per trial, peak driver memory, MLflow writes/s"
DESCRIPTION = (
    "Runs a loopback study of --trials one-epoch trials (one configuration of the quick start's tiny "
    "model, one trial per seed) through segdist's driver: the seed searcher (segdist.tune.make_searcher), "
    "Ray Tune and the MLflow callback and tracker (segdist.mlflow_callback, segdist.tracking), into a "
    "fresh sqlite store (or, with --store server, an `mlflow server` on 127.0.0.1 over that store). "
    "Each trial is a trivial function reporting one epoch's EpochReport, not a TorchTrainer: what is "
    "measured is the driver. "
    "Figures: wall_s; driver_cpu_s_per_trial (the driver process's CPU time during the study: Tune "
    "scheduling and MLflow logging); mlflow_s_per_trial (wall time inside the callback's hooks); "
    "peak_driver_rss_mb and the RSS growth from the first tenth of the trials to the end; "
    "peak_mlflow_queue; mlflow_writes_per_s (writes sent / study wall) and mlflow_writes_per_busy_s "
    "(writes sent / time in the hooks); complete = every trial has its child run, status and metrics."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=500, help="trials (seeds) in the study (default 500)")
    p.add_argument("--concurrent", type=int, default=8, help="trials running at once (default 8)")
    p.add_argument("--store", choices=("sqlite", "server"), default="sqlite",
                   help="a sqlite store, or an `mlflow server` on loopback over one (default sqlite)")
    p.add_argument("--work-dir", default=None, help="where the temporary store and storage go")


def trivial_trial(params: dict[str, Any]) -> None:
    """A trial that trains nothing: reports its one epoch as segdist.train's loop does."""
    import ray.tune

    from segdist.epoch_report import EpochReport

    seed = params["trial"]["seed"]
    miou = 0.5 + (seed % 11) / 100
    metrics = {"train_loss": 1.0, "lr": 0.01, "val_miou": miou, "final_miou": miou, "val_iou_potted plant": miou}
    ray.tune.report(EpochReport(0, metrics, worker_started_at=time.time()).result())


class Timed:
    """MlflowTrialCallback with the wall time of its hooks added up (its MLflow logging)."""

    def __init__(self, callback):
        self.callback, self.seconds = callback, 0.0

    def wrap(self):
        for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
            hook = getattr(self.callback, name)

            def timed(*args, _hook=hook, **kwargs):
                started = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started

            setattr(self.callback, name, timed)
        return self.callback


class RssSampler(threading.Thread):
    """The driver's resident memory, sampled every `every_s` seconds, with the number of
    completed trials at each sample."""

    def __init__(self, completed, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.completed, self.every_s, self.samples, self.stop = completed, every_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.samples.append((self.completed(), _rss_mb()))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _study(trials: int, concurrent: int, shards: str):
    from segdist.config import parse_study

    raw = {"name": "bench-study", "seeds": list(range(trials)),
           "data": {"train_shards": shards, "val_shards": shards, "loader_workers": 0},
           "model": {"variant": "naked", "depth": 18, "width": 4, "output_stride": 8},
           "train": {"epochs": 1, "batch_size": 2, "crop_size": 40},
           "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0,
                         "max_concurrent_trials": concurrent}}
    return parse_study(raw, "bench study")


def _start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `folder` (its own process group)."""
    from segdist.cluster import free_port
    from segdist.mlflow_store import check_reachable

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            check_reachable(uri, timeout_s=2)
            return process, uri
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}") from None
            time.sleep(0.5)
    _stop_server(process)
    raise RuntimeError("mlflow server did not answer within 120 s")


def _stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)  # its own group: the server and its workers
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def _tune(study, tracker, storage: str, trials: int):
    """The study through Ray Tune as segdist.tune.run_study sets it up, with trivial trials."""
    import ray.tune

    from segdist.mlflow_callback import MlflowTrialCallback
    from segdist.seeds import SeedScheduler
    from segdist.tune import expand_configs, make_searcher

    scheduler = SeedScheduler(expand_configs(study), study.seeds)
    timed = Timed(MlflowTrialCallback(tracker, storage))
    callback = timed.wrap()
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trivial_trial, {"memory": 1}),
        tune_config=ray.tune.TuneConfig(
            search_alg=make_searcher(scheduler, storage), num_samples=-1,
            max_concurrent_trials=study.max_concurrent_trials, metric="val_miou", mode="max",
            reuse_actors=True,  # the trials' process start-up is not the driver's overhead
        ),
        run_config=ray.tune.RunConfig(name="tune", storage_path=storage, callbacks=[callback], verbose=0),
    )
    sampler = RssSampler(lambda: len(callback.timings))
    cpu0, started = os.times(), time.perf_counter()
    sampler.start()
    results = tuner.fit()
    wall = time.perf_counter() - started
    cpu1 = os.times()
    sampler.stop.set()
    sampler.join()
    tracker.drain()
    driver_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return results, wall, driver_cpu, timed.seconds, sampler.samples


def _check_store(tracker, trials: int) -> dict[str, Any]:
    """Every trial's child run, with its status tag and its epoch's metrics, in MLflow."""
    from segdist.mlflow_store import ROLE_TAG, STATUS_TAG, STUDY_RUN_TAG, mlflow_key

    runs = tracker.client.search_runs([tracker.experiment_id], max_results=50000,
                                      filter_string=f"tags.`{STUDY_RUN_TAG}` = '{tracker.parent_run_id}' "
                                                    f"and tags.`{ROLE_TAG}` = 'trial'")
    key = mlflow_key("val_iou_potted plant")
    with_metrics = sum(1 for r in runs if {"val_miou", "final_miou", key, "trial_wall_s"} <= r.data.metrics.keys())
    finished = sum(1 for r in runs if r.data.tags.get(STATUS_TAG) == "finished" and r.info.status == "FINISHED")
    return {"child_runs": len(runs), "runs_with_all_metrics": with_metrics, "runs_finished": finished,
            "complete": len(runs) == with_metrics == finished == trials}


def _memory(samples: list[tuple[int, float]], trials: int) -> dict[str, Any]:
    if not samples:
        return {}
    early = [rss for done, rss in samples if done <= max(trials // 10, 1)] or [samples[0][1]]
    return {"peak_driver_rss_mb": round(max(rss for _, rss in samples), 1),
            "driver_rss_after_first_tenth_mb": round(max(early), 1),
            "driver_rss_end_mb": round(samples[-1][1], 1),
            "driver_rss_growth_mb": round(samples[-1][1] - max(early), 1),
            "peak_driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run(args) -> dict:
    """Figures of one study of args.trials trials (see DESCRIPTION)."""
    import ray

    from segdist.bench.common import synthetic_shards
    from segdist.errors import SegdistError
    from segdist.tracking import StudyTracker

    if args.trials < 1 or args.concurrent < 1:
        raise SegdistError(f"bench study: --trials and --concurrent must be >= 1, got {args.trials}, {args.concurrent}")
    tmp = Path(tempfile.mkdtemp(prefix="segdist-bench-study-", dir=args.work_dir))
    server = None
    try:
        shards = synthetic_shards(str(tmp), 4, 40, 48)
        if args.store == "server":
            server, uri = _start_server(tmp)
        else:
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
        study = _study(args.trials, args.concurrent, shards)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # A Ray of its own (never a RAY_ADDRESS cluster), with CPUs for the driver and the trials.
        with contextlib.redirect_stdout(sys.stderr):  # Tune's tables: stdout is the figures' only
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            try:
                tracker = StudyTracker(uri, study.name, study.name)
                results, wall, driver_cpu, hook_s, samples = _tune(study, tracker, str(tmp / "storage"), args.trials)
            finally:
                ray.shutdown()
        errors = sum(1 for r in results if r.error is not None)
        return {
            "trials": args.trials, "concurrent": args.concurrent, "store": args.store, "trial_errors": errors,
            "wall_s": round(wall, 1), "wall_s_per_trial": round(wall / args.trials, 3),
            "driver_cpu_s_per_trial": round(driver_cpu / args.trials, 4),
            "mlflow_s_per_trial": round(hook_s / args.trials, 4),
            "mlflow_writes": tracker.sent, "mlflow_writes_per_trial": round(tracker.sent / args.trials, 1),
            "mlflow_writes_per_s": round(tracker.sent / wall, 1),
            "mlflow_writes_per_busy_s": round(tracker.sent / hook_s, 1) if hook_s else None,
            "peak_mlflow_queue": tracker.peak_pending, "mlflow_unsent": len(tracker.pending) + len(tracker.left_out),
            **_memory(samples, args.trials), **_check_store(tracker, args.trials),
            "trainable": "trivial (one EpochReport, no TorchTrainer)",
        }
    finally:
        if server is not None:
            _stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)
