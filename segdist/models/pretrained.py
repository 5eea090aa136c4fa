"""ImageNet weights for the ResNet backbone: by name (downloaded once per node), via a mirror, or from a file.

A *spec* (``model.pretrained`` in a study file) is one of

* ``"torchvision"``: torchvision's ResNet v1 ImageNet weights ("IMAGENET1K_V1"), depths 18, 34, 50, 101,
  152, from https://download.pytorch.org/models/ (file names in ``TORCHVISION_FILES``; the 8 hex digits after
  the dash are the first 8 of the file's sha256, torch.hub's published-hash convention, and are verified);
* ``"tensorpack"``: the tensorpack-trained ImageNet ResNet-50/101 weights that the original 2017 DeepLab code
  (dongzhuoyao/tensorpack, ``deeplab`` branch, ``download_init_model.sh``) loaded, from
  http://models.tensorpack.com/ResNet/ (``TENSORPACK_FILES``; no hash is published, so none is verified, but
  ``load_pretrained`` returns the sha256 for the record);
* a local file: ``.pth``/``.pt`` (a torchvision ResNet state dict) or ``.npz`` (tensorpack format).

Named weights go to torch hub's cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``,
by default ``~/.cache/torch/hub/checkpoints``) under the official file name, so torchvision's own downloads
and segdist share one copy. If ``SEGDIST_WEIGHTS_MIRROR`` is set (an ``http(s)://`` or ``file://`` URL of a
folder that holds the official file names), files are fetched from there instead (e.g. on a cluster without
internet access).

Sources: torchvision ``models/resnet.py`` (``ResNet*_Weights.IMAGENET1K_V1`` URLs); torch.hub
``load_state_dict_from_url``/``download_url_to_file`` (cache folder, ``-<sha256 prefix>.`` convention);
tensorpack ``examples/ResNet/README.md`` (download table), ``examples/ResNet/imagenet_resnet_utils.py`` at
cb8b48d7 (the training preprocessing) and ``tensorpack/tfutils/varmanip.py`` (``dump_session_params``: the npz
keys are TF variable names).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from segdist.errors import SegdistError

try:  # torch already depends on filelock; keep a fallback for odd installs
    from filelock import FileLock
except ImportError:  # pragma: no cover - exercised only without filelock
    FileLock = None

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - torch.hub carries a minimal stand-in
    from torch.hub import tqdm

PRETRAINED_NAMES = ("torchvision", "tensorpack")
MIRROR_ENV = "SEGDIST_WEIGHTS_MIRROR"

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
# depth -> official file name; "-xxxxxxxx." = the first 8 hex digits of its sha256 (torch.hub convention)
TORCHVISION_FILES = {
    18: "resnet18-f37072fd.pth",
    34: "resnet34-b627a593.pth",
    50: "resnet50-0676ba61.pth",
    101: "resnet101-63fe2227.pth",
    152: "resnet152-394f9c45.pth",
}
TENSORPACK_BASE_URL = "http://models.tensorpack.com/ResNet/"
# depth -> official file name; no published hash
TENSORPACK_FILES = {
    50: "ImageNet-ResNet50.npz",
    101: "ImageNet-ResNet101.npz",
}

WEIGHT_SUFFIXES = (".pth", ".pt", ".npz")
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub.HASH_REGEX
_CHUNK = 1 << 20


def _tables() -> dict[str, tuple[str, dict[int, str]]]:
    # read at call time, so a test (or a user) can monkeypatch the module-level tables
    return {
        "torchvision": (TORCHVISION_BASE_URL, TORCHVISION_FILES),
        "tensorpack": (TENSORPACK_BASE_URL, TENSORPACK_FILES),
    }


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def check_pretrained_spec(spec: str | None, depth: int, where: str = "model.pretrained",
                          require_file: bool = True) -> None:
    """Check a pretrained-weights spec without any network access.

    `spec`: None (no pretrained weights: fine), a name in PRETRAINED_NAMES, or a local file path.
    `depth`: the ResNet depth (18, 34, 50, 101 or 152) the weights are for.
    `where`: what to call the value in the message (e.g. the config key).
    `require_file`: a path must exist here (False: only its name is checked, e.g. when a study
    is parsed on a machine that does not hold the cluster's weights).

    A name must have weights for `depth`: torchvision 18, 34, 50, 101, 152 (TORCHVISION_FILES);
    tensorpack 50, 101 (TENSORPACK_FILES). Names win over a file of the same name in the working directory.
    Anything else must be a file (``~`` expanded, relative to the working directory) whose name
    ends in .pth/.pt (torchvision state dict) or .npz (tensorpack format); its contents are not read here.

    Raises SegdistError with one line naming `where`, the value and the valid names.
    """
    if spec is None:
        return
    valid = f"valid: {', '.join(PRETRAINED_NAMES)} or a .pth/.pt/.npz file"
    if not isinstance(spec, str) or not spec.strip():
        raise SegdistError(f"{where}: {spec!r} is not a weights name or file path; {valid}")
    tables = _tables()
    if spec in tables:
        files = tables[spec][1]
        if depth not in files:
            depths = ", ".join(map(str, sorted(files)))
            raise SegdistError(
                f"{where}: {spec!r} has no ImageNet weights for ResNet-{depth} (depths: {depths}); {valid}"
            )
        return
    path = Path(spec).expanduser()
    if path.suffix.lower() not in WEIGHT_SUFFIXES and not path.is_file():
        raise SegdistError(f"{where}: {spec!r} is neither a known name nor a weights file; {valid}")
    if require_file and not path.is_file():
        raise SegdistError(f"{where}: {spec!r}: file not found; {valid}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise SegdistError(
            f"{where}: {spec!r}: a weights file must end in .pth/.pt (torchvision state dict) "
            f"or .npz (tensorpack); {valid}"
        )


def _file_name(spec: str, depth: int) -> str:
    tables = _tables()
    if spec not in tables:
        raise SegdistError(f"{spec!r} is not a weights name; valid: {', '.join(PRETRAINED_NAMES)}")
    check_pretrained_spec(spec, depth, where="pretrained weights")
    return tables[spec][1][depth]


def weights_url(spec: str, depth: int) -> str:
    """The download URL (str) of named weights `spec` (in PRETRAINED_NAMES) for ResNet-`depth`.

    The official URL (see the module docstring), or, if the environment variable SEGDIST_WEIGHTS_MIRROR is
    set and not empty, ``MIRROR.rstrip('/') + '/' + <file name of the official URL>``.
    Raises SegdistError (one line) for a spec that is not a name or a depth without weights.
    """
    name = _file_name(spec, depth)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    base = _tables()[spec][0]
    return f"{mirror.rstrip('/')}/{name}" if mirror else base + name


def _hash_prefix(spec: str, file_name: str) -> str | None:
    """The published sha256 prefix in a torchvision file name (torch.hub convention), else None."""
    if spec != "torchvision":
        return None
    match = _HASH_REGEX.search(file_name)
    return match.group(1) if match and match.group(1) else None


def cache_dir() -> Path:
    """torch hub's checkpoint folder: torch.hub.get_dir()/checkpoints (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


class _Lock:
    """An exclusive inter-process lock on `path` (filelock, or fcntl.flock without it)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = FileLock(str(path)) if FileLock is not None else None
        self._fd: int | None = None

    def __enter__(self):
        if self._lock is not None:
            self._lock.acquire()
        else:  # pragma: no cover
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
        elif self._fd is not None:  # pragma: no cover
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _download(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> str:
    """Download `url` to `dst` atomically; returns the sha256 hex digest. Raises _DownloadError(reason).

    Like torch.hub.download_url_to_file (temp file + move, sha256 prefix check), but it also catches a
    truncated body (fewer bytes than Content-Length), which torch.hub's reader does not notice when there is
    no hash to check (tensorpack files), and an .npz that is not a zip archive (an error page, a cut file).
    """
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "segdist"})
        sha256 = hashlib.sha256()
        size = 0
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            with tqdm(total=expected, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dst.name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    sha256.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and size != expected:
            raise _DownloadError(f"truncated download: got {size} of {expected} bytes")
        if size == 0:
            raise _DownloadError("the server sent an empty file")
        digest = sha256.hexdigest()
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise _DownloadError(
                f"wrong sha256 hash: the file name promises {hash_prefix}..., the download has {digest}"
            )
        if dst.suffix == ".npz" and not zipfile.is_zipfile(tmp):
            raise _DownloadError("the download is not an .npz (zip) archive (cut off, or an error page?)")
        os.replace(tmp, dst)
        return digest
    except urllib.error.HTTPError as err:
        raise _DownloadError(f"HTTP error {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        what = "cannot reach the host" if url.lower().startswith(("http:", "https:")) else "cannot open it"
        raise _DownloadError(f"{what} ({err.reason})") from None
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        raise _DownloadError(f"no data for {DOWNLOAD_TIMEOUT_S:g} s (timed out)") from None
    except http.client.HTTPException as err:
        raise _DownloadError(f"broken HTTP response ({type(err).__name__}: {err})") from None
    except OSError as err:
        raise _DownloadError(f"{type(err).__name__}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)


class _DownloadError(Exception):
    pass


def fetch_pretrained(spec: str, depth: int, *, progress: bool = True) -> Path:
    """The local path (Path) of the weights `spec` for ResNet-`depth`.

    A local file is returned as is (``~`` expanded). A name in PRETRAINED_NAMES is downloaded from
    weights_url(spec, depth) once per node into torch.hub.get_dir()/'checkpoints' (honours TORCH_HOME) under
    its official file name, with a progress bar on stderr (if `progress`) and reused afterwards. An exclusive
    file lock (``<file>.lock`` next to it, the `filelock` package) makes several processes of one node
    (e.g. the DDP workers) download it once: the first downloads, the others wait and reuse the file.
    The download goes to a ``.partial`` temp file that is renamed into place only when complete and checked.

    torchvision files are verified with torch.hub's published-hash convention: the 8 hex digits after the
    dash in the file name (resnet101-63fe2227.pth) must begin the file's sha256. tensorpack files have no
    published hash; they are checked for completeness (Content-Length) and being a zip archive.

    Raises SegdistError (one line): an invalid spec (see check_pretrained_spec); a wrong hash, an HTTP error,
    an unreachable host, a timeout or a truncated download (naming the spec, the URL and the reason; no
    partial file is left in the cache).
    """
    check_pretrained_spec(spec, depth, where="pretrained weights")
    if spec not in _tables():
        return Path(spec).expanduser()
    name = _file_name(spec, depth)
    url = weights_url(spec, depth)
    folder = cache_dir()
    dst = folder / name
    if dst.is_file():
        return dst
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegdistError(f"pretrained {spec!r}: cannot create the weights cache {folder}: {err}") from None
    with _Lock(folder / f"{name}.lock"):
        if dst.is_file():  # another process downloaded it while we waited
            return dst
        try:
            _download(url, dst, _hash_prefix(spec, name), progress)
        except _DownloadError as err:
            raise SegdistError(
                f"pretrained {spec!r} (ResNet-{depth}): downloading {url} failed: {_one_line(err)}"
            ) from None
    return dst


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_pretrained(backbone, spec: str, *, progress: bool = True) -> str:
    """Fetch the weights `spec` (fetch_pretrained) and load them into `backbone`; returns the file's sha256
    (64 hex characters) for the record.

    `backbone`: a segdist.models.resnet.ResNet (any width, depth backbone.depth); its tensors are overwritten
    in place (float32, on its current device), num_batches_tracked is left as it is.

    * .pth/.pt: a torchvision ResNet state dict. ``fc.*`` is ignored and ``num_batches_tracked`` may be absent
      (older torchvision files); any other missing or unexpected key, or a shape mismatch, is an error.
    * .npz: the tensorpack format (np.load gives float32 arrays keyed by TF variable names, an optional ``:0``
      suffix is stripped). Mapping (g, b from 0; k = 1, 2, 3):

        conv0/W                                      -> conv1.weight
        conv0/bn/{gamma,beta,mean/EMA,variance/EMA}  -> bn1.{weight,bias,running_mean,running_var}
        group{g}/block{b}/conv{k}/W                  -> layer{g+1}.{b}.conv{k}.weight
        group{g}/block{b}/conv{k}/bn/*               -> layer{g+1}.{b}.bn{k}.*
        group{g}/block0/convshortcut/W               -> layer{g+1}.0.downsample.0.weight
        group{g}/block0/convshortcut/bn/*            -> layer{g+1}.0.downsample.1.*

      ``linear/*`` (the 1000-class classifier) is ignored. Conv kernels are HWIO [kh, kw, in, out] and
      become torch's OIHW via ``.transpose(3, 2, 0, 1)``. tensorpack's ImageNet models were trained on BGR images normalised as
      (x/255 - mean_bgr)/std_bgr (tensorpack examples/ResNet/imagenet_resnet_utils.py at cb8b48d7 and
      examples/ImageNetModels/imagenet_utils.py ``image_preprocess`` with image_bgr=True);
      segdist feeds RGB normalised with the same ImageNet mean/std in RGB order
      (segdist.data.classes.IMAGENET_MEAN/STD), so the only adjustment is to reverse conv1.weight's
      input-channel axis (BGR -> RGB): ``weight[:, ::-1]``. Every backbone key except num_batches_tracked must
      be filled; a key under ``conv0/`` or ``group*/`` that maps to none is an unexpected key; keys outside
      the backbone's scopes (``linear/*``, ``global_step``, optimizer slots) are ignored.

    For a torchvision name the cached file's sha256 is checked against the prefix in its name again.
    Raises SegdistError (one line): anything fetch_pretrained raises; an unreadable file; a missing or
    unexpected key or a shape mismatch (naming the file and the key).
    """
    path = fetch_pretrained(spec, backbone.depth, progress=progress)
    if not path.is_file():
        raise SegdistError(f"{path}: pretrained weights file not found")
    digest = _sha256(path)
    prefix = _hash_prefix(spec, path.name) if spec in _tables() else None
    if prefix is not None and not digest.startswith(prefix):
        raise SegdistError(
            f"{path}: cached {spec!r} weights have sha256 {digest}, the file name promises {prefix}...; "
            "delete the file to download it again"
        )
    if path.suffix.lower() == ".npz":
        state = _read_tensorpack(path, backbone)
    else:
        state = _read_torchvision(path)
    _load_state(backbone, state, path)
    return digest


def _read_torchvision(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise SegdistError(
            f"{path}: not a loadable torch state dict ({type(err).__name__}: {_one_line(err)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise SegdistError(f"{path}: expected a torchvision ResNet state dict (a mapping of tensor names)")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


_BN = {"gamma": "weight", "beta": "bias", "mean/EMA": "running_mean", "variance/EMA": "running_var"}
_TP_CONV = re.compile(
    r"group(\d+)/block(\d+)/(conv\d+|convshortcut)/(W|bn/gamma|bn/beta|bn/mean/EMA|bn/variance/EMA)"
)


def tensorpack_key_to_torchvision(key: str) -> str | None:
    """The torchvision/segdist name of a tensorpack variable name (``:0`` already stripped), else None.

    conv0/W -> conv1.weight, conv0/bn/gamma -> bn1.weight, group2/block3/conv1/W -> layer3.3.conv1.weight,
    group1/block0/convshortcut/bn/mean/EMA -> layer2.0.downsample.1.running_mean, ...
    """
    if key == "conv0/W":
        return "conv1.weight"
    if key.startswith("conv0/bn/") and key[len("conv0/bn/"):] in _BN:
        return "bn1." + _BN[key[len("conv0/bn/"):]]
    match = _TP_CONV.fullmatch(key)
    if match is None:
        return None
    group, block, conv, leaf = match.groups()
    prefix = f"layer{int(group) + 1}.{int(block)}."
    if conv == "convshortcut":
        module = "downsample.0" if leaf == "W" else "downsample.1"
    else:
        module = conv if leaf == "W" else "bn" + conv[len("conv"):]
    return prefix + module + "." + ("weight" if leaf == "W" else _BN[leaf[len("bn/"):]])


def _read_tensorpack(path: Path, backbone) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise SegdistError(
            f"{path}: not a loadable tensorpack .npz ({type(err).__name__}: {_one_line(err)})"
        ) from None
    own = backbone.state_dict()
    state: dict[str, torch.Tensor] = {}
    for raw, array in arrays.items():
        key = raw[:-2] if raw.endswith(":0") else raw
        if not key.startswith(("conv0/", "group")):
            continue  # not a backbone variable: the classifier, global_step, ...
        target = tensorpack_key_to_torchvision(key)
        if target is None or target not in own:
            raise SegdistError(
                f"{path}: unexpected key {raw!r} for a ResNet-{backbone.depth} backbone "
                "(is it a tensorpack ImageNet ResNet of this depth?)"
            )
        if target in state:
            raise SegdistError(f"{path}: key {raw!r} appears twice (with and without ':0')")
        if not np.issubdtype(array.dtype, np.floating):
            raise SegdistError(f"{path}: key {raw!r} has dtype {array.dtype}, expected float32")
        if target.endswith("weight") and array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            if target == "conv1.weight":
                array = array[:, ::-1]  # BGR -> RGB input channels
        expected = tuple(own[target].shape)
        if array.shape != expected:
            layout = " (OIHW, after the HWIO transpose)" if array.ndim == 4 else ""
            raise SegdistError(
                f"{path}: key {raw!r} ({target!r}) has shape {tuple(array.shape)}{layout}, the model expects "
                f"{expected} (depth {backbone.depth}, width {backbone.width})"
            )
        state[target] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    for key in own:
        if key not in state and not key.endswith("num_batches_tracked"):
            raise SegdistError(
                f"{path}: missing key {_torchvision_key_to_tensorpack(key)!r} ({key!r}) "
                f"for a ResNet-{backbone.depth} backbone"
            )
    return state


def _torchvision_key_to_tensorpack(key: str) -> str:
    """The inverse of tensorpack_key_to_torchvision, for error messages."""
    leaf_of = {v: k for k, v in _BN.items()}
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "conv0/W" if parts[0] == "conv1" else f"conv0/bn/{leaf_of.get(parts[1], parts[1])}"
    if len(parts) >= 4 and parts[0].startswith("layer"):
        base = f"group{int(parts[0][5:]) - 1}/block{parts[1]}/"
        if parts[2] == "downsample":
            if parts[3] == "0":
                return base + "convshortcut/W"
            return base + f"convshortcut/bn/{leaf_of.get(parts[4], parts[4])}"
        if parts[2].startswith("conv"):
            return base + parts[2] + "/W"
        if parts[2].startswith("bn"):
            return base + f"conv{parts[2][2:]}/bn/{leaf_of.get(parts[3], parts[3])}"
    return key


def _load_state(backbone, state: dict[str, torch.Tensor], path: Path) -> None:
    """The checks of the former segdist.models.resnet.load_torchvision_weights, then a non-strict load."""
    own = backbone.state_dict()
    for key, value in state.items():
        if key not in own:
            raise SegdistError(
                f"{path}: unexpected key {key!r} for a ResNet-{backbone.depth} backbone "
                "(is it a torchvision ResNet of this depth?)"
            )
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SegdistError(
                f"{path}: key {key!r} has shape {shape}, the model expects {tuple(own[key].shape)} "
                f"(depth {backbone.depth}, width {backbone.width})"
            )
    for key in own:
        if key not in state and not key.endswith("num_batches_tracked"):
            raise SegdistError(f"{path}: missing key {key!r} for a ResNet-{backbone.depth} backbone")
    backbone.load_state_dict(state, strict=False)
