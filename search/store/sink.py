"""The Parquet sink: append-only, hive-partitioned tables under ``<storage>/<study>/``.

Every ``append`` writes one new part file ``<table>/group=<g>/part-<time>-<uuid>.parquet``
(``analysis.layout`` names the files). The file holds the table's columns except ``group``,
which is only the partition key, so pandas, pyarrow, polars and duckdb read a table directory
directly. A part is written under a hidden temporary name and renamed (on object stores a
single PUT), so a reader never sees half a file and a crashed writer leaves at most a hidden
temporary file; the time in its name is taken just before the rename, so a part becomes
visible within moments of its time (``search.store.compact`` relies on that). Rows are never
rewritten: readers keep the latest row per key (``read_table``), so a retried or resumed
trial never counts twice. File order is write order. ``search.store.compact`` merges a
partition's parts into one file.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import warnings
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import layout, tables
from analysis.constants import CFG_COLUMNS, SCHEMAS, STRICT
from analysis.constants import TERMS as TERMS  # re-exported for search.engine.callback
from search.store import files as fsutil
from search.store.files import publish

CFG = CFG_COLUMNS
STATUSES = ("completed", "asha_stopped", "early_stopped", "failed", "diverged")
_GROUP = re.compile(r"[A-Za-z0-9_.-]+")
# A part holds a row or a few: no dictionary, statistics or compression, which makes the many
# small files of a running study about a third cheaper to read (measured: docs/PERFORMANCE.md).
PART_OPTIONS = {"use_dictionary": False, "write_statistics": False, "compression": "NONE"}


def _cell(value: Any, dtype: pa.DataType) -> Any:
    """A row value coerced to the column type (None stays None; NaN stays NaN for floats)."""
    if value is None:
        return None
    if pa.types.is_floating(dtype):
        return float(value)
    if pa.types.is_integer(dtype):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value)
    if pa.types.is_string(dtype):
        return str(value)
    return value


def to_arrow(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with the table's stored columns (a ``group`` key is dropped:
    the partition directory holds it)."""
    schema = SCHEMAS[table]
    names = set(schema.names)
    extra = sorted({k for row in rows for k in row} - names - {"group"})
    if extra and table in STRICT:
        raise ValueError(f"{table}: unknown column {extra[0]!r}")
    columns = {}
    for fld in schema:
        columns[fld.name] = pa.array([_cell(row.get(fld.name), fld.type) for row in rows],
                                     type=fld.type)
    for name in extra:
        columns[name] = pa.array([row.get(name) for row in rows])
    return pa.table(columns)


COMPACT_EVERY = 500
"""A sink compacts a partition after this many appends to it, so that a running study is
never more than a few hundred part files per partition (``search.store.compact``)."""
RUNNING_MARGIN_S = 10.0
"""The sink's own compactions merge only parts older than this (another writer's parts)."""


class ParquetSink:
    """Writes rows of one study; holds the study location and a count of appends per
    partition, so it pickles cheaply. ``compact_every=None`` never compacts."""

    def __init__(self, study_dir: str, compact_every: int | None = COMPACT_EVERY):
        self.study_dir = str(study_dir)
        self.compact_every = compact_every
        self.appended: dict[tuple[str, str], int] = {}

    def append(self, table: str, group: str, rows: list[dict[str, Any]]) -> str | None:
        """Write ``rows`` as one new part file of ``table``/``group``; returns its path.

        A row's ``group`` key, if any, is ignored: the partition is ``group``."""
        if table not in SCHEMAS:
            raise ValueError(f"table: unknown {table!r}, expected one of {list(SCHEMAS)}")
        if not _GROUP.fullmatch(group or ""):
            raise ValueError(f"group: {group!r} is not a valid partition value")
        if not rows:
            return None
        buf = io.BytesIO()
        pq.write_table(to_arrow(table, rows), buf, **PART_OPTIONS)
        fs, root = fsutil.resolve(self.study_dir)
        path = publish(fs, posixpath.join(root, table, f"group={group}"), buf.getvalue())
        self.count_and_compact(table, group)
        return path

    def count_and_compact(self, table: str, group: str) -> None:
        """Every ``compact_every`` appends to a partition, compact its older parts. A failed
        compaction only warns: the parts stay readable, and the next one retries."""
        every = getattr(self, "compact_every", COMPACT_EVERY)  # sinks pickled before
        counts = self.__dict__.setdefault("appended", {})
        counts[table, group] = counts.get((table, group), 0) + 1
        if not every or counts[table, group] < every:
            return
        counts[table, group] = 0
        from search.store.compact import compact_group  # search.store.compact imports this module

        try:
            compact_group(self.study_dir, group, (table,), min_age_s=RUNNING_MARGIN_S)
        except (OSError, ValueError, pa.ArrowException) as exc:
            warnings.warn(f"compaction of {table}/group={group} failed: {exc}", stacklevel=2)

    def drop_group(self, table: str, group: str) -> None:
        """Remove every part of ``table``/``group`` (stale rows of a restarted search)."""
        fs, root = fsutil.resolve(self.study_dir)
        path = posixpath.join(root, table, f"group={group}")
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def append(study_dir: str, table: str, group: str, rows: list[dict[str, Any]]) -> str | None:
    """``ParquetSink(study_dir).append(table, group, rows)``."""
    return ParquetSink(study_dir).append(table, group, rows)


def part_files(study_dir: str, name: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, table path, the files a reader reads, in write order)."""
    fs, root = fsutil.resolve(study_dir)
    path = posixpath.join(root, name)
    return fs, path, layout.visible_files(fs, path)


def read_raw(study_dir: str, name: str) -> pd.DataFrame:
    """Every row of table ``name`` as written (duplicates included), in write order."""
    fs, root = fsutil.resolve(study_dir)
    return tables.read_parts(fs, posixpath.join(root, name), name)


def read_table(study_dir: str, name: str) -> pd.DataFrame:
    """Table ``name`` of a study, one row per key (the same reader ``analysis`` uses)."""
    return tables.deduplicate(read_raw(study_dir, name), name)
