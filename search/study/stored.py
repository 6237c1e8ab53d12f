"""A stored study: its ``study.json``, and what a later command may change in it (``settle``).

Settings of a stored study (docs/SEARCH.md, "Settings of a stored study"): runtime fields say
where and with what the study runs and may change at any time; growing fields only add work
(more trials per group: the search continues in another Tune experiment; more reproduce
seeds; a longer time budget); ``data`` may be spelled anew (a moved folder), and the
commands refuse other data by its fingerprint (``check_same_data``). Every other field would
change what was already measured and is refused in one line naming the field and both
values.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from search.store import files as fsutil
from search.store.files import check_study_name

from .config import StudyConfig
from .loading import ALIASES, environment_settings, given_settings, merge, overrides_from_args

RUNTIME_FIELDS = ("storage", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "device",
                  "warm_start_storage")


GROWING_FIELDS = ("samples", "seeds", "time_budget")  # time_budget: None is unlimited

STORED_BEFORE = {"sampler": "tpe", "n_startup": 10, "scheduler": "asha"}
"""What a ``study.json`` written before these settings existed ran with (Optuna's TPE with its
default of 10 random startup trials, ASHA)."""


RESPELLED_FIELDS = ("study", "data")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("kdsearch", "torch", "ray", "optuna", "pyarrow", "pandas", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def study_json_path(config: StudyConfig) -> str:
    return fsutil.join(config.study_dir, "study.json")


def write_study_json(config: StudyConfig, **extra: Any) -> dict[str, Any]:
    """Write ``<storage>/<study>/study.json`` atomically: the resolved config, versions, extras
    (e.g. ``data_fingerprint``, ``teacher_hash``). Returns what was written."""
    doc = {**config.to_dict(), "versions": package_versions(), "written_at": time.time(), **extra}
    fsutil.write_bytes(study_json_path(config), json.dumps(doc, indent=2, default=str).encode())
    return doc


def read_study_json(storage: str, study: str) -> dict[str, Any] | None:
    """The stored ``study.json`` of ``<storage>/<study>`` or None where there is none."""
    from analysis.tables import read_config

    check_study_name(study)
    fs, path = fsutil.resolve(fsutil.join(storage, study, "study.json"))
    return read_config(fs, path) or None


def config_from_study_json(doc: dict[str, Any], overrides: dict[str, Any] | None = None,
                           ) -> StudyConfig:
    """The stored config with runtime-only fields (storage, resources, device) overridden."""
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    raw = {**STORED_BEFORE, **{k: v for k, v in doc.items() if k in names}}
    runtime = {k: v for k, v in (overrides or {}).items() if k in RUNTIME_FIELDS and v is not None}
    return StudyConfig.from_dict({**raw, **runtime})


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def settle(stored: dict[str, Any], given: dict[str, Any]) -> StudyConfig:
    """The config of a stored study (its ``study.json``) after the settings ``given`` now.

    ``given`` holds only what the user gave (``given_settings``; a whole ``to_dict()`` is
    fine too). Runtime fields take the given value, growing fields the given value when it is
    not smaller, ``data`` the given spelling; any other given value that differs from the
    stored one is refused: ``ValueError`` naming the field and both values.
    """
    saved = config_from_study_json(stored)
    given = {ALIASES.get(k, k): v for k, v in given.items()}
    if given.get("groups") == "all":
        given["groups"] = list(saved.groups)  # "all" on a stored study: the study's groups
    wanted = StudyConfig.from_dict(merge(saved.to_dict(), given))
    old, new = saved.to_dict(), wanted.to_dict()
    for key in given:
        if key in RUNTIME_FIELDS or key in RESPELLED_FIELDS or _same(old[key], new[key]):
            continue
        if key in GROWING_FIELDS:
            if _grows(old[key], new[key]):
                continue
            less = "less" if key == "time_budget" else "fewer"
            raise ValueError(f"{key}: {_limit(new[key])} is {less} than the stored study's "
                             f"{_limit(old[key])} (a stored study only grows; nothing is removed)")
        where, a, b = _first_difference(key, old[key], new[key])
        raise ValueError(f"{where}: {b!r} differs from the stored study's {a!r} "
                         "(it would change what was already measured; use another --study)")
    return wanted


def _grows(old: Any, new: Any) -> bool:
    """Whether a growing field goes up; None is unlimited (a time budget removed)."""
    return old is not None and (new is None or new > old)


def _limit(value: Any) -> str:
    return "no limit" if value is None else repr(value)


def _first_difference(where: str, a: Any, b: Any) -> tuple[str, Any, Any]:
    """(dotted name, stored value, new value) of the first leaf where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if not _same(a.get(key), b.get(key)):
                return _first_difference(f"{where}.{key}", a.get(key), b.get(key))
    return where, a, b


def check_same_data(stored: dict[str, Any] | None, fingerprint: str, spec: str) -> None:
    """Refuse data other than the stored study's (by the fingerprint ``study.json`` holds)."""
    if stored and stored.get("data_fingerprint") not in (None, fingerprint):
        raise ValueError(f"data: {spec!r} is not the dataset the study started with "
                         f"(fingerprint {fingerprint} != {stored['data_fingerprint']})")


def record_settings(config: StudyConfig, stored: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``study.json`` with ``config`` (settings that ``settle`` let change), keeping
    what else the stored one records (data fingerprint, teacher hash)."""
    names = {f.name for f in dataclasses.fields(StudyConfig)} | {"versions", "written_at"}
    return write_study_json(config, **{k: v for k, v in stored.items() if k not in names})


def resolve_study(args: Any, ignore: tuple[str, ...] = ()) -> tuple[StudyConfig, dict | None]:
    """(config, stored ``study.json`` or None) of a study command's arguments.

    A stored study is ``settle``-d with what the command line, config file, preset and
    environment give; otherwise the given settings make a new config. ``ignore`` names
    overrides that are not study settings for this command (``reproduce --group`` filters).
    """
    overrides = {k: v for k, v in overrides_from_args(args).items() if k not in ignore}
    given = given_settings(getattr(args, "preset", None), getattr(args, "config", None),
                           overrides, environment_settings())
    storage = given.get("storage", StudyConfig.storage)
    study = given.get("study", StudyConfig.study)
    fsutil.check_storage(storage)
    stored = read_study_json(storage, check_study_name(study))
    if stored is None:
        return StudyConfig.from_dict(given), None
    return settle(stored, given), stored


def record_if_changed(config: StudyConfig, stored: dict[str, Any]) -> None:
    """Record in ``study.json`` the settings that changed on a stored study (e.g. seeds)."""
    before = config_from_study_json(stored).to_dict()
    after = config.to_dict()
    if {k: v for k, v in before.items() if k != "storage"} != {
            k: v for k, v in after.items() if k != "storage"}:
        record_settings(config, stored)
