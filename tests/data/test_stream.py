import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from segdist.data.classes import SYNTHETIC_CLASSES
from segdist.data.sample import decode_label_zst, encode_label_png, encode_label_zst
from segdist.data.stream import read_dataset_info, train_loader, val_loader, val_samples_per_rank
from segdist.data.transforms import TrainTransform
from segdist.errors import SegdistError

_TRANSFORM_ARGS = ("crop_size", "scale_range", "label_mode", "edges", "augmentation", "trimap_band")


def _train(info, **kw):
    """train_loader with a TrainTransform built from the transform's own keywords in `kw`."""
    look = {"crop_size": 24, "scale_range": (0.5, 1.5), "num_classes": info.num_classes}
    look.update({k: kw.pop(k) for k in _TRANSFORM_ARGS if k in kw})
    args = dict(
        transform=TrainTransform(look.pop("crop_size"), look.pop("scale_range"), **look),
        batch_size=2,
        batches_per_epoch=3,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        loader_workers=0,
        shuffle_buffer=8,
    )
    args.update(kw)
    return train_loader(info, **args)


def _batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x, y) for ba, bb in zip(a, b, strict=False) for x, y in zip(ba, bb, strict=False)
    )


def test_read_dataset_info(synth_shards):
    info = read_dataset_info(synth_shards["train"])
    assert info.dataset == "synthetic" and info.classes == SYNTHETIC_CLASSES and info.num_classes == 6
    assert info.num_samples == 13 and info.shard_sizes == (5, 5, 3)
    assert all(s.startswith(str(synth_shards["train"])) and s.endswith(".tar") for s in info.shards)
    info2 = read_dataset_info("file://" + str(synth_shards["train"]))
    assert info2.shards[0].startswith("file://")


def test_read_dataset_info_missing(tmp_path):
    with pytest.raises(SegdistError, match="no shards in"):
        read_dataset_info(tmp_path / "absent")
    with pytest.raises(SegdistError, match="no shards in"):
        read_dataset_info(tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(SegdistError, match="did not finish"):
        read_dataset_info(tmp_path)


def test_train_batches_shapes_and_values(synth_shards):
    info = read_dataset_info(synth_shards["train"])
    loader = _train(info, batches_per_epoch=4, crop_size=(20, 28))
    batches = _batches(loader)
    assert len(batches) == len(loader) == 4
    for images, labels in batches:
        assert images.shape == (2, 20, 28, 4) and images.dtype == torch.uint8
        assert labels.shape == (2, 20, 28) and labels.dtype == torch.uint8
        assert set(labels.unique().tolist()) <= set(range(6)) | {255}
    assert loader.num_skipped == 0


def test_train_is_deterministic_and_varies(synth_shards):
    info = read_dataset_info(synth_shards["train"])
    a = _batches(_train(info, loader_workers=2))
    b = _batches(_train(info, loader_workers=2))
    assert _same(a, b)
    assert not _same(a, _batches(_train(info, loader_workers=2, epoch=1)))
    assert not _same(a, _batches(_train(info, loader_workers=2, seed=1)))
    r0 = _batches(_train(info, world_size=2, rank=0))
    r1 = _batches(_train(info, world_size=2, rank=1))
    assert not _same(r0, r1)
    assert _same(_batches(_train(info, loader_workers=0)), _batches(_train(info, loader_workers=0)))


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 1), (3, 2), (2, 0)])
def test_every_rank_gets_the_same_number_of_batches(synth_shards, world_size, workers):
    # 3 shards of 5, 5, 3 samples: uneven, and fewer shards than slots when 3 ranks x 2 workers
    info = read_dataset_info(synth_shards["train"])
    for rank in range(world_size):
        loader = _train(info, rank=rank, world_size=world_size, loader_workers=workers, batches_per_epoch=7)
        assert sum(1 for _ in loader) == 7


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_val_sees_every_sample_exactly_once(synth_shards, world_size, workers):
    info = read_dataset_info(synth_shards["val"])  # 7 samples in shards of 3, 3, 1
    keys = Counter()
    for rank in range(world_size):
        loader = val_loader(info, rank=rank, world_size=world_size, loader_workers=workers, with_keys=True)
        n = 0
        for image, label, key in loader:
            assert image.shape[:2] == (1, 3) and label.shape == (1, *image.shape[2:])
            assert label.dtype == torch.int64
            keys[key] += 1
            n += 1
        assert n == len(loader) == val_samples_per_rank(info, rank, world_size, workers)
    assert keys == Counter({f"{i:06d}": 1 for i in range(13, 20)})


def test_val_image_is_the_normalised_original(synth_root, synth_shards):
    from PIL import Image

    from segdist.data.transforms import normalize

    info = read_dataset_info(synth_shards["val"])
    image, label, key = next(iter(val_loader(info, rank=0, world_size=1, loader_workers=0, with_keys=True)))
    rgb = np.asarray(Image.open(synth_root / "JPEGImages" / f"{key}.jpg").convert("RGB"))
    np.testing.assert_array_equal(image[0].numpy(), normalize(rgb))
    expected = np.asarray(Image.open(synth_root / "SegmentationClass" / f"{key}.png"))
    np.testing.assert_array_equal(label[0].numpy(), expected)


# ----------------------------------------------------------------------------- bad shards


@pytest.fixture
def val_copy(synth_shards, tmp_path):
    out = tmp_path / "val"
    shutil.copytree(synth_shards["val"], out)
    return out


def _rewrite_shard(path, edit):
    """Rewrite a shard, passing (name, data) of every member through edit, which returns the
    new data, (new name, new data), or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            out = edit(name, data)
            if out is None:
                continue
            if isinstance(out, tuple):
                name, out = out
            info = tarfile.TarInfo(name)
            info.size = len(out)
            tar.addfile(info, io.BytesIO(out))


def _label_member(key, shape, value, fmt):
    """(member name, data) of a label filled with value: the shard format's .label.zst, or a
    .png as format-1 shards (and other tools) store it."""
    label = np.full(shape, value, np.uint8)
    if fmt == "png":
        return f"{key}.png", encode_label_png(label)
    return f"{key}.label.zst", encode_label_zst(label)


def test_format_1_shards_with_png_labels_read_the_same(val_copy, synth_shards):
    sizes = {}

    def to_png(name, data):
        key, suffix = name.split(".", 1)
        if suffix == "json":  # members are sorted: KEY.json comes before KEY.label.zst
            meta = json.loads(data)
            sizes[key] = (meta["height"], meta["width"])
        if suffix != "label.zst":
            return data
        return f"{key}.png", encode_label_png(decode_label_zst(data, *sizes[key], name))

    for shard in sorted(val_copy.glob("*.tar")):
        _rewrite_shard(shard, to_png)
        with tarfile.open(shard) as tar:
            assert not any(n.endswith(".zst") for n in tar.getnames())
    old = list(val_loader(read_dataset_info(synth_shards["val"]), rank=0, world_size=1, loader_workers=0))
    new = list(val_loader(read_dataset_info(val_copy), rank=0, world_size=1, loader_workers=0))
    assert len(old) == len(new) == 7
    for (img_a, lab_a), (img_b, lab_b) in zip(old, new, strict=True):
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)


def _all(info, on_bad="raise"):
    loader = val_loader(info, rank=0, world_size=1, loader_workers=0, on_bad_sample=on_bad, with_keys=True)
    return loader, [key for _, _, key in loader]


def test_truncated_tar_names_the_shard(val_copy):
    path = val_copy / "val-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match=r"val-000001\.tar.*truncated"):
        _all(info)
    loader, keys = _all(info, "skip")
    assert loader.num_skipped == 1 and "val-000001.tar" in loader.skipped_keys[0]
    assert {"000013", "000014", "000015", "000019"} <= set(keys)


def test_sample_without_label_names_shard_and_key(val_copy):
    _rewrite_shard(val_copy / "val-000000.tar", lambda n, d: None if n == "000014.label.zst" else d)
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match=r"val-000000\.tar \(sample '000014'\).*no label"):
        _all(info)
    loader, keys = _all(info, "skip")
    assert loader.num_skipped == 1 and "000014" not in keys and len(keys) == 6


@pytest.mark.parametrize("fmt", ["zst", "png"])
def test_label_out_of_range_names_shard_and_key(val_copy, fmt):
    seen = {}

    def edit(name, data):
        seen[name] = data
        if name == "000016.label.zst":  # members are sorted: 000016.json came first
            meta = json.loads(seen["000016.json"])
            return _label_member("000016", (meta["height"], meta["width"]), 6, fmt)
        return data

    _rewrite_shard(val_copy / "val-000001.tar", edit)
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match=r"val-000001\.tar \(sample '000016'\).*\[6\]"):
        _all(info)


@pytest.mark.parametrize(
    "fmt, message", [("png", r"image is \d+x\d+ but label is 5x5"), ("zst", r"label.*not \d+x\d+ like its image")]
)
def test_size_mismatch_names_shard_and_key(val_copy, fmt, message):
    _rewrite_shard(
        val_copy / "val-000002.tar",
        lambda n, d: _label_member(n.split(".")[0], (5, 5), 0, fmt) if n.endswith(".label.zst") else d,
    )
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match=r"val-000002\.tar \(sample '000019'\): " + message):
        _all(info)
    loader = train_loader(
        info,
        transform=TrainTransform(16, (1, 1)),
        batch_size=1,
        batches_per_epoch=2,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        loader_workers=0,
        on_bad_sample="skip",
    )
    assert len(list(loader)) == 2 and loader.num_skipped >= 0


def test_corrupt_label_names_shard_and_key(val_copy):
    # 000016 gets a truncated zstd frame, the shard's other labels bytes that are no zstd at all
    _rewrite_shard(
        val_copy / "val-000001.tar",
        lambda n, d: (d[:-4] if n.startswith("000016") else b"not zstd") if n.endswith(".label.zst") else d,
    )
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match=r"val-000001\.tar \(sample '000016'\): label \(\.label\.zst\) is corrupt"):
        _all(info)
    loader, keys = _all(info, "skip")
    assert loader.num_skipped == info.shard_sizes[1] and "000016" not in keys
    assert len(keys) == info.num_samples - info.shard_sizes[1]


def test_train_skip_mode_counts(val_copy):
    _rewrite_shard(val_copy / "val-000000.tar", lambda n, d: None if n == "000014.label.zst" else d)
    info = read_dataset_info(val_copy)
    with pytest.raises(SegdistError, match="'000014'"):
        list(_train(info, batches_per_epoch=6))
    loader = _train(info, batches_per_epoch=6, on_bad_sample="skip", loader_workers=2)
    assert len(list(loader)) == 6
    assert loader.num_skipped >= 1 and all("000014" in k for k in loader.skipped_keys)


def test_empty_shard_list(synth_shards):
    import dataclasses

    info = dataclasses.replace(read_dataset_info(synth_shards["val"]), shards=(), shard_sizes=())
    with pytest.raises(SegdistError, match="no shards"):
        _train(info)


def test_label_modes_and_edge_channel(synth_shards):
    info = read_dataset_info(synth_shards["train"])
    hard = _batches(_train(info))
    trimap = _batches(_train(info, label_mode="trimap"))
    for (_, h), (_, t) in zip(hard, trimap, strict=True):
        assert t.dtype == torch.uint8
        assert torch.all((t == h) | (t == 255)) and (t == 255).sum() > (h == 255).sum()
    images, soft = _batches(_train(info, label_mode="edgemix"))[0]
    assert soft.shape == (2, 6, 24, 24) and soft.dtype == torch.float32
    sums = soft.sum(1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    images, labels = _batches(_train(info, edges=True))[0]
    assert images.shape == (2, 24, 24, 4) and images[..., 3].max() > 0  # the edge map, x255
    assert torch.equal(images[..., :3], hard[0][0][..., :3])  # same randomness: same RGB crops
    val = read_dataset_info(synth_shards["val"])
    image, label = next(iter(val_loader(val, rank=0, world_size=1, loader_workers=0, edges=True)))
    assert image.shape[1] == 4


def test_stream_over_http(synth_shards):
    import functools
    import http.server
    import threading

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(synth_shards["val"].parent)
    )
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/val"
        info = read_dataset_info(url)
        assert info.shards[0] == url + "/val-000000.tar"
        keys = [k for _, _, k in val_loader(info, rank=0, world_size=1, loader_workers=0, with_keys=True)]
        assert sorted(keys) == [f"{i:06d}" for i in range(13, 20)]
        with pytest.raises(SegdistError, match="no shards in"):
            read_dataset_info(url + "/missing")
    finally:
        server.shutdown()
        server.server_close()


def test_training_passes_re_deal_shards_across_slots(synth_shards):
    from itertools import islice

    from segdist.data.stream import _plan, _SkipLog, _Slot, _slot_samples

    info = read_dataset_info(synth_shards["train"])  # 3 shards, 2 slots
    per_slot = []
    for index in range(2):
        slot = _Slot(index, 2)
        shard_ids, by_index = _plan(info, slot)
        raw = _slot_samples(
            info,
            slot,
            shard_ids,
            by_index,
            np.random.default_rng(index),
            "raise",
            _SkipLog(),
            repeat=True,
            pass_seed=(0, 0, 2, 1),
        )
        per_slot.append([s["__key__"] for s in islice(raw, 80)])
    everything = {f"{i:06d}" for i in range(13)}
    assert set(per_slot[0]) == everything and set(per_slot[1]) == everything
    first_pass_0, first_pass_1 = per_slot[0][:3], per_slot[1][:3]
    assert not set(first_pass_0) & set(first_pass_1)  # disjoint shards within a pass


@pytest.fixture(scope="module")
def few_samples(synth_root, tmp_path_factory):
    """One shard of 3 training images, and one of 1."""
    from segdist.data.shard_writer import build_shards
    from segdist.data.voc import iter_voc

    samples = list(iter_voc(synth_root, "train", classes=SYNTHETIC_CLASSES))
    out = tmp_path_factory.mktemp("few")
    for n in (3, 1):
        build_shards(samples[:n], out / f"n{n}", dataset="synthetic", classes=SYNTHETIC_CLASSES)
    return {n: read_dataset_info(out / f"n{n}") for n in (3, 1)}


@pytest.mark.parametrize("samples,world_size,workers", [(3, 2, 2), (1, 1, 2), (1, 2, 2), (3, 1, 4)])
def test_fewer_training_samples_than_reading_slots_still_fill_every_rank(few_samples, samples, world_size, workers):
    """3 images in one shard read by 2 ranks x 2 loader workers (and 1 image by 2 workers):
    every rank gets its batches (samples repeat); validation still sees each sample once."""
    info = few_samples[samples]
    for rank in range(world_size):
        loader = _train(info, rank=rank, world_size=world_size, loader_workers=workers, batches_per_epoch=3)
        assert len(_batches(loader)) == 3
    keys = Counter(key for rank in range(world_size)
                   for *_, key in val_loader(info, rank=rank, world_size=world_size, loader_workers=workers,
                                             with_keys=True))
    assert sorted(keys.values()) == [1] * samples
