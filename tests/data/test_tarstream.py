import io
import tarfile

import pytest

from segdist.data.tarstream import TarFormatError, iter_tar


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
