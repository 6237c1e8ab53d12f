"""Simulated trials for measuring the search's scheduling: synthetic learning curves and a
stand-in for ``kdcore.fit`` that sleeps instead of training.

The curve depends on the configuration (so ASHA and TPE have something to rank) and on
nothing else: ``synthetic_val_acc(params, epoch)`` rises towards a ceiling set by how close
the parameters are to a hidden optimum, faster for better configurations, plus a small
deterministic wobble per (configuration, epoch).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping

from kdcore.config import TrialConfig
from search.study import DEFAULT_SPACE

# A hidden optimum per parameter, as a fraction of the way through its default range.
OPTIMUM = {"T": 0.5, "w_ce": 0.6, "w_kl": 0.5, "w_at": 0.55, "w_fa": 0.4, "mask_pct": 0.3}
RANGES = {name: (r.low, r.high, r.log) for name, r in DEFAULT_SPACE.items()}


def _position(name: str, value: float) -> float:
    """Where ``value`` lies in the default range of ``name``, in [0, 1]."""
    low, high, log = RANGES[name]
    if log:
        value, low, high = math.log(max(value, low)), math.log(low), math.log(high)
    return min(max((value - low) / (high - low), 0.0), 1.0)


def quality(params: Mapping[str, float]) -> float:
    """1 at the hidden optimum, falling towards 0 away from it."""
    used = [p for p in params if p in OPTIMUM]
    if not used:
        return 0.5
    distance = sum((_position(p, float(params[p])) - OPTIMUM[p]) ** 2 for p in used) / len(used)
    return math.exp(-8.0 * distance)


def synthetic_val_acc(params: Mapping[str, float], epoch: int) -> float:
    """A validation accuracy for ``params`` after ``epoch`` epochs (deterministic)."""
    q = quality(params)
    ceiling = 0.45 + 0.4 * q
    rate = 0.15 + 0.25 * q
    key = ",".join(f"{k}={float(params[k]):.6g}" for k in sorted(params)) + f"@{epoch}"
    wobble = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5
    return 0.1 + (ceiling - 0.1) * (1 - math.exp(-rate * epoch)) + 0.01 * wobble


def simulated_fit(
    config: TrialConfig,
    epoch_seconds: float,
    report: Callable[[dict, dict], None],
    checkpoint: dict | None = None,
) -> None:
    """Sleep ``epoch_seconds`` per epoch and report like ``kdcore.fit`` (resumable state too)."""
    params = {p: float(getattr(config, p)) for p in OPTIMUM}
    history = list(checkpoint["history"]) if checkpoint else []
    for epoch in range(len(history) + 1, config.epochs + 1):
        t0 = time.perf_counter()
        time.sleep(epoch_seconds)
        acc = synthetic_val_acc(params, epoch)
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": 2.3 * (1 - acc), "val_loss": 2.3 * (1 - acc),
                   "val_acc": acc, "lr": config.lr, "epoch_seconds": seconds,
                   "images_per_s": 0.0, "early_stopped": False}
        history.append(metrics)
        report(metrics, {"epoch": epoch, "history": list(history)})
