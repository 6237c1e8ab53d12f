"""The rows of the ``epochs`` and ``trials`` tables, built in one place for every writer
(the search's callback, the Ray-free mini-study, the synthetic tables of ``bench --tables``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from analysis.constants import CFG_COLUMNS as CFG
from analysis.constants import TERMS, cfg_type

EPOCH_METRICS = ("val_acc", "val_loss", "train_loss", *(f"loss_{t}" for t in TERMS),
                 *(f"gshare_{t}" for t in TERMS), "lr", "epoch_seconds", "images_per_s")
"""The metrics of an ``epochs`` row (``kdcore.fit`` reports each per epoch)."""


def as_float(v: Any) -> float:
    """``float(v)``, NaN where ``v`` is missing or not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def cfg_cells(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``cfg_*`` value of a row in its column's type: NaN, None or a number/string."""
    out: dict[str, Any] = {}
    for column in CFG:
        v = cfg.get(column)
        kind = cfg_type(column)
        if kind == pa.string():
            out[column] = None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        elif kind == pa.int64():
            f = as_float(v)
            out[column] = None if math.isnan(f) else int(f)
        else:
            out[column] = as_float(v)
    return out


def epoch_row(study: str, group: str, trial_id: str, attempt: int, epoch: int, seed: int,
              metrics: Mapping[str, Any], cfg: Mapping[str, Any], node: str,
              timestamp: float | None = None) -> dict[str, Any]:
    """One ``epochs`` row: its key, the trial's ``cfg_*`` values, every epoch metric (NaN
    where ``metrics`` lacks it), the node and the time written."""
    return {
        "study": study, "group": group, "trial_id": trial_id, "attempt": int(attempt),
        "epoch": int(epoch), "seed": int(seed), **cfg_cells(cfg),
        **{m: as_float(metrics.get(m)) for m in EPOCH_METRICS}, "node": str(node),
        "timestamp": time.time() if timestamp is None else timestamp,
    }


def trial_row(study: str, group: str, trial_id: str, status: str, epochs_run: int,
              best_val_acc: float | None, best_epoch: int, wall_seconds: float, seed: int,
              cfg: Mapping[str, Any], error: str = "", timestamp: float | None = None,
              proposer: str | None = None) -> dict[str, Any]:
    """One ``trials`` row: a trial's final status, budget used, best epoch and settings, and
    who proposed it (``proposer``: ``random``, a sampler's name, ``warm start``; None for a
    baseline seed)."""
    return {
        "study": study, "group": group, "trial_id": trial_id, "status": status,
        "epochs_run": int(epochs_run or 0), "best_val_acc": as_float(best_val_acc),
        "best_epoch": int(best_epoch or 0), "wall_seconds": as_float(wall_seconds),
        "seed": int(seed), **cfg_cells(cfg), "error": error, "proposer": proposer,
        "timestamp": time.time() if timestamp is None else timestamp,
    }
