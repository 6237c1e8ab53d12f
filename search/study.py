"""``StudyConfig``: everything a study needs, its presets, config files and ``study.json``.

Resolution order: preset -> config file (TOML or YAML) -> command-line flags. Every bad
value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcore.config import GROUP_TERMS, GROUPS, MASKED_TERMS, TERMS, TrialConfig
from kdcore.models import ARCHITECTURES
from kdcore.teacher import TeacherConfig

from . import fsutil
from .fsutil import check_study_name

PARAMS = ("T", "w_ce", "w_kl", "w_at", "w_fa", "mask_pct")
TEACHER_FIELDS = ("arch", "width", "cbam", "epochs", "batch_size", "lr", "lr_schedule",
                  "patience", "seed")


@dataclass(frozen=True)
class ParamRange:
    """A search range: uniform or log-uniform in [low, high], optionally on a ``step`` grid."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d


DEFAULT_SPACE: dict[str, ParamRange] = {
    "T": ParamRange(1.0, 16.0, log=True),
    "w_ce": ParamRange(0.1, 1.0),
    "w_kl": ParamRange(0.1, 2.0),  # KL already carries T^2
    # 10-5000 holds 3000, the attention-transfer codes' beta = 1000 per stage summed over
    # three stages (kdcore averages over its stages; kdcore.config.DEFAULT_WEIGHTS).
    "w_at": ParamRange(10.0, 5000.0, log=True),
    # 0.3-10: in the laptop study w_fa below 0.3 gave FA under 2% of the student's gradient
    # (effectively kd), above 10 over half of it (docs/RESULTS.md, "Search ranges").
    "w_fa": ParamRange(0.3, 10.0, log=True),
    "mask_pct": ParamRange(0.0, 90.0, step=10.0),
}


def group_params(group: str) -> tuple[str, ...]:
    """The parameters a group tunes: T and its weights (with KL), plus mask_pct when masked."""
    terms = GROUP_TERMS[group]
    if group == "baseline":
        return ()  # nothing to tune: its seeds run at the paper's settings
    params = ["T"] if "kl" in terms else []
    params += [f"w_{t}" for t in TERMS if t in terms]
    if any(t in MASKED_TERMS for t in terms):
        params.append("mask_pct")
    return tuple(params)


@dataclass(frozen=True)
class StudyConfig:
    """One study: data, storage, groups, search budget, ASHA, models, optimizer, space, resources.

    ``seed`` seeds the TPE sampler and is the training seed of every search trial (so all
    trials of all groups see the same batches); ``seeds`` is how many seeds ``reproduce``
    trains per group (``reproduce_seeds()``, disjoint from ``seed``).
    """

    study: str = "default"
    data: str = "cifar10"
    storage: str = "./kdsearch-results"
    groups: tuple[str, ...] = GROUPS
    samples: int = 32
    max_epochs: int = 30
    grace_period: int = 5
    reduction_factor: float = 2.0
    student: str = "resnet18"
    student_width: float = 1.0
    student_cbam: bool = False
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stem: str = "cifar"
    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    patience: int = 5
    mask_target: str = "label"
    precision: str = "auto"
    val_size: int = 5000
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0
    space: dict[str, ParamRange] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None  # trials running at once; None: every slot
    device: str = "cpu"
    seeds: int = 5

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "groups", tuple(self.groups))
        set_(self, "stages", tuple(self.stages))
        # The teacher shares the study's stem and trains on the study's device and precision.
        set_(self, "teacher", dataclasses.replace(self.teacher, stem=self.stem, device=self.device,
                                                  precision=self.precision))
        _validate(self)

    # -- building trials ---------------------------------------------------------------------

    def trial_config(self, group: str, params: dict[str, float], seed: int) -> TrialConfig:
        """The ``TrialConfig`` of one trial: the group's preset, this study's settings, params."""
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a search parameter {list(PARAMS)}")
        return TrialConfig.for_group(
            group, student=self.student, student_width=self.student_width,
            student_cbam=self.student_cbam, teacher=self.teacher.arch,
            teacher_width=self.teacher.width, teacher_cbam=self.teacher.cbam, stem=self.stem,
            stages=self.stages, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
            epochs=self.max_epochs, batch_size=self.batch_size, patience=self.patience,
            mask_target=self.mask_target, seed=seed, device=self.device,
            precision=self.precision, **{k: float(v) for k, v in params.items()},
        )

    def group_space(self, group: str) -> dict[str, ParamRange]:
        return {p: self.space[p] for p in group_params(group)}

    def reproduce_seeds(self) -> tuple[int, ...]:
        """Seeds for ``reproduce``: ``seed + 1 ... seed + seeds`` (never the search seed)."""
        return tuple(self.seed + 1 + i for i in range(self.seeds))

    def load_data(self):
        """This study's dataset (validation split and per-class subsets applied)."""
        from kdcore.data import load_data

        return load_data(self.data, val_size=self.val_size, train_per_class=self.train_per_class,
                         test_per_class=self.test_per_class)

    # -- locations ---------------------------------------------------------------------------

    @property
    def study_dir(self) -> str:
        """``<storage>/<study>``: an absolute local path or a URI."""
        return fsutil.join(self.storage, self.study)

    @property
    def teacher_cache(self) -> Path:
        """``<storage>/teachers`` as a local folder (for URI storage, a local cache under
        ~/.cache/kdsearch). A study's own teacher lives at ``teacher_task.teacher_path``, which
        is this folder for local storage and ``<storage>/teachers`` on the URI otherwise."""
        if fsutil.is_uri(self.storage):
            from kdcore.data import _cache_dir

            return _cache_dir() / "teachers"
        return Path(fsutil.join(self.storage, "teachers"))

    # -- (de)serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["groups"] = list(self.groups)
        d["stages"] = list(self.stages)
        d["teacher"] = {k: getattr(self.teacher, k) for k in TEACHER_FIELDS}
        d["space"] = {p: r.to_dict() for p, r in self.space.items()}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudyConfig:
        """Build from plain values (a file, ``study.json``, overrides); unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - fields
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown study config key")
        d = dict(raw)
        if "teacher" in d:
            d["teacher"] = _teacher_from(d["teacher"])
        if "space" in d:
            d["space"] = _space_from(d["space"])
        if isinstance(d.get("groups"), str):
            d["groups"] = GROUPS if d["groups"] == "all" else (d["groups"],)
        for name in ("groups", "stages"):
            if name in d and not isinstance(d[name], list | tuple):
                raise ValueError(f"{name}: expected a list, got {d[name]!r}")
        for f in dataclasses.fields(cls):
            if f.name in d and f.type in ("float", "float | None") and _is_int(d[f.name]):
                d[f.name] = float(d[f.name])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Validation.


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _teacher_from(raw: object) -> TeacherConfig:
    if isinstance(raw, TeacherConfig):
        return raw
    _check(isinstance(raw, dict), "teacher", f"expected a table of {list(TEACHER_FIELDS)}")
    unknown = set(raw) - set(TEACHER_FIELDS)
    _check(not unknown, f"teacher.{sorted(unknown)[0] if unknown else ''}",
           f"unknown teacher key (expected one of {list(TEACHER_FIELDS)})")
    values = {k: (float(v) if k in ("width", "lr") and _is_int(v) else v) for k, v in raw.items()}
    return TeacherConfig(**values)


def _space_from(raw: object) -> dict[str, ParamRange]:
    _check(isinstance(raw, dict), "space", "expected a table of parameter ranges")
    space = dict(DEFAULT_SPACE)
    for name, spec in raw.items():
        _check(name in PARAMS, f"space.{name}",
               f"unknown parameter (expected one of {list(PARAMS)})")
        if isinstance(spec, ParamRange):
            space[name] = spec
            continue
        _check(isinstance(spec, dict), f"space.{name}", "expected a table with low/high[/log/step]")
        bad = set(spec) - {"low", "high", "log", "step"}
        _check(not bad, f"space.{name}", f"unknown key {sorted(bad)[0] if bad else ''!r}")
        base = space[name].to_dict()
        if "step" not in spec and spec.get("log"):
            base.pop("step", None)
        space[name] = ParamRange(**{**base, **spec})
    return space


def _validate_range(name: str, r: ParamRange) -> None:
    where = f"space.{name}"
    _check(_num(r.low) and _num(r.high) and r.low <= r.high, where,
           f"needs finite low <= high, got low={r.low!r} high={r.high!r}")
    _check(isinstance(r.log, bool), where, "log must be true or false")
    if r.log:
        _check(r.low > 0, where, "a log range needs low > 0")
        _check(r.step is None, where, "a log range cannot have a step")
    if r.step is not None:
        _check(_num(r.step) and r.step > 0, where, f"step must be > 0, got {r.step!r}")
    if name == "T":
        _check(r.low > 0, where, "T must be > 0")
    elif name == "mask_pct":
        _check(r.low >= 0 and r.high < 100, where, "mask_pct must lie in [0, 100)")
    else:
        _check(r.low >= 0, where, "loss weights must be >= 0")


def _validate(c: StudyConfig) -> None:
    check_study_name(c.study)
    _check(isinstance(c.data, str) and c.data != "", "data", "must be a data spec")
    _check(isinstance(c.storage, str) and c.storage != "", "storage", "must be a path or URI")
    _check(len(c.groups) > 0 and all(g in GROUPS for g in c.groups)
           and len(set(c.groups)) == len(c.groups), "groups",
           f"must be distinct names among {list(GROUPS)}, got {list(c.groups)}")
    for name in ("samples", "max_epochs", "grace_period", "seeds", "batch_size"):
        v = getattr(c, name)
        _check(_is_int(v) and v > 0, name, f"must be an integer > 0, got {v!r}")
    _check(c.max_concurrent is None or (_is_int(c.max_concurrent) and c.max_concurrent > 0),
           "max_concurrent", f"must be an integer > 0, got {c.max_concurrent!r}")
    for name in ("val_size", "seed"):
        v = getattr(c, name)
        _check(_is_int(v) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
    for name in ("train_per_class", "test_per_class"):
        v = getattr(c, name)
        _check(v is None or (_is_int(v) and v > 0), name, f"must be an integer > 0, got {v!r}")
    _check(c.grace_period <= c.max_epochs, "grace_period",
           f"must be <= max_epochs ({c.max_epochs}), got {c.grace_period}")
    _check(_num(c.reduction_factor) and c.reduction_factor > 1, "reduction_factor",
           f"must be a number > 1, got {c.reduction_factor!r}")
    _check(_num(c.cpus_per_trial) and c.cpus_per_trial > 0, "cpus_per_trial",
           f"must be a number > 0, got {c.cpus_per_trial!r}")
    _check(_num(c.gpus_per_trial) and c.gpus_per_trial >= 0, "gpus_per_trial",
           f"must be a number >= 0, got {c.gpus_per_trial!r}")
    _check(c.gpus_per_trial <= 1 or float(c.gpus_per_trial).is_integer(), "gpus_per_trial",
           f"fractions must be <= 1 (Ray shares one GPU), got {c.gpus_per_trial}")
    _check(isinstance(c.space, dict) and set(c.space) == set(PARAMS), "space",
           f"needs exactly the parameters {list(PARAMS)}")
    for name, r in c.space.items():
        _validate_range(name, r)
    t = c.teacher
    _check(t.arch in ARCHITECTURES, "teacher.arch", f"unknown architecture {t.arch!r}")
    _check(_num(t.width) and t.width > 0, "teacher.width", f"must be > 0, got {t.width!r}")
    _check(isinstance(t.cbam, bool), "teacher.cbam", f"must be true or false, got {t.cbam!r}")
    for name in ("epochs", "batch_size"):
        v = getattr(t, name)
        _check(_is_int(v) and v > 0, f"teacher.{name}", f"must be an integer > 0, got {v!r}")
    _check(_num(t.lr) and t.lr > 0, "teacher.lr", f"must be > 0, got {t.lr!r}")
    _check(isinstance(c.student_cbam, bool), "student_cbam", "must be true or false")
    # Everything else is checked where it is used: by TrialConfig, at both ends of the space.
    for group in c.groups:
        for end in ("low", "high"):
            c.trial_config(group, {p: getattr(r, end) for p, r in c.group_space(group).items()},
                           c.seed)


# ---------------------------------------------------------------------------------------------
# Presets, config files, overrides.


PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on 2 CPU cores: tiny widths, a class-balanced subset, a few epochs and trials.
    "smoke": {
        "study": "smoke", "samples": 4, "max_epochs": 3, "grace_period": 1,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 0.125,
        "teacher": {"arch": "resnet50", "width": 0.125, "cbam": True, "epochs": 8,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.05, "patience": 0, "val_size": 200,
        "train_per_class": 100, "test_per_class": 50, "cpus_per_trial": 1.0,
        "gpus_per_trial": 0.0, "device": "cpu", "seeds": 2,
    },
    # Real CIFAR-10 on a 2-core CPU (bf16) in at most 90 minutes, whole pipeline; sized by
    # measurement in docs/SEARCH.md ("The laptop preset"). A ResNet-50 teacher without CBAM
    # (CBAM costs 2-4x its forward on CPU) trained 45 epochs vs students trained 8.
    "laptop": {
        "study": "laptop", "samples": 8, "max_epochs": 8, "grace_period": 2,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 0.25,
        "teacher": {"arch": "resnet50", "width": 0.25, "cbam": False, "epochs": 45,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine", "patience": 0,
        "precision": "auto", "val_size": 1000, "train_per_class": 500, "test_per_class": 300,
        "cpus_per_trial": 1.0, "gpus_per_trial": 0.0, "device": "cpu", "seeds": 5,
    },
    # The paper's protocol (DESIGN.md) on full CIFAR-10, for GPUs and clusters.
    "paper": {
        "study": "paper", "samples": 48, "max_epochs": 30, "grace_period": 5,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 1.0,
        "teacher": {"arch": "resnet50", "width": 1.0, "cbam": True, "epochs": 30,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "constant", "patience": 5, "val_size": 5000,
        "cpus_per_trial": 2.0, "gpus_per_trial": 1.0,
        "device": "cuda", "seeds": 5,
    },
}

# Command-line names that differ from StudyConfig's.
ALIASES = {"epochs": "max_epochs", "group": "groups"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A study config file: ``.toml`` (tomllib) or ``.yaml``/``.yml`` (yaml.safe_load)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: no such file {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config: {str(p)!r} must end in .toml, .yaml or .yml")
    except ValueError:
        raise
    except Exception as exc:  # tomllib and yaml raise their own error types
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ValueError(f"config: cannot parse {str(p)!r}: {first}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config: {str(p)!r} must hold a table of settings")
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; the ``teacher`` and ``space`` tables merge key by key."""
    out = dict(base)
    for key, value in top.items():
        key = ALIASES.get(key, key)
        nested = key in ("teacher", "space") and isinstance(out.get(key), dict)
        if nested and isinstance(value, dict):
            merged = dict(out[key])
            for k, v in value.items():
                both = isinstance(v, dict) and isinstance(merged.get(k), dict)
                merged[k] = {**merged[k], **v} if both else v
            out[key] = merged
        else:
            out[key] = value
    return out


ENVIRONMENT = {"data": "KDSEARCH_DATA", "storage": "KDSEARCH_STORAGE"}


def environment_settings(environ: Any = None) -> dict[str, str]:
    """The study settings that environment variables give (``KDSEARCH_DATA``, ``…_STORAGE``)."""
    import os

    environ = os.environ if environ is None else environ
    return {key: environ[var] for key, var in ENVIRONMENT.items() if environ.get(var)}


def given_settings(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the user asked for, merged: preset -> environment -> file -> overrides (``None``
    values ignored), as plain values before any default is filled in.

    That is: a flag beats a config file, which beats an environment variable
    (``environment_settings()``), which beats the preset.
    """
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}, expected one of {list(PRESETS)}")
        raw = _merge(raw, PRESETS[preset])
    raw = _merge(raw, environment or {})
    if config_file is not None:
        raw = _merge(raw, read_config_file(config_file))
    return _merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})


def load_study_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> StudyConfig:
    """``given_settings`` over the defaults, validated."""
    return StudyConfig.from_dict(given_settings(preset, config_file, overrides, environment))


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The study settings given on the command line (``None`` where a flag was not given).

    ``--data`` and ``--storage`` always carry a value; one that was not given on the command
    line (the CLI marks it ``is_default``) is left to the config file, the environment
    (``environment_settings``) and the preset.
    """
    def get(name: str) -> Any:
        value = getattr(args, name, None)
        return None if getattr(value, "is_default", False) else value

    data, storage = get("data"), get("storage")
    return {
        "study": get("study"), "data": data, "storage": storage, "max_epochs": get("epochs"),
        "groups": get("group"), "samples": get("samples"), "seeds": get("seeds"),
        "cpus_per_trial": get("cpus_per_trial"), "gpus_per_trial": get("gpus_per_trial"),
        "max_concurrent": get("max_concurrent"), "device": get("device"),
    }


# ---------------------------------------------------------------------------------------------
# study.json


# Settings of a stored study (``settle``). Runtime fields say where and with what the study
# runs and may change at any time. Growing fields only add work: more trials per group (the
# search continues in another Tune experiment) and more reproduce seeds. ``data`` may be
# spelled anew (a moved folder); the commands refuse other data by its fingerprint
# (``check_same_data``). Every other field would change what was already measured.
RUNTIME_FIELDS = ("storage", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "device")
GROWING_FIELDS = ("samples", "seeds")
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
    raw = {k: v for k, v in doc.items() if k in names}
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
    wanted = StudyConfig.from_dict(_merge(saved.to_dict(), given))
    old, new = saved.to_dict(), wanted.to_dict()
    for key in given:
        if key in RUNTIME_FIELDS or key in RESPELLED_FIELDS or _same(old[key], new[key]):
            continue
        if key in GROWING_FIELDS:
            if new[key] > old[key]:
                continue
            raise ValueError(f"{key}: {new[key]!r} is fewer than the stored study's "
                             f"{old[key]!r} (a stored study only grows; nothing is removed)")
        where, a, b = _first_difference(key, old[key], new[key])
        raise ValueError(f"{where}: {b!r} differs from the stored study's {a!r} "
                         "(it would change what was already measured; use another --study)")
    return wanted


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
