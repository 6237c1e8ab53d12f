"""Where a table's rows live on storage: part files, compacted files, and which ones a reader
reads.

A table is a directory of hive partitions, ``<table>/group=<g>/``. The sink writes one
*part* per append, ``part-<t>-<uuid>.parquet``, where ``<t>`` is the nanosecond time of the
write (20 digits): name order is write order. Compaction merges the parts of a partition
whose times lie in ``[lo, hi]`` into one *compacted* file ``part-<lo>-<hi>-compact-<uuid>.parquet``
(rows in write order), then deletes them. A reader skips every file whose time range lies
inside a compacted file's range, so between the two steps — or after a compaction killed
between them — each row is still read exactly once. Hidden names (``.``/``_``) are never read.
"""

from __future__ import annotations

import posixpath
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

PART = re.compile(r"part-(\d{20})-[0-9a-f]{32}\.parquet")
COMPACTED = re.compile(r"part-(\d{20})-(\d{20})-compact-[0-9a-f]{32}\.parquet")


def part_name(time_ns: int | None = None) -> str:
    """A new part's file name, stamped with the current time unless ``time_ns`` is given."""
    stamp = time.time_ns() if time_ns is None else time_ns
    return f"part-{stamp:020d}-{uuid.uuid4().hex}.parquet"


def compacted_name(lo: int, hi: int) -> str:
    """The file name of a compacted file replacing the files stamped ``lo`` .. ``hi``."""
    return f"part-{lo:020d}-{hi:020d}-compact-{uuid.uuid4().hex}.parquet"


@dataclass(frozen=True)
class Entry:
    """One visible Parquet file of a partition, with the write times it holds."""

    path: str
    lo: int | None  # None: a name this layout does not know (read, never compacted away)
    hi: int | None
    compacted: bool

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def entry(path: str) -> Entry:
    """Parse a file name into its time range (``None`` for a foreign name)."""
    name = posixpath.basename(path)
    if m := COMPACTED.fullmatch(name):
        return Entry(path, int(m[1]), int(m[2]), True)
    if m := PART.fullmatch(name):
        return Entry(path, int(m[1]), int(m[1]), False)
    return Entry(path, None, None, False)


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def covered(item: Entry, compacted: list[Entry]) -> bool:
    """Whether another compacted file holds ``item``'s rows (equal ranges: larger name wins)."""
    if item.lo is None:
        return False
    for c in compacted:
        if c.path == item.path or not (c.lo <= item.lo and item.hi <= c.hi):
            continue
        if not item.compacted or (c.lo, c.hi) != (item.lo, item.hi) or c.name > item.name:
            return True
    return False


def split(paths: list[str]) -> tuple[list[Entry], list[Entry]]:
    """(visible entries in write order, covered entries) of the Parquet files in ``paths``.

    Visibility is decided per directory (partition); ``paths`` are sorted by name, which for
    kdsearch's names is write order.
    """
    by_dir: dict[str, list[Entry]] = {}
    for path in sorted(paths):
        if not is_hidden(posixpath.basename(path)) and path.endswith(".parquet"):
            by_dir.setdefault(posixpath.dirname(path), []).append(entry(path))
    visible: list[Entry] = []
    hidden: list[Entry] = []
    for entries in by_dir.values():
        compacted = [e for e in entries if e.compacted]
        for e in entries:
            (hidden if compacted and covered(e, compacted) else visible).append(e)
    return visible, hidden


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file below ``path`` (hidden ones included); empty where ``path`` is no directory."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File]


def visible_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Paths of the Parquet files a reader reads below ``path``, in write order."""
    return [e.path for e in split([i.path for i in list_files(fs, path)])[0]]
