"""Atomic local-file writes: a reader sees the old file or the whole new one, never a part.

``atomic_write(path, write)`` hands ``write`` a binary file object open on a temporary file
next to ``path`` (``.NAME.<random>.tmp``: hidden, and on the same file system, so the final
``os.replace`` is atomic), then renames it over ``path``. ``np.save``, ``np.savez`` and
``torch.save`` all write to such a file object. The temporary is created like any file
``open`` makes (mode 0o666 less the umask), not with ``tempfile.mkstemp``'s 0600, so other
users of a shared cache or study see the file as they would any other. If ``write`` raises,
the temporary is removed and ``path`` is untouched. No fsync: this guards readers against
half-written files, not the file system against a power cut. No torch at import.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(file)`` atomically; creates missing parent folders.

    Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:  # O_EXCL, mode 0o666 & ~umask
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_write``)."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, ...)`` to ``path`` atomically (``atomic_write``)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))
