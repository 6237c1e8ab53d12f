"""The user's model code on every Ray worker: ``MODULE:CALLABLE`` specs through ``py_modules``.

A student or teacher spec ``MODULE:CALLABLE`` needs MODULE importable wherever a trial runs.
On the driver it is found as Python finds it (``importlib.util.find_spec``); Ray's job-level
``runtime_env`` then ships its top-level package (a folder) or file to every node
(``py_modules``), so a cluster's workers import it without the user copying files. Code that
is installed (site-packages) or part of kdsearch travels as it is: it is not shipped.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

from kdcore.names import model_kind
from search.study import StudyConfig

_OWN = ("kdcore", "search", "analysis")


def model_specs(config: StudyConfig) -> tuple[str, ...]:
    return (config.student, config.teacher.arch)


def module_path(module: str) -> Path | None:
    """The file or folder to ship for ``module`` (its top-level package), or None when it is
    installed or kdsearch's own; ``ValueError`` when it is not importable here."""
    top = module.partition(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin in (None, "built-in", "frozen") and not (
            found.submodule_search_locations):
        raise ValueError(f"{module}: cannot find module {top!r} here (put its folder on "
                         "PYTHONPATH, or install it)")
    if top in _OWN:
        return None
    locations = list(found.submodule_search_locations or [])
    path = Path(locations[0] if locations else found.origin).resolve()
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib",
                                                                      "stdlib")}
    if any(path.is_relative_to(root) for root in installed):
        return None
    return path


def runtime_env(config: StudyConfig) -> dict | None:
    """Ray's job ``runtime_env`` shipping the study's own model code, or None if it has none."""
    paths = []
    for spec in model_specs(config):
        if model_kind(spec) == "module":
            path = module_path(spec.partition(":")[0])
            if path is not None and str(path) not in paths:
                paths.append(str(path))
    return {"py_modules": paths} if paths else None
