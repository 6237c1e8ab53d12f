"""Where a study lives: ``<storage>/<study>/`` on the local filesystem.

(Re-created by the search package after an accidental overwrite: ``study_dir`` is what
``search.core_commands`` imports. URIs are handled by ``search.fsutil``.)
"""

from __future__ import annotations

from pathlib import Path


def study_dir(storage: str | Path, study: str) -> Path:
    """``<storage>/<study>`` as an absolute local path; a name that escapes storage is refused."""
    from .study import check_study_name

    check_study_name(study)
    if "://" in str(storage):
        raise ValueError(f"storage: {storage!r} is a URI; this command writes local paths only")
    from .fsutil import check_storage

    check_storage(storage)
    return Path(storage).expanduser().resolve() / study
