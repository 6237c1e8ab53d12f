"""Load a study's Parquet tables (local path or pyarrow filesystem URI), deduplicated.

Which files hold a table's rows is ``analysis.layout``'s business; this module reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.constants import COLUMNS, KEYS, PARTITION, STRICT, frame_schema
from analysis.files import resolve
from analysis.layout import entry, list_files, split


@dataclass(frozen=True, eq=False)
class Study:
    """Every table of one study, deduplicated, plus its ``study.json`` and ``teacher.json``."""

    epochs: pd.DataFrame
    trials: pd.DataFrame
    runs: pd.DataFrame
    robustness: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)  # the teacher's test metrics

    @property
    def name(self) -> str:
        """The study's name from ``study.json``, else empty."""
        return str(self.config.get("study", ""))


def load_study(study_dir: str | Path) -> Study:
    """Read ``study.json``, ``teacher.json`` and the four tables; a missing table is an empty
    DataFrame, a missing JSON file an empty dict."""
    fs, root = resolve(study_dir)
    tables = {name: read_table(fs, f"{root}/{name}", name) for name in COLUMNS}
    return Study(config=read_config(fs, f"{root}/study.json"),
                 teacher=read_config(fs, f"{root}/teacher.json"), **tables)


def read_config(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Parse a JSON object file such as ``study.json``; a missing file gives ``{}``."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    with fs.open_input_stream(path) as fh:
        raw = fh.read()
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def read_table(fs: pafs.FileSystem, path: str, name: str) -> pd.DataFrame:
    """Read one hive-partitioned table and keep one row per key of table ``name``."""
    return deduplicate(read_parts(fs, path, name), name)


def read_parts(fs: pafs.FileSystem, path: str, name: str) -> pd.DataFrame:
    """Every row of one table as written (duplicates included), in write order.

    The files to read come from one listing (``analysis.layout``). A compaction may replace
    files while they are read; the table is then listed and read again, so the rows returned
    are those of one consistent set of files: every row exactly once.
    """
    for _ in range(READ_TRIES):
        listed = {i.path for i in list_files(fs, path)}
        files = [e.path for e in split(sorted(listed))[0]]
        if not files:
            return pd.DataFrame(columns=COLUMNS[name])
        try:
            table = scan(fs, path, files, name)
        except (pa.ArrowException, OSError) as exc:
            if unchanged(fs, path, listed, files):
                raise corrupt_part_error(fs, files, path, exc) from exc
            continue
        if unchanged(fs, path, listed, files):
            return to_frame(table)
    raise ValueError(f"{path}: the table kept changing while it was read ({READ_TRIES} tries)")


READ_TRIES = 20


def unchanged(fs: pafs.FileSystem, path: str, listed: set[str], files: list[str]) -> bool:
    """Whether a new listing still holds every file read and no new compacted file: then
    the files read are a consistent view (new parts, being newer, may simply be missing)."""
    now = {i.path for i in list_files(fs, path)}
    new_compacted = any(entry(p).compacted for p in now - listed)
    return not new_compacted and set(files) <= now


def scan(fs: pafs.FileSystem, path: str, files: list[str], name: str) -> pa.Table:
    """The rows of ``files`` (in order) with table ``name``'s columns, ``group`` from the path.

    ``epochs`` and ``trials`` have fixed columns, so no file's schema is read up front; the
    others may carry extra columns and are unified over their (few) files.
    """
    schema = frame_schema(name)
    if name not in STRICT:
        schema = unified_schema(fs, files, schema)
    partitioning = ds.partitioning(PARTITION, flavor="hive")
    chunks = []
    for start in range(0, len(files), SCAN_CHUNK):
        dataset = ds.dataset(files[start:start + SCAN_CHUNK], schema=schema, format="parquet",
                             partitioning=partitioning, partition_base_dir=path, filesystem=fs)
        chunks.append(dataset.to_table().combine_chunks())
    return pa.concat_tables(chunks)


SCAN_CHUNK = 256
"""Files per dataset scan: the memory a scan keeps per file (about 0.1 MB of metadata, never
handed back to the OS) is then bounded by one chunk, not by the whole table."""


def to_frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    if "group" in frame:
        frame["group"] = frame["group"].astype(str)
    return frame


def unified_schema(fs: pafs.FileSystem, files: list[str], base: pa.Schema) -> pa.Schema:
    """``base`` plus every column any of ``files`` adds (types unified)."""
    schemas = [base]
    for file in files:
        try:
            schemas.append(pq.read_schema(file, filesystem=fs))
        except FileNotFoundError:
            raise  # removed by a compaction meanwhile: the caller reads again
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"corrupt Parquet file {file}: {exc}") from exc
    return pa.unify_schemas(schemas, promote_options="permissive")


def corrupt_part_error(
    fs: pafs.FileSystem, files: list[str], path: str, exc: Exception
) -> ValueError:
    """Find the part that fails to read on its own and name it in a ValueError."""
    for file in files:
        try:
            pq.read_table(file, filesystem=fs)
        except (pa.ArrowException, OSError) as part_exc:
            return ValueError(f"corrupt Parquet file {file}: {part_exc}")
    return ValueError(f"cannot read Parquet dataset {path}: {exc}")


def deduplicate(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Keep the last row per key: latest ``timestamp`` for epochs, else last in file order."""
    key = KEYS[name]
    if frame.empty or not set(key) <= set(frame.columns):
        return frame.reset_index(drop=True)
    if name == "epochs" and "timestamp" in frame:
        frame = frame.sort_values("timestamp", kind="stable", na_position="first")
    frame = frame.drop_duplicates(key, keep="last")
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


def latest_attempt(epochs: pd.DataFrame) -> pd.DataFrame:
    """Epoch rows of the highest attempt per (trial_id, epoch), as used for curves."""
    if epochs.empty or "attempt" not in epochs:
        return epochs
    ordered = epochs.sort_values(["trial_id", "epoch", "attempt"], kind="stable")
    latest = ordered.drop_duplicates(["trial_id", "epoch"], keep="last")
    return latest.reset_index(drop=True)
