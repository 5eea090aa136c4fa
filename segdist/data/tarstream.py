"""A fast reader for the tar members of a shard, from any binary stream, and their grouping
into webdataset samples.

Python's tarfile spends more time parsing headers than PIL spends decoding a small JPEG;
this reader handles exactly what shards contain (ustar headers, regular files, plus GNU
long names and pax path/size records written by other tools) with one struct-free parse per
header, reads the stream in large chunks, verifies every header checksum and reports
truncation precisely. `iter_samples` groups members by key with webdataset's naming rule
(a plain loop here: webdataset's generic grouping costs more per sample than the parse).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
CHUNK = 1 << 16  # bytes per buffered read (larger members are read directly)
_ZERO_BLOCK = bytes(BLOCK)


class TarFormatError(ValueError):
    """The stream is not a well-formed tar (truncated, bad checksum, unsupported entry)."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes (fewer only at the end of the stream), however the stream chunks them."""
    data = stream.read(n)
    if data is None:
        data = b""
    if len(data) == n or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed


def _pax_records(data: bytes) -> dict[str, str]:
    records = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def _c_string(field: bytes) -> str:
    """A NUL-terminated (or NUL-padded) UTF-8 header field as text."""
    return field.split(b"\0", 1)[0].decode("utf-8")


def _parse_header(header: bytes) -> tuple[str, int, bytes] | None:
    """(name, size in bytes, type flag) of one header block as read; None at the end of the
    archive (nothing left, or a zero block). TarFormatError for a short block, a bad
    checksum or a gzip stream."""
    if not header:
        return None
    if len(header) < BLOCK:
        raise TarFormatError(f"truncated header ({len(header)} of {BLOCK} bytes)")
    if header == _ZERO_BLOCK:
        return None
    if not _checksum_ok(header):
        if header[:2] == b"\x1f\x8b":
            raise TarFormatError("compressed (gzip) shard; shards must be plain .tar")
        raise TarFormatError("bad header checksum (corrupt data)")
    name = _c_string(header[:100])
    if header[257:262] == b"ustar":
        prefix = _c_string(header[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    return name, _number(header[124:136]), header[156:157]


class _ChunkReader:
    """A binary stream read `chunk_size` bytes at a time: buf[pos:] is read but not yet parsed.
    A member larger than what is buffered is read straight from the stream (one copy)."""

    __slots__ = ("stream", "chunk_size", "buf", "pos")

    def __init__(self, stream: BinaryIO, chunk_size: int) -> None:
        self.stream = stream
        self.chunk_size = chunk_size
        self.buf, self.pos = b"", 0

    def _fill(self, n: int) -> None:
        """Make at least n unparsed bytes available (or all that is left)."""
        avail = len(self.buf) - self.pos
        if avail < n:
            more = _read_exact(self.stream, max(self.chunk_size, n - avail))
            self.buf, self.pos = self.buf[self.pos :] + more, 0

    def header(self) -> bytes:
        """The next header block: BLOCK bytes, fewer only at the end of the stream."""
        self._fill(BLOCK)
        header = self.buf[self.pos : self.pos + BLOCK]
        self.pos += len(header)
        return header

    def member(self, name: str, size: int) -> bytes:
        """The next `size` bytes (member `name`'s data), skipping its padding to the next
        block. TarFormatError if the data or padding is cut short."""
        avail = len(self.buf) - self.pos
        if size > avail:  # more than is buffered: the rest straight from the stream (one copy)
            data = self.buf[self.pos :] + _read_exact(self.stream, size - avail)
            self.buf, self.pos = b"", 0
            if len(data) < size:
                raise TarFormatError(f"member {name!r} truncated ({len(data)} of {size} bytes)")
        else:
            data = self.buf[self.pos : self.pos + size]
            self.pos += size
        padding = -size % BLOCK
        self._fill(padding)
        if len(self.buf) - self.pos < padding:
            raise TarFormatError(f"member {name!r} truncated (padding)")
        self.pos += padding
        return data


def iter_tar(stream: BinaryIO, chunk_size: int = CHUNK) -> Iterator[tuple[str, bytes]]:
    """(member name, data) of every regular file, in archive order.

    Reads the stream in chunks of `chunk_size` bytes (one system call per chunk instead of
    three per member) and parses headers and small members out of them; a member larger
    than what is buffered is read straight from the stream.

    Raises TarFormatError on a truncated archive (a header or member cut short), a header
    with a wrong checksum, or a compressed stream. A missing end-of-archive marker is
    tolerated (as tarfile does); callers that know the expected count check it.
    """
    reader = _ChunkReader(stream, chunk_size)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        parsed = _parse_header(reader.header())
        if parsed is None:
            return
        name, size, kind = parsed
        if "size" in pax:
            size = int(pax["size"])
        data = reader.member(name, size)
        if kind == b"L":  # GNU long name for the next member
            long_name = _c_string(data)
            continue
        if kind == b"x":  # pax header for the next member
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K"):  # global pax header, GNU long link name: irrelevant here
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if "path" in pax:
            name = pax["path"]
        pax = {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def split_member_name(name: str) -> tuple[str, str]:
    """"dir/key.ext.more" -> ("dir/key", "ext.more"): webdataset's rule (the sample key ends
    at the first dot of the file name); ("name", "") when there is no dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no dot, or nothing before it
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_samples(members) -> Iterator[dict]:
    """(name, data) members -> webdataset samples {"__key__": key, ext: data, ...}, one per
    run of consecutive members with the same key (what webdataset's group_by_keys yields,
    with lower-cased extensions; members without an extension are skipped, as there). A
    repeated extension within a sample raises ValueError."""
    sample: dict | None = None
    for name, data in members:
        key, ext = split_member_name(name)
        if not ext:
            continue
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        ext = ext.lower()
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in the sample {key!r}")
        sample[ext] = data
    if sample is not None:
        yield sample
