"""``TrialConfig``: everything one distillation trial needs, validated and frozen."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .names import (
    GROUP_TERMS,
    GROUPS,
    MASK_TARGETS,
    MASKED_TERMS,
    PRECISIONS,
    STAGES,
    STEMS,
    TERMS,
    model_kind,
)

if TYPE_CHECKING:
    from .data import Dataset

TEACHERS = "teachers"  # the folder of cached teachers, under a study's storage


def teacher_file(digest: str) -> str:
    """The file name of the cached teacher with content hash ``digest``."""
    return f"teacher-{digest}.pt"

# The names live in ``kdcore.names`` (no torch); GROUPS, TERMS, GROUP_TERMS and MASKED_TERMS
# are still imported from here by ``search`` and the tests.

# Default weights of a group's terms before any tuning. AT: the attention-transfer codes
# (Zagoruyko & Komodakis' cifar.py `--beta 1e3`, RepDistiller `-b 1000`, mdistiller
# FEAT_WEIGHT 1000) apply beta = 1000 to each stage's loss (a mean of squared differences of
# normalized maps, as here) and sum over the stages; kdcore averages over its 3 stages, so
# their setting is w_at = 3 x 1000 = 3000 here. (The paper's equation writes beta/2; the
# code applies beta.)
DEFAULT_WEIGHTS = {"ce": 1.0, "kl": 1.0, "at": 3000.0, "fa": 1.0}


@dataclass(frozen=True)
class TrialConfig:
    """One trial: group, models, loss weights, mask, optimizer, schedule, seed and device.

    Build one with ``TrialConfig.for_group("kd", T=4.0, ...)``; any invalid value raises
    ``ValueError`` naming the field.
    """

    group: str = "baseline"
    student: str = "resnet18"  # a model spec (``kdcore.zoo``)
    student_width: float = 1.0
    student_cbam: bool = False
    teacher: str = "resnet50"
    teacher_width: float = 1.0
    teacher_cbam: bool | None = None  # None: True for a built-in ResNet, else False
    stem: str = "cifar"
    T: float = 4.0
    w_ce: float = 1.0
    w_kl: float = 0.0
    w_at: float = 0.0
    w_fa: float = 0.0
    mask_pct: float = 0.0
    mask_target: str = "label"
    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")  # of a built-in model
    # The distilled features of each side, paired in order (``kdcore.features``); empty: a
    # built-in model's ``stages``, another model's automatic choice.
    student_stages: tuple[str, ...] = ()
    teacher_stages: tuple[str, ...] = ()
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    epochs: int = 30
    batch_size: int = 64
    patience: int = 5
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    compile: bool = False
    eval_batch_size: int = 512

    @classmethod
    def for_group(cls, group: str, **overrides) -> TrialConfig:
        """The group's preset (its terms at default weights, 50% masks if masked) plus overrides."""
        if group not in GROUP_TERMS:
            raise ValueError(f"group: unknown {group!r}, expected one of {list(GROUPS)}")
        preset = {f"w_{t}": (DEFAULT_WEIGHTS[t] if t in GROUP_TERMS[group] else 0.0) for t in TERMS}
        if any(t in GROUP_TERMS[group] for t in MASKED_TERMS):
            preset["mask_pct"] = 50.0
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown TrialConfig field")
        return cls(group=group, **{**preset, **overrides})

    def __post_init__(self) -> None:
        for name in ("stages", "student_stages", "teacher_stages"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.teacher_cbam is None:
            object.__setattr__(self, "teacher_cbam", default_cbam(self.teacher))
        _validate(self)

    def weight(self, term: str) -> float:
        return getattr(self, f"w_{term}")

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Terms with a non-zero weight, in canonical order."""
        return tuple(t for t in TERMS if self.weight(t) > 0)

    @property
    def needs_teacher(self) -> bool:
        return any(t != "ce" for t in self.active_terms)

    @property
    def needs_masks(self) -> bool:
        return self.mask_pct > 0 and any(t in MASKED_TERMS for t in self.active_terms)

    def given_stages(self, side: str) -> tuple[str, ...]:
        """The stages set for ``side`` (student or teacher): its own list, else a built-in
        model's ``stages``, else () for the automatic choice (``kdcore.features``)."""
        own = getattr(self, f"{side}_stages")
        return own or (self.stages if is_builtin(getattr(self, side)) else ())

    def auto_count(self, side: str) -> int:
        """How many stages to choose automatically for ``side``: as many as the other has."""
        other = self.given_stages("teacher" if side == "student" else "student")
        return len(other) or len(self.stages)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("stages", "student_stages", "teacher_stages"):
            d[name] = list(d[name])
        return d


def check(ok: bool, name: str, message: str) -> None:
    """Raise ``ValueError("<name>: <message>")`` unless ``ok`` (every config's validation)."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def is_number(x: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: object) -> bool:
    """An int (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)


_check, _finite = check, is_number


def is_builtin(spec: str) -> bool:
    """Whether a well-formed model spec names one of kdcore's own ResNets."""
    return model_kind(spec) == "builtin"


def default_cbam(spec: str) -> bool:
    """A teacher's CBAM when unset: the paper's teacher (a built-in ResNet) has it."""
    try:
        return is_builtin(spec)
    except ValueError:
        return False  # refused by the validation with the field's name


def check_model(name: str, spec: object, width: object, cbam: object) -> None:
    """A model spec, and width/CBAM only on a built-in ResNet (``name``: the spec's field)."""
    try:
        kind = model_kind(spec)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    prefix = name[: -len("arch")] if name.endswith(".arch") else f"{name}_"
    _check(_finite(width) and width > 0, f"{prefix}width",
           f"must be a finite number > 0, got {width!r}")
    _check(isinstance(cbam, bool), f"{prefix}cbam", f"must be true or false, got {cbam!r}")
    if kind != "builtin":
        _check(width == 1.0, f"{prefix}width",
               f"only the built-in ResNets take a width; {spec} is built as it is (got {width})")
        _check(not cbam, f"{prefix}cbam",
               f"only the built-in ResNets take CBAM; {spec} is built as it is")


def check_stage_lists(c: TrialConfig) -> None:
    """``stages`` of the built-in ResNets; per-side lists of distinct names, paired in order."""
    _check(
        len(c.stages) > 0
        and all(s in STAGES for s in c.stages)
        and len(set(c.stages)) == len(c.stages),
        "stages",
        f"must be distinct names among {list(STAGES)}, got {list(c.stages)}",
    )
    sides = {"student_stages": c.student, "teacher_stages": c.teacher}
    for name, spec in sides.items():
        given = getattr(c, name)
        _check(all(isinstance(s, str) and s for s in given) and len(set(given)) == len(given),
               name, f"must be distinct node names, got {list(given)}")
        if given and is_builtin(spec):
            _check(all(s in STAGES for s in given), name,
                   f"{spec} returns the features of {list(STAGES)}, got {list(given)}")
    lengths = [len(c.given_stages("student")), len(c.given_stages("teacher"))]
    _check(0 in lengths or lengths[0] == lengths[1], "student_stages",
           f"{lengths[0]} student stages and {lengths[1]} teacher stages: they are paired "
           "in order, so the lists need equal lengths")


def _validate(c: TrialConfig) -> None:
    _check(c.group in GROUP_TERMS, "group", f"unknown {c.group!r}, expected one of {list(GROUPS)}")
    for name in ("student", "teacher"):
        check_model(name, getattr(c, name), getattr(c, f"{name}_width"),
                    getattr(c, f"{name}_cbam"))
    _check(
        c.stem in STEMS, "stem", f"expected 'cifar' or 'imagenet', got {c.stem!r}"
    )
    _check(_finite(c.T) and c.T > 0, "T", f"must be a finite number > 0, got {c.T!r}")
    for term in TERMS:
        w = c.weight(term)
        _check(_finite(w) and w >= 0, f"w_{term}", f"must be a finite number >= 0, got {w!r}")
        if term not in GROUP_TERMS[c.group]:
            _check(w == 0, f"w_{term}", f"group {c.group!r} does not use the {term} term, got {w}")
    _check(bool(c.active_terms), "w_ce", "at least one loss weight must be > 0")
    _check(
        _finite(c.mask_pct) and 0 <= c.mask_pct < 100,
        "mask_pct",
        f"must be in [0, 100), got {c.mask_pct!r}",
    )
    _check(
        c.mask_target in MASK_TARGETS,
        "mask_target",
        f"expected 'label' or 'prediction', got {c.mask_target!r}",
    )
    check_stage_lists(c)
    _check(_finite(c.lr) and c.lr > 0, "lr", f"must be a finite number > 0, got {c.lr!r}")
    _check(
        _finite(c.momentum) and 0 <= c.momentum < 1,
        "momentum",
        f"must be in [0, 1), got {c.momentum!r}",
    )
    _check(
        _finite(c.weight_decay) and c.weight_decay >= 0,
        "weight_decay",
        f"must be a finite number >= 0, got {c.weight_decay!r}",
    )
    _check(
        c.lr_schedule in ("constant", "cosine"),
        "lr_schedule",
        f"expected 'constant' or 'cosine', got {c.lr_schedule!r}",
    )
    for name in ("epochs", "batch_size", "eval_batch_size"):
        v = getattr(c, name)
        _check(
            isinstance(v, int) and not isinstance(v, bool) and v > 0,
            name,
            f"must be an integer > 0, got {v!r}",
        )
    _check(
        isinstance(c.patience, int) and c.patience >= 0,
        "patience",
        f"must be an integer >= 0, got {c.patience!r}",
    )
    _check(
        isinstance(c.seed, int) and c.seed >= 0, "seed", f"must be an integer >= 0, got {c.seed!r}"
    )
    _check(
        c.device == "cpu" or c.device.startswith(("cuda", "mps")),
        "device",
        f"expected cpu, cuda, cuda:N or mps, got {c.device!r}",
    )
    _check(
        c.precision in PRECISIONS,
        "precision",
        f"expected auto, fp32 or bf16, got {c.precision!r}",
    )


# Fields added after teacher keys were first made: out of ``legacy_hash``, and out of
# ``content_hash`` while at their defaults, so the teachers stored before keep their keys.
ADDED_TEACHER_FIELDS = ("checkpoint", "stages")
ADDED_TRIAL_DEFAULTS: dict[str, object] = {"student_stages": [], "teacher_stages": []}


@dataclass(frozen=True)
class TeacherConfig:
    """How to build the teacher, and train it unless ``checkpoint`` gives its weights.

    ``arch`` is a model spec (``kdcore.zoo``); ``cbam`` unset is True for a built-in ResNet
    (the paper's teacher) and False otherwise. ``stages`` are its distilled features
    (``TrialConfig.teacher_stages``). With ``checkpoint`` (a path or URI of a state dict,
    ``kdcore.teacher.read_checkpoint``) the teacher is never trained and the training
    settings below are unused.
    """

    arch: str = "resnet50"
    width: float = 1.0
    cbam: bool | None = None
    stem: str = "cifar"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    lr_schedule: str = "cosine"
    patience: int = 0
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # auto, fp32 or bf16 autocast (kdcore.precision)
    checkpoint: str | None = None
    stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.cbam is None:
            object.__setattr__(self, "cbam", default_cbam(self.arch))
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))

    def trial_config(self) -> TrialConfig:
        """The CE-only ``TrialConfig`` that trains this teacher as a 'student'."""
        return TrialConfig(
            group="baseline",
            student=self.arch,
            student_width=self.width,
            student_cbam=self.cbam,
            stem=self.stem,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            patience=self.patience,
            seed=self.seed,
            device=self.device,
            precision=self.precision,
        )

    def content_hash(self, data: Dataset) -> str:
        """Hash of everything that determines the teacher's weights: the cache key.

        It hashes every field of ``trial_config()`` except ``device`` (no hand list: the
        ``TrialConfig`` defaults the teacher trains with, such as momentum and weight decay,
        and any field added later are in), with ``precision`` resolved to what it means on
        the teacher's device (``kdcore.precision.resolve_precision``: ``auto`` on a CPU with
        bf16, or on CUDA, is ``bf16``), and the dataset fingerprint. Precision goes in: it is
        part of the recipe (a study setting), and bf16 autocast rounds the inputs of every
        convolution and matrix product to 8 significant bits, so the teacher trains along
        another trajectory to other weights; an fp32 study must not silently get a bf16
        teacher. ``device`` stays out: it says where the recipe runs, not what it is; at one
        precision two devices run the same computation and differ only in numerics (the
        order of floating-point sums, cuDNN's choice of kernels), as two runs on one GPU
        already do, so a teacher trained on a GPU serves the same study on a CPU.
        """
        from .precision import resolve_precision  # torch: only when a hash is made

        return self._hash_with(resolve_precision(self.precision, self.device), data)

    def legacy_hash(self, data: Dataset) -> str:
        """The cache key before issue 16 (precision and the ``TrialConfig`` defaults left out).

        Only for finding the teacher of a study stored with it; new files never use it.
        """
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("device", "precision", *ADDED_TEACHER_FIELDS)}
        blob = json.dumps({"teacher": fields, "data": data.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cache_keys(self, data: Dataset) -> tuple[str, ...]:
        """Every key a stored teacher of this config can carry, ``content_hash`` first.

        ``auto`` also accepts the other resolution (a teacher trained on a node whose CPU
        resolves ``auto`` differently from this one's), then ``legacy_hash``.
        """
        keys = [self.content_hash(data)]
        if self.precision == "auto":
            keys += [self._hash_with(p, data) for p in PRECISIONS if p != "auto"]
        keys.append(self.legacy_hash(data))
        return tuple(dict.fromkeys(keys))

    def _hash_with(self, precision: str, data: Dataset) -> str:
        fields = self.trial_config().to_dict()
        del fields["device"]
        for name, default in ADDED_TRIAL_DEFAULTS.items():  # keys made before they existed
            if fields[name] == default:
                del fields[name]
        fields["precision"] = precision
        blob = json.dumps({"trial": fields, "data": data.fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
