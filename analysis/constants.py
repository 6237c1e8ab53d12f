"""Fixed names shared by the analysis modules: groups, loss terms, table columns, paper numbers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

GROUPS: tuple[str, ...] = ("baseline", "kd", "fa", "at", "combined")
"""The five distillation groups in canonical order."""

PAPER_ACC: dict[str, float] = {
    "baseline": 80.56,
    "kd": 83.64,
    "fa": 82.78,
    "at": 83.53,
    "combined": 83.77,
}
"""The paper's reported best validation accuracies, in percent (CIFAR-10 only)."""

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
"""CIFAR-10's class names in label order (``kdcore.data.CIFAR10_CLASSES``, copied: no torch)."""


def is_cifar10(config: Mapping[str, Any]) -> bool:
    """Whether a study's data (its ``study.json``) is CIFAR-10, so the paper's numbers apply.

    With ``data_classes`` (written by ``kdsearch tune``): exactly CIFAR-10's 10 class names.
    Older studies: the data spec (``data_spec``, else ``data``) is ``cifar10[:ROOT]``, or an
    ``imagefolder:``/``jpegpack:`` path whose last part contains ``cifar10``/``cifar-10`` but
    not ``cifar100``/``cifar-100`` (any case).
    """
    if "data_classes" in config:
        classes = config["data_classes"]
        return isinstance(classes, list | tuple) and tuple(classes) == CIFAR10_CLASSES
    spec = config.get("data_spec") or config.get("data")
    if not isinstance(spec, str):
        return False
    kind, _, arg = spec.partition(":")
    if kind != "imagefolder" and kind != "jpegpack":
        return kind == "cifar10"
    name = PurePosixPath(arg.strip()).name.lower()
    return ("cifar10" in name or "cifar-10" in name) and not (
        "cifar100" in name or "cifar-100" in name)


def paper_numbers(config: Mapping[str, Any]) -> Mapping[str, float] | None:
    """:data:`PAPER_ACC` for a CIFAR-10 study (:func:`is_cifar10`), else None (no column)."""
    return PAPER_ACC if is_cifar10(config) else None

LOSS_PARAMS: tuple[str, ...] = ("T", "w_ce", "w_kl", "w_at", "w_fa", "mask_pct")
"""The distillation settings each group tunes by default (those of its terms)."""

TRAINING_PARAMS: tuple[str, ...] = ("lr", "weight_decay", "momentum", "batch_size",
                                    "lr_schedule", "mask_target")
"""Training settings that may vary per trial: tuned by a group when its space names them."""

PARAMS: tuple[str, ...] = LOSS_PARAMS + TRAINING_PARAMS
"""Searchable hyperparameters; the tables store each as ``cfg_<param>``, the value a trial
trained with (tuned or not)."""

INT_PARAMS: tuple[str, ...] = ("batch_size",)
CATEGORICAL_PARAMS: dict[str, tuple[str, ...]] = {
    "lr_schedule": ("constant", "cosine"),
    "mask_target": ("label", "prediction"),
}
"""Parameters of integer and of categorical values (their allowed choices); the rest are
floats."""

TERMS: tuple[str, ...] = ("ce", "kl", "at", "fa")
"""Loss terms; each has a weight ``cfg_w_<term>`` and a gradient share ``gshare_<term>``."""

USABLE_STATUSES: tuple[str, ...] = ("completed", "asha_stopped", "early_stopped")
"""Trial statuses whose ``best_val_acc`` is a real measurement."""

CFG_COLUMNS: list[str] = [f"cfg_{p}" for p in PARAMS]

_F, _INT, _S = pa.float64(), pa.int64(), pa.string()


def cfg_type(column: str) -> pa.DataType:
    """The stored type of a ``cfg_*`` column: int64, string (categorical) or float64."""
    param = column[len("cfg_"):]
    return _INT if param in INT_PARAMS else _S if param in CATEGORICAL_PARAMS else _F


_CFG = [(c, cfg_type(c)) for c in CFG_COLUMNS]


def group_ranges(config: Mapping[str, Any], group: str) -> dict[str, Mapping[str, Any]]:
    """One group's search ranges from a ``study.json``: its ``group_spaces`` entry (written
    by ``tune``), else the shared ``space`` (studies stored before per-group ranges; a
    parameter a group did not tune has one value in its trials, which callers skip)."""
    spaces = config.get("group_spaces") or {}
    if group in spaces:
        return dict(spaces[group])
    return {p: spec for p, spec in (config.get("space") or {}).items() if p in PARAMS}

PARTITION: pa.Schema = pa.schema([("group", _S)])
"""The hive partition key: a table's files live under ``<table>/group=<g>/`` and do not
store ``group`` themselves (a column that is also the partition key breaks other readers)."""

SCHEMAS: dict[str, pa.Schema] = {
    "epochs": pa.schema(
        [("study", _S), ("trial_id", _S), ("attempt", _INT), ("epoch", _INT), ("seed", _INT)]
        + _CFG
        + [("val_acc", _F), ("val_loss", _F), ("train_loss", _F)]
        + [(f"loss_{t}", _F) for t in TERMS] + [(f"gshare_{t}", _F) for t in TERMS]
        + [("lr", _F), ("epoch_seconds", _F), ("images_per_s", _F), ("node", _S),
           ("timestamp", _F)]
    ),
    "trials": pa.schema(
        [("study", _S), ("trial_id", _S), ("status", _S), ("epochs_run", _INT),
         ("best_val_acc", _F), ("best_epoch", _INT), ("wall_seconds", _F), ("seed", _INT)]
        + _CFG + [("error", _S), ("proposer", _S), ("timestamp", _F)]
    ),
    "runs": pa.schema(
        [("study", _S), ("seed", _INT), ("source_trial_id", _S), ("test_acc", _F),
         ("test_loss", _F), ("corrupt_acc_mean", _F), ("params", _INT), ("latency_ms_bs1", _F),
         ("images_per_s_bs256", _F)] + _CFG
        + [("best_val_acc", _F), ("best_epoch", _INT), ("epochs_run", _INT),
           ("train_seconds", _F), ("node", _S), ("timestamp", _F)]
    ),
    "robustness": pa.schema(
        [("study", _S), ("seed", _INT), ("corruption", _S), ("severity", _INT), ("acc", _F),
         ("timestamp", _F)]
    ),
}
"""Columns stored in each table's Parquet files (``group`` is the partition key)."""

STRICT: tuple[str, ...] = ("epochs", "trials")
"""Tables whose files hold exactly these columns; ``runs``/``robustness`` may carry more."""


def frame_schema(name: str) -> pa.Schema:
    """The columns of table ``name`` as read: the stored ones with ``group`` second."""
    return SCHEMAS[name].insert(1, PARTITION.field("group"))


COLUMNS: dict[str, list[str]] = {name: frame_schema(name).names for name in SCHEMAS}
"""Columns of each table as read (used for empty tables)."""

KEYS: dict[str, list[str]] = {
    "epochs": ["trial_id", "attempt", "epoch"],
    "trials": ["trial_id"],
    "runs": ["group", "seed"],
    "robustness": ["group", "seed", "corruption", "severity"],
}
"""Primary key of each table; readers keep one row per key."""


SPEED_FILE = "speed.json"
"""A study's size and speed per architecture (``search.engine.speed.measure_architectures``)."""


def describe_arch(arch: object, width: object, cbam: object, stem: object) -> str:
    """One line naming an architecture (``speed.json`` and the report), e.g.
    ``resnet18 width 0.25, cifar stem, without CBAM``; a model spec other than kdcore's
    ResNets (``torchvision:NAME``, ``MODULE:CALLABLE``: it has a colon) is named as it is."""
    if ":" in str(arch):
        return str(arch)
    width_text = f"{width:g}" if isinstance(width, int | float) else str(width)
    return f"{arch} width {width_text}, {stem} stem, {'with' if cbam else 'without'} CBAM"


def ordered_groups(groups: Iterable[object]) -> list[str]:
    """Distinct group names: canonical ones in canonical order, then any others sorted."""
    present = {str(g) for g in groups}
    return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))
