"""Files on a local path or a pyarrow filesystem URI, with atomic writes.

The one place where kdsearch's tables, reports and study files are opened and written
(``analysis`` reads and writes reports with it; ``search.store`` re-exports it). A write goes
to a hidden temporary name next to its target and is renamed over it, so a reader sees the
old file or the whole new one, never half of one (on object stores a single PUT already is).
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
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


def atomic_write(fs: pafs.FileSystem, path: str | Callable[[], str], data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (module docstring); returns the path written.

    ``path`` may be a function of no arguments, called just before the file becomes visible
    (``search.store.sink`` names a part by the time it appears).
    """
    final = path if callable(path) else (lambda: path)
    folder = posixpath.dirname(final())
    fs.create_dir(folder, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        target = final()
        with fs.open_output_stream(target) as out:
            out.write(data)
        return target
    tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        target = final()
        fs.move(tmp, target)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
    return target


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write ``data`` atomically to a local path or a URI; returns the path written."""
    fs, path = resolve(location)
    return atomic_write(fs, path, data)


def write_text(location: str | Path, text: str) -> str:
    """Write UTF-8 ``text`` atomically."""
    return write_bytes(location, text.encode("utf-8"))
