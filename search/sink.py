"""The Parquet sink: append-only, hive-partitioned tables under ``<storage>/<study>/``.

Every ``append`` writes one new part file ``<table>/group=<g>/part-<time>-<uuid>.parquet``
(written under a hidden temporary name, then renamed), so a reader never sees half a file
and a crashed writer leaves at most a hidden temporary file. Rows are never rewritten:
readers keep the latest row per key (``read_table``), so a retried or resumed trial never
counts twice. Part names start with a nanosecond timestamp, so file order is write order.
"""

from __future__ import annotations

import io
import math
import posixpath
import re
import time
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import tables

from . import fsutil

CFG = [f"cfg_{p}" for p in ("T", "w_ce", "w_kl", "w_at", "w_fa", "mask_pct")]
TERMS = ("ce", "kl", "at", "fa")
F, INT, S = pa.float64(), pa.int64(), pa.string()

SCHEMAS: dict[str, pa.Schema] = {
    "epochs": pa.schema(
        [("study", S), ("group", S), ("trial_id", S), ("attempt", INT), ("epoch", INT),
         ("seed", INT)]
        + [(c, F) for c in CFG]
        + [("val_acc", F), ("val_loss", F), ("train_loss", F)]
        + [(f"loss_{t}", F) for t in TERMS] + [(f"gshare_{t}", F) for t in TERMS]
        + [("lr", F), ("epoch_seconds", F), ("images_per_s", F), ("node", S), ("timestamp", F)]
    ),
    "trials": pa.schema(
        [("study", S), ("group", S), ("trial_id", S), ("status", S), ("epochs_run", INT),
         ("best_val_acc", F), ("best_epoch", INT), ("wall_seconds", F), ("seed", INT)]
        + [(c, F) for c in CFG] + [("error", S), ("timestamp", F)]
    ),
    "runs": pa.schema(
        [("study", S), ("group", S), ("seed", INT), ("source_trial_id", S), ("test_acc", F),
         ("test_loss", F), ("corrupt_acc_mean", F), ("params", INT), ("latency_ms_bs1", F),
         ("images_per_s_bs256", F)] + [(c, F) for c in CFG] + [("timestamp", F)]
    ),
    "robustness": pa.schema(
        [("study", S), ("group", S), ("seed", INT), ("corruption", S), ("severity", INT),
         ("acc", F), ("timestamp", F)]
    ),
}
# Tables whose columns are fixed; runs/robustness may carry extra columns (types inferred).
STRICT = ("epochs", "trials")
STATUSES = ("completed", "asha_stopped", "early_stopped", "failed", "diverged")
_GROUP = re.compile(r"[A-Za-z0-9_.-]+")


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


def to_arrow(table: str, group: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with the table's schema (``group`` set on every row)."""
    schema = SCHEMAS[table]
    names = set(schema.names)
    extra = sorted({k for row in rows for k in row} - names)
    if extra and table in STRICT:
        raise ValueError(f"{table}: unknown column {extra[0]!r}")
    columns = {}
    for fld in schema:
        values = [group if fld.name == "group" else row.get(fld.name) for row in rows]
        columns[fld.name] = pa.array([_cell(v, fld.type) for v in values], type=fld.type)
    for name in extra:
        columns[name] = pa.array([row.get(name) for row in rows])
    return pa.table(columns)


class ParquetSink:
    """Writes rows of one study; holds only the study location, so it pickles cheaply."""

    def __init__(self, study_dir: str):
        self.study_dir = str(study_dir)

    def append(self, table: str, group: str, rows: list[dict[str, Any]]) -> str | None:
        """Write ``rows`` as one new part file of ``table``/``group``; returns its path."""
        if table not in SCHEMAS:
            raise ValueError(f"table: unknown {table!r}, expected one of {list(SCHEMAS)}")
        if not _GROUP.fullmatch(group or ""):
            raise ValueError(f"group: {group!r} is not a valid partition value")
        if not rows:
            return None
        buf = io.BytesIO()
        pq.write_table(to_arrow(table, group, rows), buf)
        fs, root = fsutil.resolve(self.study_dir)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
        path = posixpath.join(root, table, f"group={group}", name)
        fsutil.atomic_write(fs, path, buf.getvalue())
        return path

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
    """(filesystem, table path, visible part files in write order)."""
    fs, root = fsutil.resolve(study_dir)
    path = posixpath.join(root, name)
    return fs, path, tables.parquet_files(fs, path)


def read_raw(study_dir: str, name: str) -> pd.DataFrame:
    """Every row of table ``name`` as written (duplicates included), in write order."""
    fs, root = fsutil.resolve(study_dir)
    return tables.read_parts(fs, posixpath.join(root, name), name)


def read_table(study_dir: str, name: str) -> pd.DataFrame:
    """Table ``name`` of a study, one row per key (the same reader ``analysis`` uses)."""
    return tables.deduplicate(read_raw(study_dir, name), name)
