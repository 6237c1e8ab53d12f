"""Compaction: merge a table partition's part files into one file, safely beside readers.

A running search writes one small part file per row (``search.store.sink``); reading tens of
thousands of them costs far more than their rows. Compaction replaces a partition's parts
with one *compacted* file, in two steps (``analysis.layout`` says how names carry times):

1. write the rows of the oldest visible files, in write order, as one new file named after
   the range of part times it holds (hidden temporary, then rename);
2. delete the files it replaces.

Readers skip files whose times a compacted file covers, so between the steps — and after a
compaction killed between them — every row is read exactly once; the next compaction
deletes the leftovers. Rows are copied as written (no deduplication), so readers keep
deduplicating by the same rules.

Beside a writer: only files whose times are older than ``min_age_s`` are merged. A part's
time is taken just before it becomes visible, so a part that was not yet visible when the
compaction listed the partition carries a time newer than the cutoff and stays outside the
compacted range. This holds while the writer's and the compactor's clocks agree within
``min_age_s`` (the ``kdsearch compact`` default, 60 s, is far beyond NTP's error);
``compact_group`` with ``min_age_s=0`` is for a partition nothing writes any more.
"""

from __future__ import annotations

import io
import itertools
import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import layout, tables
from analysis.constants import SCHEMAS
from search.store import files as fsutil
from search.store.files import publish

MIN_AGE_S = 60.0
"""``kdsearch compact`` merges only files older than this (a search may still be writing)."""
TEMP_MAX_AGE_S = 3600.0
"""Hidden temporaries (of a killed writer or compaction) older than this are deleted."""
TRIES = 5


@dataclass(frozen=True)
class Compacted:
    """What one partition's compaction did."""

    table: str
    group: str
    merged: int  # files replaced by a new compacted file (0: none written)
    rows: int  # rows in the new compacted file
    removed: int  # files deleted (merged ones plus leftovers of an earlier compaction)
    newer: int  # visible files left alone: newer than the cutoff
    files: int  # visible files afterwards
    note: str = ""

    def line(self) -> str:
        what = (f"{self.merged} files -> 1 ({self.rows} rows)" if self.merged
                else "nothing to merge")
        extra = f"; {self.newer} newer files left" if self.newer else ""
        extra += f"; {self.note}" if self.note else ""
        return f"{self.table}/group={self.group}: {what}{extra}; {self.files} files now"


def compact_group(study_dir: str, group: str, tables: tuple[str, ...] = ("epochs", "trials"),
                  min_age_s: float = 0.0) -> list[Compacted]:
    """Compact ``group``'s partition of each table in ``tables`` (missing ones are skipped).

    Safe to call at any time beside readers. With the default ``min_age_s=0`` call it when
    nothing appends to these partitions any more (the group's search, or a reproduce, has
    returned); beside a running writer pass a margin such as ``MIN_AGE_S``.
    """
    fs, root = fsutil.resolve(study_dir)
    cutoff = time.time_ns() - int(min_age_s * 1e9)
    done = []
    for name in tables:
        folder = posixpath.join(root, name, f"group={group}")
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            done.append(compact_partition(fs, posixpath.join(root, name), group, name, cutoff))
    return done


def compact_groups(study_dir: str, groups: tuple[str, ...] | list[str],
                   tables: tuple[str, ...]) -> list[Compacted]:
    """``compact_group`` for each of ``groups`` (its writer has finished: margin 0)."""
    return [done for group in groups for done in compact_group(study_dir, group, tables)]


def compact_study(study_dir: str, min_age_s: float = MIN_AGE_S) -> list[Compacted]:
    """Compact every partition of every table of a study."""
    fs, root = fsutil.resolve(study_dir)
    done = []
    for name in SCHEMAS:
        path = posixpath.join(root, name)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("group="):
                group = info.base_name.removeprefix("group=")
                done += compact_group(study_dir, group, (name,), min_age_s)
    return done


def compact_partition(fs: pafs.FileSystem, table_path: str, group: str, name: str,
                      cutoff_ns: int) -> Compacted:
    """Merge the leading visible files of one partition whose times are below ``cutoff_ns``.

    Retries (up to ``TRIES`` times) when another compaction changes the partition meanwhile.
    """
    folder = posixpath.join(table_path, f"group={group}")
    for _ in range(TRIES):
        infos = layout.list_files(fs, folder)
        visible, covered = layout.split([i.path for i in infos])
        if any(e.lo is None for e in visible):
            return Compacted(name, group, 0, 0, 0, 0, len(visible),
                             "left as is: it holds files not named by kdsearch")
        head = list(itertools.takewhile(lambda e: e.hi < cutoff_ns, visible))
        merge = head if len(head) > 1 or (head and not head[0].compacted) else []
        rows = 0
        if merge:
            try:
                data, rows = merged_bytes(fs, table_path, [e.path for e in merge], name)
            except (pa.ArrowException, OSError) as exc:
                paths = [e.path for e in merge]
                if all(fs.get_file_info(p).type == pafs.FileType.File for p in paths):
                    raise tables.corrupt_part_error(fs, paths, folder, exc) from exc
                continue  # another compaction removed a file meanwhile: list again
            lo, hi = merge[0].lo, max(e.hi for e in merge)
            publish(fs, folder, data, name=lambda lo=lo, hi=hi: layout.compacted_name(lo, hi))
        doomed = [e.path for e in merge + covered]
        for path in doomed:
            delete(fs, path)
        delete_stale_temporaries(fs, infos)
        return Compacted(name, group, len(merge), rows, len(doomed), len(visible) - len(head),
                         len(visible) - len(merge) + (1 if merge else 0))
    raise ValueError(f"{folder}: changed during {TRIES} compaction attempts; run it again")


def merged_bytes(fs: pafs.FileSystem, table_path: str, files: list[str],
                 name: str) -> tuple[bytes, int]:
    """The rows of ``files`` in order, as one Parquet file without the ``group`` column."""
    table = tables.scan(fs, table_path, files, name)
    table = table.drop_columns(["group"])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue(), table.num_rows


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file; one already gone (another compaction's work) is fine."""
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_stale_temporaries(fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> None:
    """Delete hidden ``*.tmp`` files older than ``TEMP_MAX_AGE_S`` (left by killed writers)."""
    now = time.time()
    for info in infos:
        if (layout.is_hidden(info.base_name) and info.base_name.endswith(".tmp")
                and info.mtime is not None and now - info.mtime.timestamp() > TEMP_MAX_AGE_S):
            delete(fs, info.path)
