"""Storage helpers for a local path or a pyarrow filesystem URI, with atomic writes."""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_study_name(name: object) -> str:
    """A study name is one path component: letters, digits, ``._-``; no ``..``, no slashes."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"study: {name!r} is not a valid study name (letters, digits, '._-', "
                         "one path component, not starting with '.' or containing '..')")
    return name


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path (made absolute) or a URI such as ``s3://b/x``."""
    text = str(location)
    if is_uri(text):
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ValueError(f"storage: cannot open {text!r}: {exc}") from None
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` keeping a URI a URI and a local path absolute."""
    text = str(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text).expanduser().resolve().joinpath(*parts))


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


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes | None:
    """The file's bytes, or None where it does not exist."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a hidden temporary name next to ``path``, then rename it over ``path``.

    On a local filesystem the rename is atomic; on object stores a single PUT already is.
    """
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_bytes(location: str | Path, data: bytes) -> None:
    fs, path = resolve(location)
    atomic_write(fs, path, data)
