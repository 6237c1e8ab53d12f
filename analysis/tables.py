"""Load a study's Parquet tables (local path or pyarrow filesystem URI), deduplicated."""

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

from analysis.constants import COLUMNS, KEYS


@dataclass(frozen=True, eq=False)
class Study:
    """Every table of one study, deduplicated, plus its ``study.json``."""

    epochs: pd.DataFrame
    trials: pd.DataFrame
    runs: pd.DataFrame
    robustness: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The study's name from ``study.json``, else empty."""
        return str(self.config.get("study", ""))


def resolve(study_dir: str | Path) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a local path or a URI such as ``s3://bucket/study``."""
    text = str(study_dir)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def load_study(study_dir: str | Path) -> Study:
    """Read ``study.json`` and the four tables; a missing table is an empty DataFrame."""
    fs, root = resolve(study_dir)
    tables = {name: read_table(fs, f"{root}/{name}", name) for name in COLUMNS}
    return Study(config=read_config(fs, f"{root}/study.json"), **tables)


def read_config(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Parse ``study.json``; a missing file gives ``{}``."""
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
    """Read one hive-partitioned dataset and keep one row per key of table ``name``."""
    return deduplicate(read_parts(fs, path, name), name)


def read_parts(fs: pafs.FileSystem, path: str, name: str) -> pd.DataFrame:
    """Every row of one hive-partitioned dataset as written (duplicates included)."""
    files = parquet_files(fs, path)
    if not files:
        return pd.DataFrame(columns=COLUMNS[name])
    schema = unified_schema(fs, files)
    dataset = ds.dataset(
        files, schema=schema, format="parquet", partitioning="hive",
        partition_base_dir=path, filesystem=fs,
    )
    try:
        table = dataset.to_table()
    except (pa.ArrowException, OSError) as exc:
        raise corrupt_part_error(fs, files, path, exc) from exc
    frame = table.to_pandas()
    if "group" in frame:
        frame["group"] = frame["group"].astype(str)
    return frame


def parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Parquet parts under ``path`` in file order (sorted paths); hidden/temp files skipped."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        info.path for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )


def unified_schema(fs: pafs.FileSystem, files: list[str]) -> pa.Schema:
    """One schema covering every part (columns added later are kept) plus ``group``."""
    schemas = []
    for file in files:
        try:
            schemas.append(pq.read_schema(file, filesystem=fs))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"corrupt Parquet file {file}: {exc}") from exc
    schemas.append(pa.schema([("group", pa.string())]))
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
