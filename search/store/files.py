"""Where a study's files live: storage locations, study names, and file writes.

The file primitives (local paths and pyarrow filesystem URIs, atomic writes) are
``analysis.files``, re-exported here for the search package; this module adds what only a
writer of studies needs: valid study names, a storage location that can be written,
``publish`` for the sink's part files, and the study layout's names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.fs as pafs

from analysis import layout
from analysis.files import atomic_write, exists, is_uri, join, read_bytes, resolve, write_bytes

__all__ = ["RAY_DIR", "atomic_write", "check_storage", "check_study_name", "exists",
           "existing_study", "is_uri", "join", "local_study_dir", "publish", "read_bytes",
           "resolve", "write_bytes"]

RAY_DIR = "ray"  # <study>/ray: Ray Tune's experiments (the search, each reproduce)
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_study_name(name: object) -> str:
    """A study name is one path component: letters, digits, ``._-``; no ``..``, no slashes."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"study: {name!r} is not a valid study name (letters, digits, '._-', "
                         "one path component, not starting with '.' or containing '..')")
    return name


def check_storage(location: str | Path) -> None:
    """Refuse a local storage path that cannot become a writable directory (a regular file
    on the way, or no write permission), before any work starts. URIs are not checked."""
    text = str(location)
    if is_uri(text):
        return
    path = Path(text).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"storage: cannot create {text!r}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"storage: cannot write to {text!r}: {probe} is not writable")


def publish(fs: pafs.FileSystem, folder: str, data: bytes, name=layout.part_name) -> str:
    """Write ``data`` as a new file in ``folder`` named ``name()``, called just before the
    file becomes visible (``atomic_write``); returns its path."""
    return atomic_write(fs, lambda: f"{folder}/{name()}", data)


def local_study_dir(storage: str | Path, study: str) -> Path:
    """``<storage>/<study>`` as an absolute local path (``kdsearch train`` writes local files
    only); a bad name, a URI or storage that cannot be written is refused."""
    check_study_name(study)
    if is_uri(storage):
        raise ValueError(f"storage: {storage!r} is a URI; this command writes local paths only")
    check_storage(storage)
    return Path(storage).expanduser().resolve() / study


def existing_study(storage: str, study: str | None) -> str:
    """The location of an existing study (one with a ``study.json``); bad input raises
    ``ValueError`` naming the flag."""
    if not study:
        raise ValueError("--study: required")
    check_study_name(study)
    study_dir = join(storage, study)
    if not exists(join(study_dir, "study.json")):
        raise ValueError(f"study: no study.json in {study_dir}")
    return study_dir
