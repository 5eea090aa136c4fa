import io
import tarfile

import pytest

from segdist.data.tarstream import TarFormatError, iter_samples, iter_tar


def _tar(members, fmt=tarfile.USTAR_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("a.jpg", b"x" * 700), ("a.png", b""), ("dir/b.json", b"{}"), ("c" * 150 + ".png", b"y" * 512)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_what_tarfile_writes(fmt):
    assert list(iter_tar(io.BytesIO(_tar(MEMBERS, fmt)))) == MEMBERS


def test_ustar_and_missing_end_marker():
    data = _tar(MEMBERS[:3])
    assert list(iter_tar(io.BytesIO(data))) == MEMBERS[:3]
    body = data[: 3 * 512 + 1024 + 512]  # the three members, no zero blocks
    assert list(iter_tar(io.BytesIO(body))) == MEMBERS[:3]


def test_truncation_and_corruption_are_reported():
    data = _tar(MEMBERS[:1])
    with pytest.raises(TarFormatError, match="'a.jpg' truncated"):
        list(iter_tar(io.BytesIO(data[:800])))
    with pytest.raises(TarFormatError, match="truncated header"):
        list(iter_tar(io.BytesIO(data[:300])))
    bad = bytearray(data)
    bad[10] ^= 0xFF
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(bad))))


class _Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read (as sockets and object stores do)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n=-1):
        n = self.step if n < 0 else min(n, self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("chunk_size", [512, 1024, 1536, 1 << 16])
@pytest.mark.parametrize("step", [1, 100, 513, 1 << 20])
def test_members_across_chunk_and_read_boundaries(chunk_size, step):
    members = [(f"k{i}.{ext}", bytes([i]) * size) for i, (ext, size) in
               enumerate([("jpg", 3000), ("png", 1), ("json", 511), ("jpg", 512), ("png", 1025), ("cls", 0)])]
    assert list(iter_tar(_Trickle(_tar(members), step), chunk_size)) == members
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_tar(_Trickle(_tar(members)[:4000], step), chunk_size))


def test_samples_are_grouped_as_webdataset_groups_them():
    import webdataset as wds

    members = [("a/x1.jpg", b"1"), ("a/x1.PNG", b"2"), ("a/x1.seg.png", b"3"), ("x2.jpg", b"4"),
               ("noext", b"5"), ("x2.json", b"6"), ("a.b/x3.png", b"7")]
    ours = list(iter_samples(members))
    theirs = list(wds.tariterators.group_by_keys({"fname": n, "data": d, "__url__": "u"} for n, d in members))
    assert ours == [{k: v for k, v in s.items() if k != "__url__"} for s in theirs]
    assert [s["__key__"] for s in ours] == ["a/x1", "x2", "a.b/x3"]
    with pytest.raises(ValueError, match="duplicate"):
        list(iter_samples([("k.jpg", b""), ("k.jpg", b"")]))
