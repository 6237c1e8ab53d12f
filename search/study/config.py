"""``StudyConfig``: everything a study needs, one frozen dataclass, validated on creation.

Every bad value raises ``ValueError`` naming the field. Presets (``presets``), config files
and flags (``loading``) and ``study.json`` (``stored``) live beside it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcore.config import (
    GROUPS,
    TEACHERS,
    TeacherConfig,
    TrialConfig,
    check,
    check_model,
    is_int,
    is_number,
)
from search.store import files as fsutil
from search.store.files import check_study_name

from .space import (
    DEFAULT_SPACE,
    PARAMS,
    ParamRange,
    group_space,
    space_from,
    space_to_dict,
    typed,
    validate_space,
)

TEACHER_FIELDS = ("arch", "width", "cbam", "epochs", "batch_size", "lr", "lr_schedule",
                  "patience", "seed", "checkpoint", "stages")

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")
"""Optuna samplers a study may use (``search.engine.algorithms.make_sampler``)."""
SCHEDULERS = ("asha", "hyperband", "median", "none")
"""Trial schedulers a study may use (``search.engine.algorithms.make_scheduler``)."""


def default_n_startup(samples: int) -> int:
    """Random startup trials per group when ``n_startup`` is not set: a quarter of the
    group's trials, at least 2 and at most Optuna's default of 10 (so 12 trials get 3)."""
    return min(10, max(2, int(samples) // 4))


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float | None:
    """Seconds of a duration: a number (seconds) or a string such as ``2h``, ``90m``,
    ``45s``, ``1h30m``; None stays None. ``ValueError`` naming ``time_budget`` otherwise."""
    if value is None or (is_number(value) and not isinstance(value, str)):
        return None if value is None else float(value)
    text = str(value).strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"time_budget: expected seconds or a duration like 2h, 90m, 45s, "
                         f"got {value!r}")
    return sum(float(n) * _UNIT[u] for n, u in parts)


@dataclass(frozen=True)
class StudyConfig:
    """One study: data, storage, groups, search budget, sampler and trial scheduler, models,
    optimizer, space, resources.

    ``seed`` seeds the sampler and is the training seed of every search trial (so all
    trials of all groups see the same batches); ``seeds`` is how many seeds ``reproduce``
    trains per group (``reproduce_seeds()``, disjoint from ``seed``). ``n_startup`` left
    unset is fixed at ``default_n_startup(samples)`` when the config is made, so the number
    a study ran with is the one ``study.json`` records. ``time_budget`` accepts seconds or a
    duration string (``parse_duration``) and holds seconds.
    """

    study: str = "default"
    data: str = "cifar10"
    storage: str = "./kdsearch-results"
    groups: tuple[str, ...] = GROUPS
    samples: int = 32
    max_epochs: int = 30
    grace_period: int = 5
    reduction_factor: float = 2.0
    sampler: str = "tpe"  # SAMPLERS
    n_startup: int | None = None  # random startup trials per group; None: default_n_startup
    scheduler: str = "asha"  # SCHEDULERS (--trial-scheduler)
    time_budget: float | None = None  # seconds of search; no trial starts after it
    warm_start: str | None = None  # an earlier study whose best configurations start this one
    warm_start_storage: str | None = None  # where that study lives; None: this storage
    student: str = "resnet18"
    student_width: float = 1.0
    student_cbam: bool = False
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stem: str = "cifar"
    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    student_stages: tuple[str, ...] = ()
    image_size: int | None = None  # resize every image once at load to N x N
    mean: tuple[float, ...] | None = None  # normalisation; None: the training split's
    std: tuple[float, ...] | None = None
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
    # shared ranges by parameter, and {group: {parameter: range}} for one group's own
    space: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None  # trials running at once; None: every slot
    device: str = "cpu"
    seeds: int = 5

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "groups", tuple(self.groups))
        for name in ("stages", "student_stages"):
            set_(self, name, tuple(self.stages if name == "stages" else self.student_stages))
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), list):
                set_(self, name, tuple(getattr(self, name)))
        # The teacher shares the study's stem and trains on the study's device and precision.
        set_(self, "teacher", dataclasses.replace(self.teacher, stem=self.stem, device=self.device,
                                                  precision=self.precision))
        set_(self, "time_budget", parse_duration(self.time_budget))
        if self.n_startup is None and is_int(self.samples):  # fixed when the study starts
            set_(self, "n_startup", default_n_startup(self.samples))
        _validate(self)

    # -- building trials ---------------------------------------------------------------------

    def trial_config(self, group: str, params: dict[str, Any], seed: int) -> TrialConfig:
        """The ``TrialConfig`` of one trial: the group's preset, this study's settings, and
        ``params`` (searched values, which beat the study's settings)."""
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a search parameter {list(PARAMS)}")
        settings = dict(
            student=self.student, student_width=self.student_width,
            student_cbam=self.student_cbam, teacher=self.teacher.arch,
            teacher_width=self.teacher.width, teacher_cbam=self.teacher.cbam, stem=self.stem,
            stages=self.stages, student_stages=self.student_stages,
            teacher_stages=self.teacher.stages, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
            epochs=self.max_epochs, batch_size=self.batch_size, patience=self.patience,
            mask_target=self.mask_target, seed=seed, device=self.device,
            precision=self.precision)
        settings.update({k: typed(k, v) for k, v in params.items()})
        return TrialConfig.for_group(group, **settings)

    def group_space(self, group: str) -> dict[str, ParamRange]:
        """The ranges ``group`` searches (``space.group_space``)."""
        return group_space(self.space, group)

    def reproduce_seeds(self) -> tuple[int, ...]:
        """Seeds for ``reproduce``: ``seed + 1 ... seed + seeds`` (never the search seed)."""
        return tuple(self.seed + 1 + i for i in range(self.seeds))

    def load_data(self):
        """This study's dataset (validation split and per-class subsets applied)."""
        from kdcore.data import load_data

        return load_data(self.data, val_size=self.val_size, train_per_class=self.train_per_class,
                         test_per_class=self.test_per_class, image_size=self.image_size,
                         mean=self.mean, std=self.std)

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

            return _cache_dir() / TEACHERS
        return Path(fsutil.join(self.storage, TEACHERS))

    # -- (de)serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["groups"] = list(self.groups)
        for name in ("stages", "student_stages", "mean", "std"):
            d[name] = None if d[name] is None else list(d[name])
        d["teacher"] = {k: getattr(self.teacher, k) for k in TEACHER_FIELDS}
        d["teacher"]["stages"] = list(self.teacher.stages)
        d["space"] = space_to_dict(self.space)
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
            d["space"] = space_from(d["space"])
        if isinstance(d.get("groups"), str):
            d["groups"] = GROUPS if d["groups"] == "all" else (d["groups"],)
        for name in ("groups", "stages", "student_stages"):
            if name in d and not isinstance(d[name], list | tuple):
                raise ValueError(f"{name}: expected a list, got {d[name]!r}")
        for f in dataclasses.fields(cls):
            if f.name in d and f.type in ("float", "float | None") and is_int(d[f.name]):
                d[f.name] = float(d[f.name])
        return cls(**d)


def _teacher_from(raw: object) -> TeacherConfig:
    if isinstance(raw, TeacherConfig):
        return raw
    check(isinstance(raw, dict), "teacher", f"expected a table of {list(TEACHER_FIELDS)}")
    unknown = set(raw) - set(TEACHER_FIELDS)
    check(not unknown, f"teacher.{sorted(unknown)[0] if unknown else ''}",
           f"unknown teacher key (expected one of {list(TEACHER_FIELDS)})")
    values = {k: (float(v) if k in ("width", "lr") and is_int(v) else v) for k, v in raw.items()}
    check(not isinstance(values.get("stages", ()), str), "teacher.stages",
          f"expected a list, got {values.get('stages')!r}")
    return TeacherConfig(**values)


def _validate(c: StudyConfig) -> None:
    check_study_name(c.study)
    check(isinstance(c.data, str) and c.data != "", "data", "must be a data spec")
    check(isinstance(c.storage, str) and c.storage != "", "storage", "must be a path or URI")
    check(len(c.groups) > 0 and all(g in GROUPS for g in c.groups)
           and len(set(c.groups)) == len(c.groups), "groups",
           f"must be distinct names among {list(GROUPS)}, got {list(c.groups)}")
    for name in ("samples", "max_epochs", "grace_period", "seeds", "batch_size"):
        v = getattr(c, name)
        check(is_int(v) and v > 0, name, f"must be an integer > 0, got {v!r}")
    check(c.max_concurrent is None or (is_int(c.max_concurrent) and c.max_concurrent > 0),
           "max_concurrent", f"must be an integer > 0, got {c.max_concurrent!r}")
    for name in ("val_size", "seed"):
        v = getattr(c, name)
        check(is_int(v) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
    for name in ("train_per_class", "test_per_class"):
        v = getattr(c, name)
        check(v is None or (is_int(v) and v > 0), name, f"must be an integer > 0, got {v!r}")
    check(c.grace_period <= c.max_epochs, "grace_period",
           f"must be <= max_epochs ({c.max_epochs}), got {c.grace_period}")
    check(is_number(c.reduction_factor) and c.reduction_factor > 1, "reduction_factor",
           f"must be a number > 1, got {c.reduction_factor!r}")
    check(c.sampler in SAMPLERS, "sampler", f"must be one of {list(SAMPLERS)}, got {c.sampler!r}")
    check(is_int(c.n_startup) and c.n_startup > 0, "n_startup",
          f"must be an integer > 0, got {c.n_startup!r}")
    check(c.scheduler in SCHEDULERS, "scheduler",
          f"must be one of {list(SCHEDULERS)}, got {c.scheduler!r}")
    check(c.time_budget is None or c.time_budget > 0, "time_budget",
          f"must be > 0 seconds, got {c.time_budget!r}")
    if c.warm_start is not None:
        try:
            check_study_name(c.warm_start)
        except ValueError as exc:  # the same rule, named by this field
            raise ValueError(f"warm_start{str(exc).removeprefix('study')}") from None
        check(c.warm_start != c.study or c.warm_start_storage not in (None, c.storage),
              "warm_start", f"a study cannot start from itself ({c.warm_start!r})")
    check(c.warm_start_storage is None or (c.warm_start is not None and isinstance(
        c.warm_start_storage, str) and c.warm_start_storage != ""), "warm_start_storage",
          "must be a path or URI, and needs warm_start")
    check(is_number(c.cpus_per_trial) and c.cpus_per_trial > 0, "cpus_per_trial",
           f"must be a number > 0, got {c.cpus_per_trial!r}")
    check(is_number(c.gpus_per_trial) and c.gpus_per_trial >= 0, "gpus_per_trial",
           f"must be a number >= 0, got {c.gpus_per_trial!r}")
    check(c.gpus_per_trial <= 1 or float(c.gpus_per_trial).is_integer(), "gpus_per_trial",
           f"fractions must be <= 1 (Ray shares one GPU), got {c.gpus_per_trial}")
    validate_space(c.space)
    t = c.teacher
    check_model("teacher.arch", t.arch, t.width, t.cbam)
    check_model("student", c.student, c.student_width, c.student_cbam)
    check(t.checkpoint is None or (isinstance(t.checkpoint, str) and t.checkpoint != ""),
          "teacher.checkpoint", f"must be a path or URI, got {t.checkpoint!r}")
    check(c.image_size is None or (is_int(c.image_size) and c.image_size >= 8), "image_size",
          f"must be an integer >= 8, got {c.image_size!r}")
    check((c.mean is None) == (c.std is None), "mean", "mean and std go together: set both")
    for name in ("mean", "std"):
        v = getattr(c, name)
        check(v is None or (len(v) == 3 and all(is_number(x) for x in v)), name,
              f"must be 3 numbers (one per channel, images scaled to [0, 1]), got {v!r}")
    check(c.std is None or all(x > 0 for x in c.std), "std", f"must be > 0, got {c.std!r}")
    for name in ("epochs", "batch_size"):
        v = getattr(t, name)
        check(is_int(v) and v > 0, f"teacher.{name}", f"must be an integer > 0, got {v!r}")
    check(is_number(t.lr) and t.lr > 0, "teacher.lr", f"must be > 0, got {t.lr!r}")
    # Everything else is checked where it is used: by TrialConfig, at both ends of the space.
    for group in c.groups:
        c.trial_config(group, {}, c.seed)  # the study's own settings, unprefixed
        for end in (0, 1):
            try:
                c.trial_config(group, {p: r.ends()[end] for p, r in c.group_space(group).items()},
                               c.seed)
            except ValueError as exc:
                raise ValueError(f"space of {group!r} at its {('low', 'high')[end]} end: {exc}"
                                 ) from None
