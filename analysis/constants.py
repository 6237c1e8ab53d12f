"""Fixed names shared by the analysis modules: groups, loss terms, table columns, paper numbers."""

from __future__ import annotations

from collections.abc import Iterable

GROUPS: tuple[str, ...] = ("baseline", "kd", "fa", "at", "combined")
"""The five distillation groups in canonical order."""

PAPER_ACC: dict[str, float] = {
    "baseline": 80.56,
    "kd": 83.64,
    "fa": 82.78,
    "at": 83.53,
    "combined": 83.77,
}
"""The paper's reported best validation accuracies, in percent."""

PARAMS: tuple[str, ...] = ("T", "w_ce", "w_kl", "w_at", "w_fa", "mask_pct")
"""Searchable hyperparameters; the tables store each as ``cfg_<param>``."""

TERMS: tuple[str, ...] = ("ce", "kl", "at", "fa")
"""Loss terms; each has a weight ``cfg_w_<term>`` and a gradient share ``gshare_<term>``."""

USABLE_STATUSES: tuple[str, ...] = ("completed", "asha_stopped", "early_stopped")
"""Trial statuses whose ``best_val_acc`` is a real measurement."""

CFG_COLUMNS: list[str] = [f"cfg_{p}" for p in PARAMS]

COLUMNS: dict[str, list[str]] = {
    "epochs": [
        "study", "group", "trial_id", "attempt", "epoch", "seed", *CFG_COLUMNS,
        "val_acc", "val_loss", "train_loss",
        *(f"loss_{t}" for t in TERMS), *(f"gshare_{t}" for t in TERMS),
        "lr", "epoch_seconds", "images_per_s", "node", "timestamp",
    ],
    "trials": [
        "study", "group", "trial_id", "status", "epochs_run", "best_val_acc", "best_epoch",
        "wall_seconds", "seed", *CFG_COLUMNS, "error", "timestamp",
    ],
    "runs": [
        "study", "group", "seed", "source_trial_id", "test_acc", "test_loss",
        "corrupt_acc_mean", "params", "latency_ms_bs1", "images_per_s_bs256",
        *CFG_COLUMNS, "timestamp",
    ],
    "robustness": ["study", "group", "seed", "corruption", "severity", "acc", "timestamp"],
}
"""Columns of each table as the search package writes them (used for empty tables)."""

KEYS: dict[str, list[str]] = {
    "epochs": ["trial_id", "attempt", "epoch"],
    "trials": ["trial_id"],
    "runs": ["group", "seed"],
    "robustness": ["group", "seed", "corruption", "severity"],
}
"""Primary key of each table; readers keep one row per key."""


def ordered_groups(groups: Iterable[object]) -> list[str]:
    """Distinct group names: canonical ones in canonical order, then any others sorted."""
    present = {str(g) for g in groups}
    return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))
