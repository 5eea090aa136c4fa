"""Where the figures go: printed (JSON with --json, else `key = value` lines) and logged as
one MLflow run of the experiment "segdist-bench" (params: machine and settings; metrics: the
numeric figures; bench.json: the whole result)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

BENCH_EXPERIMENT = "segdist-bench"


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "peak_tflops":
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in flatten(result).items():
        print(f"{key} = {value}")


def log_to_mlflow(result: dict[str, Any], command: str, uri: str, machine: dict[str, Any]) -> str:
    """One run of the experiment "segdist-bench": params = machine + settings, metrics =
    the numeric figures, bench.json = the whole result. Returns the run id."""
    from mlflow.entities import Metric, Param

    from segdist.mlflow_store import client_for, get_or_create_experiment, mlflow_key

    client = client_for(uri)  # several bench runs may open a new store at once
    experiment = get_or_create_experiment(client, BENCH_EXPERIMENT, uri)
    run = client.create_run(experiment, run_name=f"bench-{command}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"segdist.role": "bench", "segdist.bench.command": command})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics, params = [], [Param("command", command)]
    params += [Param(mlflow_key(f"machine.{k}"), str(v)[:6000]) for k, v in machine.items()]
    for name, value in flatten(result).items():
        key = mlflow_key(name)  # keys MLflow refuses (a name with a quote or colon) get a safe one
        if isinstance(value, bool):
            params.append(Param(key, str(value)))
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                metrics.append(Metric(key, float(value), now, 0))
        else:
            params.append(Param(key, (value if isinstance(value, str) else json.dumps(value))[:6000]))
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    client.log_text(run_id, json.dumps({"command": command, "machine": machine, **result}, indent=1), "bench.json")
    client.set_terminated(run_id)
    return run_id
