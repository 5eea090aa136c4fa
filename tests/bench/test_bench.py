"""segdist.bench: the arithmetic, the timing wrapper, tiny runs of the sections, MLflow."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from segdist.bench import machine, runners
from segdist.bench import train as bench_train
from segdist.bench.__main__ import main, targets
from segdist.bench.common import TimedLoader, quickstart_trial, train_flops_per_image
from segdist.bench.gpu import gpu_peak, measure_mode, utilisation


def test_utilisation_is_achieved_flops_over_peak():
    # 400 GFLOP per image at 1000 images/s = 400 TFLOP/s, on a 989.4 TFLOP/s peak
    assert utilisation(400e9, 1000.0, 989.4e12) == pytest.approx(400 / 989.4)
    with pytest.raises(ValueError):
        utilisation(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "name, row, bf16",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H200", "H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ],
)
def test_gpu_peak_table_by_device_name(name, row, bf16):
    found_row, peaks = gpu_peak(name)
    assert found_row == row and peaks["bf16"] == bf16


def test_gpu_peak_unknown_device_is_none():
    assert gpu_peak("Some Future GPU") is None


def test_timed_loader_steady_state_excludes_warmup():
    loader = TimedLoader([])
    loader.starts = [0.0, 10.0, 11.0, 12.0]  # batch 0 handed out late: start-up
    loader.waits = [10.0, 0.5, 0.1, 0.1]
    out = loader.steady(end=13.0, warmup=1, images_per_step=4)
    assert out["timed_steps"] == 3
    assert out["img_per_s"] == pytest.approx(3 * 4 / 3.0)
    assert out["step_s"] == pytest.approx(1.0) and out["median_step_s"] == pytest.approx(1.0)
    assert out["min_step_s"] == pytest.approx(1.0)
    assert out["data_wait_fraction"] == pytest.approx(0.2 / 3.0)
    loader.cpu = [0.0, 5.0, 5.5, 6.0]
    assert loader.steady(end=13.0, warmup=1, images_per_step=4, end_cpu=6.5)["cpu_s_per_step"] == pytest.approx(0.5)


def test_timed_loader_records_every_batch():
    loader = TimedLoader([1, 2, 3])
    assert list(loader) == [1, 2, 3]
    assert len(loader.starts) == len(loader.waits) == 3 and loader.first_at is not None


def test_training_flops_are_forward_plus_backward():
    from segdist.models import build_model, describe_model

    trial = quickstart_trial()
    model = build_model(dataclasses.replace(trial.recipe.model, width=4), 5)
    total = train_flops_per_image(model, 48, 5)
    forward = describe_model(model, 5, 48)["gflops"] * 1e9
    # backward = grad input + grad weight (~2x forward), less the first conv's grad input
    assert 2.5 * forward < total <= 3.05 * forward


def test_targets_are_checked_from_the_figures():
    figures = {
        "data": {"shards_per_s": 1000.0, "shards_vs_decode_limit": 0.7, "shards_vs_folder": 1.1},
        "train": {"bf16_speedup": 1.2, "bf16_channels_last_speedup": 1.6,
                  "quickstart_img_per_s_fixed_batch": 100.0},
        "ray": {"ray_throughput_ratio": 0.97, "ray_startup_ratio_next_trial": 3.6},
    }
    out = targets(figures)
    assert out["data_vs_decode_limit_met"] is False and out["shards_vs_folder_met"] is True
    assert out["cpu_bf16_speedup"] == 1.6 and out["cpu_bf16_speedup_met"] is True
    assert out["data_vs_quickstart_step"] == 10.0 and out["data_vs_quickstart_step_met"] is True
    assert out["ray_throughput_ratio_met"] is True and out["ray_startup_ratio_met"] is False
    assert "gpu_bf16_mfu_321" not in out
    # the loader's own figure at the quick start's sizes wins over the data section's (VOC sizes)
    figures["train"]["quickstart_loader_per_core_per_s"] = 800.0
    assert targets(figures)["data_vs_quickstart_step"] == 8.0


def test_train_section_tiny(tmp_path, capsys):
    argv = ["train", "--json", "--no-mlflow", "--depth", "18", "--width", "4", "--crop", "33",
            "--batch-size", "1", "--steps", "1", "--warmup", "0", "--no-channels-last",
            "--matmul-size", "64", "--matmul-seconds", "0.01", "--quickstart-steps", "1",
            "--quickstart-warmup", "0", "--samples", "16", "--work-dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("img_per_s_fp32", "img_per_s_bf16", "gflops_per_image_fwd_bwd", "matmul_gflops_fp32",
                "matmul_gflops_bf16", "roofline_ratio_fp32", "roofline_ratio_bf16",
                "quickstart_img_per_s_fixed_batch", "quickstart_loader_per_core_per_s"):
        assert result[key] > 0, key
    assert result["steps"] == 1 and 0 <= result["quickstart_data_wait_fraction"] < 1
    assert result["machine"]["torch"] == torch.__version__


def test_plain_distributed_runner_two_processes(tiny_shards):
    train, _val = tiny_shards
    trial = quickstart_trial(str(train))
    recipe = dataclasses.replace(
        trial.recipe,
        model=dataclasses.replace(trial.recipe.model, width=4),
        train=dataclasses.replace(trial.recipe.train, batch_size=2, crop_size=(32, 32)),
    )
    trial = dataclasses.replace(trial, recipe=recipe, data=dataclasses.replace(trial.data, loader_workers=0))
    spec = {"trial": dataclasses.asdict(trial), "steps": 4, "warmup": 1, "threads": 1}
    result = runners.run_plain(spec, 2)
    assert result["timed_steps"] == 3
    assert result["img_per_s"] > 0 and result["startup_s"] > 0
    assert 0 <= result["data_wait_fraction"] < 1


def test_the_bench_loop_trains_with_the_set_up_fit_makes(tiny_shards, monkeypatch):
    """The ray and scale loop builds its step and data as fit does (training_setup,
    epoch_loader): the recipe's L2 term and NaN rule reach the step, its bad-sample rule and
    the trial's shuffle buffer the loader."""
    import segdist.train

    seen: dict = {}
    train_loader, train_one_epoch = segdist.train.train_loader, segdist.train.train_one_epoch

    def loader_spy(info, **kwargs):
        seen["loader"] = kwargs
        return train_loader(info, **kwargs)

    def step_spy(model, loader, optimizer, scheduler, options, epoch):
        seen["options"] = options
        return train_one_epoch(model, loader, optimizer, scheduler, options, epoch)

    monkeypatch.setattr(segdist.train, "train_loader", loader_spy)
    monkeypatch.setattr(segdist.train, "train_one_epoch", step_spy)
    train, _val = tiny_shards
    trial = quickstart_trial(str(train))
    recipe = dataclasses.replace(
        trial.recipe,
        model=dataclasses.replace(trial.recipe.model, width=4),
        train=dataclasses.replace(trial.recipe.train, batch_size=2, crop_size=(32, 32), on_nan="skip",
                                  on_bad_sample="skip"),
    )
    trial = dataclasses.replace(trial, recipe=recipe,
                                data=dataclasses.replace(trial.data, loader_workers=0, shuffle_buffer=7))
    spec = {"trial": dataclasses.asdict(trial), "steps": 2, "warmup": 0, "threads": 1}
    threads = torch.get_num_threads()
    try:
        marks = {"entered": time.time()}
        result = runners.dist_loop(spec, 0, 1, marks)
        assert result["timed_steps"] == 2
    finally:
        torch.set_num_threads(threads)
    options = seen["options"]
    assert options.train == trial.recipe.train and options.train.weight_decay > 0 and options.skip_nan_steps
    assert seen["loader"]["on_bad_sample"] == "skip" and seen["loader"]["shuffle_buffer"] == 7
    assert seen["loader"]["batches_per_epoch"] == 2 and seen["loader"]["seed"] == trial.seed
    # the start-up marks of segdist's part, in the order they happen, carried by the result
    names = ["entered", "imported", "dataset_opened", "model_built", "loader_ready", "first_batch"]
    assert list(marks) == names and [marks[n] for n in names] == sorted(marks.values())
    assert all(result[f"mark_{n}"] == marks[n] for n in names)


@pytest.mark.parametrize("mode", ["fp32", "bf16_channels_last"])
def test_gpu_mode_measurement_runs_on_any_device(mode):
    trial = quickstart_trial()
    trial = dataclasses.replace(trial, recipe=dataclasses.replace(
        trial.recipe, model=dataclasses.replace(trial.recipe.model, width=4)))
    out = measure_mode(trial, mode, 32, 2, steps=2, warmup=1, classes=3, device=torch.device("cpu"))
    assert out["img_per_s"] > 0 and out["tf32"] is False


def test_matmul_roofline_takes_both_ways():
    ways = bench_train.matmul_gflops("fp32", 64, 0.01)
    assert set(ways) == {"mm", "conv1x1"} and min(ways.values()) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_gpu_section_without_cuda(capsys):
    assert main(["gpu", "--json", "--no-mlflow"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gpu"] == "no CUDA device"


def test_figures_are_logged_to_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["data", "--json", "--tracking-uri", uri, "--samples", "8", "--repeats", "1", "--min-size", "32",
            "--max-size", "40", "--crop", "24", "--work-dir", str(tmp_path)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 2  # the data section measures on one thread, then gives it back
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("segdist-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result["mlflow_run_id"]
    assert run.data.metrics["shards_per_s"] == result["shards_per_s"]
    assert run.data.params["machine.torch"] == torch.__version__
    assert run.data.params["command"] == "data"


@pytest.mark.integration
@pytest.mark.slow  # 60-95 s on 2 busy cores (Ray's start-up is most of it): not in the default run
def test_study_section_small(tmp_path):
    """`bench study` at 20 trials: a real Ray Tune study through segdist's searcher, callback
    and tracker into a sqlite store, every child run and metric there, nothing left queued."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "segdist.bench", "study", "--json", "--no-mlflow", "--trials", "20",
                           "--concurrent", "4", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # the figures alone: Tune's own output goes to stderr
    assert result["complete"] is True and result["child_runs"] == 20 and result["trial_errors"] == 0
    assert result["mlflow_unsent"] == 0 and result["mlflow_writes"] >= 20 * 5
    assert result["peak_mlflow_queue"] <= 2  # the store answers: every write is sent as it is made
    for key in ("wall_s", "driver_cpu_s_per_trial", "mlflow_s_per_trial", "mlflow_writes_per_s", "peak_driver_rss_mb"):
        assert result[key] > 0, key
    assert list(tmp_path.iterdir()) == []  # its temporary store and storage are gone


@pytest.mark.integration
def test_ray_section_breaks_start_up_into_phases(tmp_path):
    """`bench ray` at its smallest: plain torch.distributed and two Ray Tune trials (the second
    on the first one's trial actor), each start-up cut into phases that add up to it, Ray's
    own phases read from its task events; the figures alone on stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "segdist.bench", "ray", "--json", "--no-mlflow", "--rounds", "1",
                           "--steps", "2", "--warmup", "1", "--samples", "16", "--workers", "1",
                           "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # Tune's experiment box went to stderr
    assert "start-up, seconds" in done.stderr
    ray_phases = ["trial_actor", "trainer_build", "train_controller", "worker_group", "train_context",
                  "process_group", "imports", "dataset_open", "model_build", "loader", "first_batch"]
    for kind, names in (("plain", ["process_start", "process_group", *ray_phases[6:]]),
                        ("ray_first", ray_phases), ("ray_next", ray_phases)):
        values = [result[f"startup_{kind}.{name}_s"] for name in names]
        assert all(v >= 0 for v in values), (kind, values)
        assert abs(sum(values) - result[f"startup_{kind}_s"]) < 0.05 + 0.01 * len(values), kind
    # the second trial ran on the first one's trial actor: no new process, nothing to import
    assert result["startup_ray_next.trial_actor_s"] < result["startup_ray_first.trial_actor_s"]
    assert result["startup_ray_next.trainer_build_s"] < result["startup_ray_first.trainer_build_s"]
    assert result["ray_startup_ratio_next_trial"] > 0 and result["ray_img_per_s"] > 0


def test_unreachable_tracking_store_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    assert main(["gpu", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segdist: error:" in err[0]


def test_fast_resize_matches_the_pillow_reference():
    """The OpenCV path: labels exactly PIL's NEAREST, the image within one grey level of
    PIL's BILINEAR when enlarging (shrinking differs: no low-pass, as cv2 INTER_LINEAR)."""
    from segdist.data import transforms as T

    def pillow_reference(image, label, p, crop):
        height, width = label.shape
        vy0, vy1, vx0, vx1 = T._window(p, crop)
        ry, rx = p.scaled_h / height, p.scaled_w / width
        box = (vx0 / rx, vy0 / ry, vx1 / rx, vy1 / ry)
        whole = Image.fromarray(label).resize((p.scaled_w, p.scaled_h), Image.NEAREST)
        rgb = np.asarray(Image.fromarray(image).resize((vx1 - vx0, vy1 - vy0), Image.BILINEAR, box=box))
        return rgb, np.asarray(whole)[vy0:vy1, vx0:vx1]

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:37, :45]
    rgb = np.stack([np.sin(xx / 5) * 100 + 120, np.cos(yy / 4) * 90 + 120, (xx * 3 + yy) % 200 + 20], -1)
    image = rgb.astype(np.uint8)
    label = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(37, 45))
    for _ in range(50):
        p = T.sample_crop_params(rng, 37, 45, (24, 24), (1.0, 2.5), aspect_jitter=0.1)
        rgb_fast, lab_fast, placed = T.resize_crop(image, label, p, (24, 24))
        rgb_ref, lab_ref = pillow_reference(image, label, p, (24, 24))
        assert np.array_equal(lab_fast, lab_ref)
        assert np.abs(rgb_fast.astype(int) - rgb_ref.astype(int)).max() <= 1


def test_load_note_only_when_the_machine_was_busy(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    assert machine.load_note(1.9) is None and machine.load_note(None) is None
    assert "busy" in machine.load_note(6.0)


def test_startup_phases_are_consecutive_and_ray_marks_come_from_task_events():
    from segdist.bench.startup import PLAIN_MARKS, RAY_MARKS, breakdown_table, phases, ray_marks

    marks = {"entered": 11.0, "process_group": 11.5, "imported": 12.0, "dataset_opened": 12.25,
             "model_built": 13.0, "loader_ready": 13.5, "first_batch": 15.0}
    plain = phases(10.0, marks, PLAIN_MARKS)
    assert plain == {"process_start": 1.0, "process_group": 0.5, "imports": 0.5, "dataset_open": 0.25,
                     "model_build": 0.75, "loader": 0.5, "first_batch": 1.5}
    assert sum(plain.values()) == 5.0  # the phases add up to launch -> first batch

    events = [  # tasks before the launch or after the entry (other runs') are ignored
        {"name": "TrainController.__init__", "submitted": 1.0, "running": 1.5, "finished": 2.0},
        {"name": "RayTrainWorker.__init__", "submitted": 11.5, "running": 12.0, "finished": 30.0},
        {"name": "TrainController.__init__", "submitted": 10.4, "running": 10.5, "finished": 10.6},
        {"name": "RayTrainWorker.__init__", "submitted": 10.6, "running": 10.7, "finished": 10.8},
        {"name": "RayTrainWorker.__init__", "submitted": 10.6, "running": 10.7, "finished": 10.85},
        {"name": "RayTrainWorker.init_train_context", "submitted": 10.85, "running": 10.9, "finished": 10.95},
    ]
    under_ray = ray_marks(10.0, {**marks, "trial_started": 10.1, "trainer_built": 10.3}, events)
    ray = phases(10.0, under_ray, RAY_MARKS)
    assert [round(ray[p], 2) for p in ("trial_actor", "trainer_build", "train_controller", "worker_group",
                                        "train_context", "process_group")] == [0.1, 0.2, 0.3, 0.25, 0.1, 0.05]
    assert round(sum(ray.values()), 6) == 5.0
    # without task events the Ray-internal phases fold into the next phase that has a mark
    folded = phases(10.0, {**marks, "trial_started": 10.1, "trainer_built": 10.3}, RAY_MARKS)
    assert "train_controller" not in folded and round(folded["process_group"], 2) == 0.7
    table = breakdown_table({"plain": plain, "ray": ray})
    assert table.splitlines()[0].split() == ["phase", "plain", "ray"] and table.splitlines()[-1].split() == ["sum", "5.00", "5.00"]
