"""SyncBatchNorm2d on CPU across two gloo processes equals BatchNorm over the whole batch."""

import torch
import torch.multiprocessing as mp
from torch import nn

from segdist.models.resnet import SyncBatchNorm2d, convert_sync_batchnorm


def _worker(rank, world, port, x, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
        assert type(bn) is SyncBatchNorm2d
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(part)
        (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
        torch.save({"y": y.detach(), "gx": part.grad, "gw": bn.weight.grad, "rm": bn.running_mean,
                    "rv": bn.running_var}, f"{out_dir}/{rank}.pt")
        dist.barrier()  # neither rank tears down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_matches_full_batch(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    mp.spawn(_worker, args=(2, port, x, str(tmp_path)), nprocs=2, join=True)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    full = x.clone().requires_grad_(True)
    y = ref(full)
    weights = torch.cat([torch.arange(y[:2].numel()).view_as(y[:2]).float().sin()] * 2)
    (y * weights).sum().backward()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat([g["y"] for g in got]), y, atol=1e-5)
    assert torch.allclose(torch.cat([g["gx"] for g in got]), full.grad, atol=1e-5)
    assert torch.allclose(got[0]["gw"] + got[1]["gw"], ref.weight.grad, atol=1e-4)
    for g in got:
        assert torch.allclose(g["rm"], ref.running_mean, atol=1e-5)
        assert torch.allclose(g["rv"], ref.running_var, atol=1e-4)
