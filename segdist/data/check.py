"""Check a built shard folder end to end: every shard readable, counts as recorded, every
sample decodable with a label in range and matching the manifest."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from segdist.data.sample import invalid_label_lut
from segdist.data.stream import (
    DATASET_JSON,
    ShardReadError,
    decode_sample,
    is_url,
    iter_shard,
    join_url,
    read_dataset_info,
)
from segdist.errors import SegdistError


@dataclass
class InspectReport:
    root: str
    dataset: str = ""
    split: str = ""
    classes: tuple[str, ...] = ()
    shards: int = 0
    samples: int = 0
    expected_samples: int = 0
    min_size: tuple[int, int] | None = None  # (width, height)
    max_size: tuple[int, int] | None = None
    class_pixels: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    problems: list[str] = field(default_factory=list)
    skipped_at_build: int = 0

    def as_dict(self) -> dict:
        total = sum(self.class_pixels) or 1
        return {
            "root": self.root,
            "dataset": self.dataset,
            "split": self.split,
            "shards": self.shards,
            "samples": self.samples,
            "expected_samples": self.expected_samples,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "class_frequency": {
                c: round(n / total, 6) for c, n in zip(self.classes, self.class_pixels, strict=False)
            },
            "ignore_pixels": self.ignore_pixels,
            "skipped_at_build": self.skipped_at_build,
            "problems": self.problems,
            "ok": not self.problems,
        }


def inspect_shards(path: str | os.PathLike, *, max_problems: int = 50) -> InspectReport:
    """Read every sample of every shard listed in PATH/dataset.json and report."""
    path = str(path)
    info = read_dataset_info(path)
    report = InspectReport(
        root=path,
        dataset=info.dataset,
        split=info.split,
        classes=info.classes,
        shards=len(info.shards),
        expected_samples=info.num_samples,
        class_pixels=[0] * info.num_classes,
        skipped_at_build=int(info.stats.get("skipped", 0)),
    )
    manifest = _read_manifest(path, report)
    lut = invalid_label_lut(info.num_classes)
    seen: Counter[str] = Counter()

    def problem(msg: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(msg)

    for url, expected in zip(info.shards, info.shard_sizes, strict=False):
        name = os.path.basename(url)
        try:
            for raw in iter_shard(url, expected):
                key = raw.get("__key__")
                seen[key] += 1
                try:
                    _, image, label = decode_sample(raw, info.num_classes, lut)
                except SegdistError as err:
                    problem(str(err))
                    continue
                report.samples += 1
                size = (image.shape[1], image.shape[0])  # (width, height)
                report.min_size = (
                    size if report.min_size is None else tuple(np.minimum(report.min_size, size).tolist())
                )
                report.max_size = (
                    size if report.max_size is None else tuple(np.maximum(report.max_size, size).tolist())
                )
                counts = np.bincount(label.ravel(), minlength=256)
                for c in range(info.num_classes):
                    report.class_pixels[c] += int(counts[c])
                report.ignore_pixels += int(counts[255])
                if manifest is not None:
                    row = manifest.get(key)
                    if row is None:
                        problem(f"{url} (sample {key!r}): not in manifest.parquet")
                    elif row[0] != name or (row[1], row[2]) != size:
                        problem(
                            f"{url} (sample {key!r}): manifest says shard {row[0]} size {row[1]}x{row[2]}, "
                            f"shard holds {size[0]}x{size[1]}"
                        )
        except ShardReadError as err:
            problem(str(err))
        except SegdistError as err:  # cannot open
            problem(str(err))
    for key, n in seen.items():
        if n > 1:
            problem(f"{path}: sample key {key!r} appears {n} times")
    if report.samples != info.num_samples and not report.problems:
        problem(
            f"{join_url(path, DATASET_JSON)}: says {info.num_samples} samples, shards hold {report.samples}"
        )
    return report


def _read_manifest(path: str, report: InspectReport) -> dict | None:
    url = join_url(path, "manifest.parquet")
    if is_url(path):
        return None  # the manifest is a convenience; remote checks rely on dataset.json
    if not os.path.isfile(url):
        report.problems.append(f"{url}: missing")
        return None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(url, columns=["key", "shard", "width", "height"]).to_pydict()
    except Exception as err:
        report.problems.append(f"{url}: unreadable ({err})")
        return None
    return {
        k: (s, w, h)
        for k, s, w, h in zip(table["key"], table["shard"], table["width"], table["height"], strict=False)
    }
