"""Where a trial's start-up goes: the launch-to-first-step time of one run of the bench loop
(segdist.bench.runners) cut into consecutive phases, from the marks its processes took
(wall clock, time.time()) and, under Ray, from Ray's own task events (the State API's
list_tasks: when each actor's creation task was submitted, ran and finished).

Phases under Ray, in order (each ends where the next begins; they add up to the start-up):
  trial_actor      launch -> the Tune trial function runs (Tune's trial actor: a new process
                   and its imports, or a reused one)
  trainer_build    segdist.tune and ray.train.torch imported, the TorchTrainer built
  train_controller Train's controller actor started and initialised
  worker_group     the placement group and the worker actors (process start, Ray's imports)
  train_context    each worker unpickles the train function (segdist's and torch's imports)
  process_group    torch.distributed set up by Ray Train, the train function entered
and then segdist's own, the same in both runners:
  imports          segdist.train and what it imports (whatever is not imported already)
  dataset_open     dataset.json read
  model_build      model, DDP, optimizer and schedule (segdist.train.training_setup)
  loader           the epoch's loader built (segdist.train.epoch_loader)
  first_batch      the first batch handed to the step (loader processes, shuffle buffer)
Under plain torch.distributed the phases before segdist's are process_start (spawn: a new
interpreter and the unpickling of the worker function) and process_group (gloo's file
rendezvous)."""

from __future__ import annotations

from typing import Any

SEGDIST_MARKS = [("imports", "imported"), ("dataset_open", "dataset_opened"), ("model_build", "model_built"),
                 ("loader", "loader_ready"), ("first_batch", "first_batch")]
PLAIN_MARKS = [("process_start", "entered"), ("process_group", "process_group"), *SEGDIST_MARKS]


def phases(launched: float, marks: dict[str, float], order: list[tuple[str, str]]) -> dict[str, float]:
    """Consecutive phase lengths in seconds: phase i runs from the end of phase i-1 (the first
    from `launched`) to marks[its mark name]. A mark that is missing is skipped (its phase is
    counted in the next one)."""
    out: dict[str, float] = {}
    previous = launched
    for phase, mark in order:
        if mark in marks:
            out[phase] = marks[mark] - previous
            previous = marks[mark]
    return out


def ray_marks(launched: float, marks: dict[str, float], events: list[dict[str, Any]]) -> dict[str, float]:
    """The run's marks plus Ray's, taken from those of `events` (task_events) submitted
    between the launch and the run's entry into its train function: "controller_ready"
    (TrainController.__init__ finished), "workers_ready" (the last RayTrainWorker.__init__
    finished) and "context_ready" (the last init_train_context finished). A mark Ray did not
    record is left out."""
    out = dict(marks)
    window = [e for e in events if launched <= e["submitted"] <= marks.get("entered", float("inf"))]
    found = {
        "controller_ready": _finished(window, "TrainController.__init__"),
        "workers_ready": _finished(window, "RayTrainWorker.__init__"),
        "context_ready": _finished(window, "RayTrainWorker.init_train_context"),
    }
    out.update({name: at for name, at in found.items() if at is not None})
    return out


RAY_MARKS = [("trial_actor", "trial_started"), ("trainer_build", "trainer_built"),
             ("train_controller", "controller_ready"), ("worker_group", "workers_ready"),
             ("train_context", "context_ready"), ("process_group", "entered"), *SEGDIST_MARKS]


def _finished(events: list[dict[str, Any]], name: str) -> float | None:
    """When the last of the tasks called `name` finished (seconds)."""
    ends = [e["finished"] for e in events if e["name"] == name and e["finished"]]
    return max(ends) if ends else None


def task_events(since: float, dashboard: str) -> list[dict[str, Any]]:
    """Ray's task events since `since` (seconds), one dict per task: name, submitted, running,
    finished (seconds; None when not recorded), from the State API of the dashboard at
    `dashboard` (http://HOST:PORT); an empty list when it does not answer."""
    from ray.util.state import list_tasks

    try:
        tasks = list_tasks(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False,
                           timeout=30)
    except Exception:  # noqa: BLE001 - the breakdown then keeps segdist's marks only
        return []
    out = []
    for task in tasks:
        states = {e["state"]: e["created_ms"] / 1000 for e in (task.events or [])}
        submitted = states.get("PENDING_ARGS_AVAIL")
        if submitted is None or submitted < since:
            continue
        out.append({"name": task.func_or_class_name, "submitted": submitted,
                    "running": states.get("RUNNING"), "finished": states.get("FINISHED")})
    return out


def breakdown_table(rows: dict[str, dict[str, float]]) -> str:
    """A text table, phases down and runs across, and their sums: rows = {run name: {phase:
    seconds}} (for medians over rounds, the sum of the medians, not the median start-up)."""
    names = list(rows)
    known = [phase for phase, _ in PLAIN_MARKS[:1] + RAY_MARKS]
    seen = {phase for values in rows.values() for phase in values}
    order = [phase for phase in known if phase in seen] + sorted(seen - set(known))
    lines = [f"{'phase':<18}" + "".join(f"{name:>14}" for name in names)]
    for phase in order:
        cells = "".join(f"{rows[n][phase]:>14.2f}" if phase in rows[n] else f"{'-':>14}" for n in names)
        lines.append(f"{phase:<18}{cells}")
    lines.append(f"{'sum':<18}" + "".join(f"{sum(rows[n].values()):>14.2f}" for n in names))
    return "\n".join(lines)
