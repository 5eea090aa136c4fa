"""segdist.models.pretrained: named ImageNet weights through a real loopback HTTP mirror, tensorpack .npz
conversion, local files, spec checks, and one download per node under concurrency.

No download is mocked: a ThreadingHTTPServer on 127.0.0.1 serves generated files, SEGDIST_WEIGHTS_MIRROR
points at it and TORCH_HOME at a tmp dir (the real torch hub cache is never touched).
"""

import collections
import functools
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from segdist.errors import SegdistError
from segdist.models import pretrained
from segdist.models.pretrained import (
    check_pretrained_spec,
    fetch_pretrained,
    load_pretrained,
    weights_url,
)
from segdist.models.resnet import ResNet

ROOT = Path(__file__).resolve().parents[2]


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        server = self.server
        with server.count_lock:
            server.counts[self.path] += 1
        if server.delay_s:
            time.sleep(server.delay_s)
        cut = server.truncate.get(self.path)
        if cut is not None:  # promise the whole file, send part of it, close
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.close_connection = True
            return
        super().do_GET()


class WeightsServer:
    """A loopback HTTP server serving `root`, counting GET requests per path."""

    def __init__(self, root: Path):
        self.root = root
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.httpd.counts = collections.Counter()
        self.httpd.count_lock = threading.Lock()
        self.httpd.truncate = {}
        self.httpd.delay_s = 0.0
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights/"

    @property
    def counts(self):
        return self.httpd.counts

    def add(self, name: str, data: bytes) -> None:
        (self.root / "weights").mkdir(exist_ok=True)
        (self.root / "weights" / name).write_bytes(data)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    srv = WeightsServer(root)
    monkeypatch.setenv("SEGDIST_WEIGHTS_MIRROR", srv.url)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def _cache(home: Path) -> Path:
    return home / "hub" / "checkpoints"


def _cache_files(home: Path) -> list[str]:
    """Files in the cache other than lock files."""
    folder = _cache(home)
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


def _random_state(net: ResNet, fc: bool = True) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict for `net` with random values (positive variances) and an fc."""
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith("running_var"):
            sd[key] = torch.rand_like(value) + 0.5
        elif value.is_floating_point():
            sd[key] = torch.randn_like(value)
        else:
            sd[key] = value.clone()
    if fc:
        sd["fc.weight"] = torch.randn(1000, net.channels[-1])
        sd["fc.bias"] = torch.randn(1000)
    return sd


def _pth_bytes(sd: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    return buffer.getvalue()


def _hashed_name(data: bytes, depth: int = 18) -> str:
    return f"resnet{depth}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


# ---------------------------------------------------------------- names and URLs


def test_official_urls_without_mirror(monkeypatch):
    monkeypatch.delenv("SEGDIST_WEIGHTS_MIRROR", raising=False)
    expected = {
        ("torchvision", 18): "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        ("torchvision", 34): "https://download.pytorch.org/models/resnet34-b627a593.pth",
        ("torchvision", 50): "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        ("torchvision", 101): "https://download.pytorch.org/models/resnet101-63fe2227.pth",
        ("torchvision", 152): "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        ("tensorpack", 50): "http://models.tensorpack.com/ResNet/ImageNet-ResNet50.npz",
        ("tensorpack", 101): "http://models.tensorpack.com/ResNet/ImageNet-ResNet101.npz",
    }
    for (name, depth), url in expected.items():
        assert weights_url(name, depth) == url
    monkeypatch.setenv("SEGDIST_WEIGHTS_MIRROR", "https://mirror.example/some/dir///")
    assert weights_url("torchvision", 101) == "https://mirror.example/some/dir/resnet101-63fe2227.pth"
    assert weights_url("tensorpack", 50) == "https://mirror.example/some/dir/ImageNet-ResNet50.npz"
    with pytest.raises(SegdistError, match="ResNet-18") as err:
        weights_url("tensorpack", 18)
    _one_line(err)


# ---------------------------------------------------------------- 1. torchvision name, downloaded once


def test_torchvision_name_downloads_once_and_loads(server, torch_home, monkeypatch, capfd):
    sd = _random_state(ResNet(18, width=4, output_stride=8))
    data = _pth_bytes(sd)
    name = _hashed_name(data)
    server.add(name, data)
    monkeypatch.setitem(pretrained.TORCHVISION_FILES, 18, name)
    assert weights_url("torchvision", 18) == server.url + name

    target = ResNet(18, width=4, output_stride=8)
    digest = load_pretrained(target, "torchvision", progress=True)
    assert digest == hashlib.sha256(data).hexdigest()
    assert "B" in capfd.readouterr().err  # tqdm's progress bar went to stderr
    assert (_cache(torch_home) / name).read_bytes() == data
    assert _cache_files(torch_home) == [name]  # no partial file left behind
    for key, value in target.state_dict().items():
        if key in sd:
            assert torch.equal(value, sd[key]), key
    assert server.counts[f"/weights/{name}"] == 1

    again = ResNet(18, width=4, output_stride=8)
    assert load_pretrained(again, "torchvision", progress=False) == digest
    assert fetch_pretrained("torchvision", 18, progress=False) == _cache(torch_home) / name
    assert sum(server.counts.values()) == 1  # reused from the cache, no new request
    assert torch.equal(again.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


# ---------------------------------------------------------------- 2. wrong hash


def test_wrong_hash_is_an_error_and_leaves_nothing(server, torch_home, monkeypatch):
    data = _pth_bytes(_random_state(ResNet(18, width=4)))
    prefix = "deadbeef" if not hashlib.sha256(data).hexdigest().startswith("deadbeef") else "0badf00d"
    name = f"resnet18-{prefix}.pth"
    server.add(name, data)
    monkeypatch.setitem(pretrained.TORCHVISION_FILES, 18, name)
    with pytest.raises(SegdistError) as err:
        load_pretrained(ResNet(18, width=4), "torchvision", progress=False)
    message = _one_line(err)
    assert "'torchvision'" in message and server.url + name in message
    assert "sha256" in message and prefix in message and hashlib.sha256(data).hexdigest() in message
    assert _cache_files(torch_home) == []

    # A corrupted file already in the cache is caught by load_pretrained too.
    _cache(torch_home).joinpath(name).write_bytes(data)
    with pytest.raises(SegdistError, match="delete the file") as err:
        load_pretrained(ResNet(18, width=4), "torchvision", progress=False)
    _one_line(err)


# ---------------------------------------------------------------- 3. unreachable, 404, truncated


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mirror_404_and_truncated(server, torch_home, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/w"
    monkeypatch.setenv("SEGDIST_WEIGHTS_MIRROR", url)
    with pytest.raises(SegdistError, match="cannot reach the host") as err:
        fetch_pretrained("torchvision", 34, progress=False)
    message = _one_line(err)
    assert "'torchvision'" in message and f"{url}/resnet34-b627a593.pth" in message

    monkeypatch.setenv("SEGDIST_WEIGHTS_MIRROR", server.url)
    with pytest.raises(SegdistError, match="HTTP error 404") as err:
        fetch_pretrained("tensorpack", 101, progress=False)
    message = _one_line(err)
    assert "'tensorpack'" in message and server.url + "ImageNet-ResNet101.npz" in message

    # tensorpack files have no hash: a cut body must still be caught (Content-Length).
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(1000, np.float32))
    server.add("ImageNet-ResNet50.npz", buffer.getvalue())
    server.httpd.truncate["/weights/ImageNet-ResNet50.npz"] = 300
    with pytest.raises(SegdistError, match="truncated download: got 300 of") as err:
        fetch_pretrained("tensorpack", 50, progress=False)
    assert server.url + "ImageNet-ResNet50.npz" in _one_line(err)
    assert _cache_files(torch_home) == []


# ---------------------------------------------------------------- 4. tensorpack .npz


_BN_TP = {"weight": "gamma", "bias": "beta", "running_mean": "mean/EMA", "running_var": "variance/EMA"}


def _tensorpack_arrays(net: ResNet, sd: dict[str, torch.Tensor], suffix: str) -> dict[str, np.ndarray]:
    """The tensorpack npz (TF names, HWIO kernels, BGR conv0) of `sd`, written independently of the loader."""
    arrays = {}

    def conv(name, weight):  # OIHW -> HWIO
        arrays[f"{name}/W{suffix}"] = weight.numpy().transpose(2, 3, 1, 0).copy()

    def bn(name, prefix):
        for leaf, tp in _BN_TP.items():
            arrays[f"{name}/bn/{tp}{suffix}"] = sd[f"{prefix}.{leaf}"].numpy().copy()

    conv("conv0", sd["conv1.weight"].flip(1))  # the file's conv0 takes BGR
    bn("conv0", "bn1")
    for g, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        for b, block in enumerate(layer):
            base = f"layer{g + 1}.{b}"
            for k in (1, 2, 3):
                conv(f"group{g}/block{b}/conv{k}", sd[f"{base}.conv{k}.weight"])
                bn(f"group{g}/block{b}/conv{k}", f"{base}.bn{k}")
            if block.downsample is not None:
                conv(f"group{g}/block{b}/convshortcut", sd[f"{base}.downsample.0.weight"])
                bn(f"group{g}/block{b}/convshortcut", f"{base}.downsample.1")
    arrays[f"linear/W{suffix}"] = np.random.randn(net.channels[-1], 1000).astype(np.float32)
    arrays[f"linear/b{suffix}"] = np.zeros(1000, np.float32)
    return arrays


def _check_loaded(target: ResNet, sd: dict, arrays: dict, suffix: str) -> None:
    own = target.state_dict()
    for key, value in sd.items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert value.dtype == torch.float32 and torch.equal(own[key], value), key
    # The documented transposes, spelled out: HWIO -> OIHW, then BGR -> RGB on conv1's input channels.
    conv0 = arrays[f"conv0/W{suffix}"]
    assert conv0.shape == (7, 7, 3, 4)
    oihw = torch.from_numpy(conv0.transpose(3, 2, 0, 1).copy())
    assert torch.equal(target.conv1.weight, oihw.flip(1))
    assert not torch.equal(target.conv1.weight, oihw)
    for c in range(3):
        bgr = torch.from_numpy(conv0[:, :, 2 - c, :]).permute(2, 0, 1)  # HWO -> OHW
        assert torch.equal(target.conv1.weight[:, c], bgr)
    w = arrays[f"group2/block0/convshortcut/W{suffix}"]
    assert torch.equal(target.layer3[0].downsample[0].weight,
                       torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
    assert torch.equal(target.layer1[2].bn3.running_var,
                       torch.from_numpy(arrays[f"group0/block2/conv3/bn/variance/EMA{suffix}"]))


def test_tensorpack_npz_with_tf_suffix_by_name(server, torch_home):
    source = ResNet(50, width=4, output_stride=8)
    sd = _random_state(source, fc=False)
    arrays = _tensorpack_arrays(source, sd, suffix=":0")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # as tensorpack's dump_session_params writes it
    data = buffer.getvalue()
    server.add("ImageNet-ResNet50.npz", data)

    # into the original's backbone: output stride 16, res3/res4 strided on the 1x1 conv, res4 dilated 2
    target = ResNet(50, width=4, output_stride=16, strides=(2, 2, 1), dilations=(1, 2, 4),
                    stride_on=("1x1", "1x1", "3x3"), framework="tf1", init="tensorpack")
    digest = load_pretrained(target, "tensorpack", progress=False)
    assert digest == hashlib.sha256(data).hexdigest()  # recorded although nothing is published to check
    assert server.counts["/weights/ImageNet-ResNet50.npz"] == 1
    assert _cache_files(torch_home) == ["ImageNet-ResNet50.npz"]
    _check_loaded(target, sd, arrays, ":0")


def test_tensorpack_npz_without_suffix_from_a_file(tmp_path):
    source = ResNet(50, width=4)
    sd = _random_state(source, fc=False)
    arrays = _tensorpack_arrays(source, sd, suffix="")
    path = tmp_path / "r50.npz"
    np.savez(path, **arrays)
    check_pretrained_spec(str(path), 50)
    target = ResNet(50, width=4, output_stride=8)
    assert load_pretrained(target, str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    _check_loaded(target, sd, arrays, "")


def test_tensorpack_npz_missing_or_extra_key(tmp_path):
    source = ResNet(50, width=4)
    arrays = _tensorpack_arrays(source, _random_state(source, fc=False), suffix=":0")
    path = tmp_path / "bad.npz"

    missing = dict(arrays)
    del missing["group2/block3/conv2/bn/gamma:0"]
    np.savez(path, **missing)
    with pytest.raises(SegdistError, match=r"bad\.npz.*missing key 'group2/block3/conv2/bn/gamma'") as err:
        load_pretrained(ResNet(50, width=4), str(path))
    assert "layer3.3.bn2.weight" in _one_line(err)

    for extra in ("group0/block0/conv4/W:0", "group3/block3/conv1/W:0"):
        np.savez(path, **arrays, **{extra: np.zeros((1, 1, 4, 4), np.float32)})
        with pytest.raises(SegdistError, match=rf"bad\.npz.*unexpected key '{extra}'") as err:
            load_pretrained(ResNet(50, width=4), str(path))
        _one_line(err)
    # variables outside the backbone's scopes (the training run's global_step, the classifier) are not weights
    np.savez(path, **{**arrays, "global_step:0": np.zeros((), np.int64), "linear/W:0": np.zeros((4, 3), np.float32)})
    load_pretrained(ResNet(50, width=4), str(path))

    # A file for another width: a shape mismatch naming the key.
    np.savez(path, **arrays)
    with pytest.raises(SegdistError, match=r"bad\.npz.*key 'conv0/W:0'.*has shape") as err:
        load_pretrained(ResNet(50, width=8), str(path))
    _one_line(err)


# ---------------------------------------------------------------- 5. local .pth and spec checks


def test_local_pth_and_spec_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = ResNet(18, width=4, output_stride=8)
    sd = _random_state(net)
    for k in [k for k in sd if k.endswith("num_batches_tracked")][:3]:
        del sd[k]  # older torchvision files have none
    path = tmp_path / "local.pth"
    torch.save(sd, path)
    for spec in (None, "torchvision", "tensorpack", str(path), "local.pth"):
        check_pretrained_spec(spec, 50)
    target = ResNet(18, width=4, output_stride=8)
    assert load_pretrained(target, "local.pth") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(target.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])
    assert fetch_pretrained(str(path), 18) == path

    (tmp_path / "notes.txt").write_text("x")
    for spec, depth, extra in (
        (str(tmp_path / "gone.pth"), 18, "file not found"),
        ("imagenet", 101, "neither a known name nor a weights file"),
        ("notes.txt", 101, "must end in .pth/.pt"),
        ("tensorpack", 18, "no ImageNet weights for ResNet-18 (depths: 50, 101)"),
        ("torchvision", 200, "no ImageNet weights for ResNet-200"),
        ("", 50, "not a weights name"),
    ):
        with pytest.raises(SegdistError) as err:
            check_pretrained_spec(spec, depth, where="study.yaml: model.pretrained")
        message = _one_line(err)
        assert message.startswith("study.yaml: model.pretrained: "), message
        assert repr(spec) in message and extra in message, message
        assert "valid: torchvision, tensorpack" in message, message

    # parsing a study on a machine without the cluster's weights: only the name is checked
    check_pretrained_spec(str(tmp_path / "gone.pth"), 18, require_file=False)
    with pytest.raises(SegdistError, match="neither a known name nor a weights file"):
        check_pretrained_spec("imagenet", 101, require_file=False)
    with pytest.raises(SegdistError, match="'imagenet' is neither") as err:
        load_pretrained(ResNet(18, width=4), "imagenet")
    _one_line(err)
    # The checks of the former load_torchvision_weights, same messages.
    bad = dict(sd)
    del bad["layer2.1.conv2.weight"]
    torch.save(bad, path)
    with pytest.raises(SegdistError, match=r"local\.pth: missing key 'layer2\.1\.conv2\.weight'"):
        load_pretrained(ResNet(18, width=4), str(path))
    torch.save(dict(sd, **{"layer9.0.conv1.weight": torch.zeros(1)}), path)
    with pytest.raises(SegdistError, match=r"local\.pth: unexpected key 'layer9\.0\.conv1\.weight'"):
        load_pretrained(ResNet(18, width=4), str(path))
    torch.save(sd, path)
    with pytest.raises(SegdistError, match=r"local\.pth: key 'conv1\.weight' has shape"):
        load_pretrained(ResNet(18, width=8), str(path))
    path.write_text("not a checkpoint")
    with pytest.raises(SegdistError, match=r"local\.pth: not a loadable torch state dict") as err:
        load_pretrained(ResNet(18, width=4), str(path))
    _one_line(err)


# ---------------------------------------------------------------- 6. one download per node


_FETCH = """
import sys, time
from pathlib import Path
from segdist.models import pretrained
pretrained.TORCHVISION_FILES[18] = sys.argv[1]
ready = Path(sys.argv[2])
(ready / sys.argv[3]).touch()
deadline = time.time() + 60
while len(list(ready.iterdir())) < 2 and time.time() < deadline:  # start both fetches together
    time.sleep(0.01)
print(pretrained.fetch_pretrained("torchvision", 18, progress=False))
"""


def test_two_processes_download_once(server, torch_home, tmp_path, monkeypatch):
    data = _pth_bytes(_random_state(ResNet(18, width=4)))
    name = _hashed_name(data)
    server.add(name, data)
    server.httpd.delay_s = 0.5  # the second process surely asks while the first is downloading
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "TORCH_HOME": str(torch_home), "SEGDIST_WEIGHTS_MIRROR": server.url}
    procs = [
        subprocess.Popen([sys.executable, "-c", _FETCH, name, str(ready), str(i)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=90) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(_cache(torch_home) / name)
    assert server.counts[f"/weights/{name}"] == 1
    assert (_cache(torch_home) / name).read_bytes() == data
    assert _cache_files(torch_home) == [name]
