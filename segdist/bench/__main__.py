"""python -m segdist.bench COMMAND: the command line. Each section module (data, train, ray,
scale, gpu, evaluation as `eval`, study) gives HELP, DESCRIPTION, `add_arguments(parser)` and `run(args) -> dict`; a new
section is one more module and one more SUBCOMMANDS entry. `all` (here) runs the sections
with their defaults and checks the targets. The figures are printed and logged to MLflow
(segdist.bench.record)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from segdist.bench import data, evaluation, gpu, ray, scale, study, train
from segdist.bench.machine import load_note, loadavg, machine_info
from segdist.bench.record import BENCH_EXPERIMENT, log_to_mlflow, print_result
from segdist.errors import exit_on_user_error

SECTIONS = ["data", "train", "ray", "scale", "gpu"]

# ----------------------------------------------------------------------------- all


ALL_HELP = "every section (data, train, ray, scale, gpu) with their defaults, and the targets"
ALL_DESCRIPTION = (
    "Runs data, train, ray, scale and gpu with their default settings (a few "
    "minutes on 2 cores) and checks the targets: shards >= 0.8 x the decode limit and >= the "
    "folder, ray_throughput_ratio >= 0.95, a Ray trial's start-up <= 1.2 x plain (a study's "
    "later trials), CPU bf16 >= 1.5 x fp32, the data pipeline >= 5 x "
    "the quick start's step consumption, GPU bf16 MFU >= 0.4 (where measured)."
)


def _add_all_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--work-dir", default=None)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target of the performance issues that the measured figures allow to check."""
    out: dict[str, Any] = {}
    data_, train_, ray_ = result.get("data", {}), result.get("train", {}), result.get("ray", {})
    if "shards_vs_decode_limit" in data_:
        out["data_vs_decode_limit"] = data_["shards_vs_decode_limit"]
        out["data_vs_decode_limit_met"] = data_["shards_vs_decode_limit"] >= 0.8
        out["shards_vs_folder_met"] = data_["shards_vs_folder"] >= 1.0
    if "ray_throughput_ratio" in ray_:
        out["ray_throughput_ratio_met"] = ray_["ray_throughput_ratio"] >= 0.95
    if "ray_startup_ratio_next_trial" in ray_:  # a study's trials after each slot's first
        out["ray_startup_ratio_met"] = ray_["ray_startup_ratio_next_trial"] <= 1.2
    if "bf16_speedup" in train_:
        out["cpu_bf16_speedup"] = max(train_["bf16_speedup"], train_.get("bf16_channels_last_speedup", 0))
        out["cpu_bf16_speedup_met"] = out["cpu_bf16_speedup"] >= 1.5
    if "quickstart_img_per_s_fixed_batch" in train_:
        # the loader at the quick start's sizes (the data section's default is VOC's sizes)
        per_core = train_.get("quickstart_loader_per_core_per_s", data_.get("shards_per_s"))
        out["data_vs_quickstart_step"] = round(per_core / train_["quickstart_img_per_s_fixed_batch"], 2)
        out["data_vs_quickstart_step_met"] = out["data_vs_quickstart_step"] >= 5
    mfu = {k: v for k, v in result.get("gpu", {}).items() if k.startswith("mfu_bf16") and k.endswith("_321")}
    if mfu:
        out["gpu_bf16_mfu_321"] = max(mfu.values())
        out["gpu_bf16_mfu_321_met"] = out["gpu_bf16_mfu_321"] >= 0.4
    return out


def _section_args(name: str, work_dir: str | None) -> argparse.Namespace:
    argv = [name] + (["--work-dir", work_dir] if work_dir and name != "gpu" else [])
    return build_parser().parse_args(argv)


def _run_all(args) -> dict:
    result: dict[str, Any] = {}
    for name in args.sections:
        started, load_before = time.perf_counter(), loadavg()
        result[name] = SUBCOMMANDS[name].run(_section_args(name, args.work_dir))
        load_after = loadavg()
        result[name]["section_seconds"] = round(time.perf_counter() - started, 1)
        result[name]["loadavg_before"], result[name]["loadavg_after"] = load_before, load_after
        note = load_note(load_before)
        if note:
            result[name]["load_warning"] = note
    result["targets"] = targets(result)
    return result


# ----------------------------------------------------------------------------- CLI

class Section(NamedTuple):
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


def _section(module) -> Section:
    return Section(module.HELP, module.DESCRIPTION, module.add_arguments, module.run)


SUBCOMMANDS: dict[str, Section] = {
    "data": _section(data),
    "train": _section(train),
    "ray": _section(ray),
    "scale": _section(scale),
    "gpu": _section(gpu),
    "eval": _section(evaluation),
    "study": _section(study),
    "all": Section(ALL_HELP, ALL_DESCRIPTION, _add_all_arguments, _run_all),
}


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print one JSON object (default: key = value lines)")
    p.add_argument("--tracking-uri", default=default,
                   help="MLflow tracking URI for the bench run; default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///./mlflow.db")
    p.add_argument("--no-mlflow", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="do not log the figures to MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segdist.bench",
        description="Measure segdist's performance figures on this machine, print them (JSON with "
        "--json) and log them to MLflow as a run of the experiment 'segdist-bench'.",
    )
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, section in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=section.help, description=section.description)
        section.add_arguments(p)
        _add_common(p, top=False)
    return parser


def _measure(args) -> dict[str, Any]:
    """The command's figures, with the machine they were measured on (and its load)."""
    machine = machine_info()
    load_before = loadavg()
    result = SUBCOMMANDS[args.command].run(args)
    machine["loadavg_before"], machine["loadavg_after"] = load_before, loadavg()
    note = load_note(load_before)
    if note and args.command != "all":
        result["load_warning"] = note
        print(f"segdist: warning: {note}", file=sys.stderr)
    result["machine"] = machine
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = None
    if not args.no_mlflow:
        from segdist.mlflow_store import check_reachable, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)  # one line and exit 2 before anything is measured
    result = _measure(args)
    if uri is not None:
        figures = {k: v for k, v in result.items() if k != "machine"}
        run_id = log_to_mlflow(figures, args.command, uri, result["machine"])
        result["mlflow_run_id"] = run_id
        print(f"segdist: bench figures logged to {uri} (experiment {BENCH_EXPERIMENT}, run {run_id})",
              file=sys.stderr)
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
