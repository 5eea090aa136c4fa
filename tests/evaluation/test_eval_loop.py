"""The evaluation loop: one rank's share of a split, saved probabilities, DDP reduction."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segdist.crf import CrfParams, crf_grid_metrics, load_sample, read_meta, saved_keys, score_saved
from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.stream import read_dataset_info, val_loader
from segdist.evaluation.checkpoint import load_checkpoint, model_from_checkpoint
from segdist.evaluation.loop import denormalize, evaluate_split, save_probabilities
from segdist.evaluation.results import all_reduce_result
from segdist.evaluation.sinks import ProbabilityWriter
from segdist.metrics import confusion_matrix
from segdist.msf import MultiScaleInference

C = len(SYNTHETIC_CLASSES)


def test_whole_image_evaluation_equals_a_plain_forward_pass(eval_shards, tiny_checkpoint):
    model, _, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    info = read_dataset_info(eval_shards)
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0)
    ours = evaluate_split(model, loader, C, "cpu", scales=[1.0], flip=False, boundary_kernels=())
    plain = torch.zeros(C, C, dtype=torch.int64)
    with torch.no_grad():
        for images, labels in loader:
            plain += confusion_matrix(model(images).argmax(1), labels, C)
    assert torch.equal(ours.confusion, plain)
    assert ours.num_images == 5 and ours.boundary == {} and ours.before_crf is None


def test_a_sink_that_needs_keys_refuses_a_loader_without_them(eval_shards, tiny_checkpoint, tmp_path):
    model, _, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    loader = val_loader(read_dataset_info(eval_shards), rank=0, world_size=1, loader_workers=0)
    with pytest.raises(ValueError, match="sample keys"):
        evaluate_split(model, loader, C, "cpu", sink=ProbabilityWriter(tmp_path))
    assert not any(tmp_path.iterdir())


def test_saved_probabilities_feed_the_crf_grid(eval_shards, tiny_checkpoint, tmp_path):
    model, _, classes = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    info = read_dataset_info(eval_shards)
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0, with_keys=True)
    folder = tmp_path / "probs"
    result = save_probabilities(model, loader, folder, classes, "cpu", scales=(0.75, 1.0), flip=True, tile_size=24)
    assert read_meta(folder)["scales"] == [0.75, 1.0] and len(saved_keys(folder)) == 5
    saved = score_saved(folder, None)
    assert saved.sum() == result.confusion.sum()
    # the stored probabilities are the MSF ones, in float16 (which can flip the argmax of
    # near-ties: this random-weight model has many, so the matrices are not compared)
    images, labels, key = next(iter(loader))
    msf = MultiScaleInference(model, scales=(0.75, 1.0), flip=True, tile_size=24)
    probs, rgb, label = load_sample(folder, key[0] if isinstance(key, (list, tuple)) else key)
    assert np.abs(probs.astype(np.float32) - msf(images)[0].numpy()).max() < 1e-3
    assert np.array_equal(label, labels[0].numpy()) and np.array_equal(rgb, denormalize(images[0]))
    metrics = crf_grid_metrics({"probabilities": str(folder), "workers": 1, **vars(CrfParams())})
    assert 0.0 <= metrics["val_miou"] <= 1.0 and metrics["num_images"] == 5


def test_denormalize_recovers_the_uint8_image():
    from segdist.data.transforms import normalize

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(denormalize(torch.from_numpy(normalize(rgb))), rgb)


def _ddp_worker(rank, world, port, shards, ckpt, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _, _ = model_from_checkpoint(load_checkpoint(ckpt), "ckpt")
        loader = val_loader(read_dataset_info(shards), rank=rank, world_size=world, loader_workers=0)
        result = evaluate_split(model, loader, C, "cpu", scales=(1.0, 0.5), flip=True, boundary_kernels=(11,),
                                tile_size=24)
        local = result.num_images
        result = all_reduce_result(result)
        if rank == 0:
            queue.put((local, result.num_images, result.flat().tolist()))
        dist.barrier()  # neither rank tears down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_ranks_add_up_to_the_single_process_result(eval_shards, tiny_checkpoint):
    model, _, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "ckpt")
    loader = val_loader(read_dataset_info(eval_shards), rank=0, world_size=1, loader_workers=0)
    single = evaluate_split(model, loader, C, "cpu", scales=(1.0, 0.5), flip=True, boundary_kernels=(11,),
                            tile_size=24)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, str(eval_shards), str(tiny_checkpoint), queue), nprocs=2,
                       start_method="spawn")
    local, total, flat = queue.get()
    assert 0 < local < 5 and total == 5
    assert flat == single.flat().tolist()
