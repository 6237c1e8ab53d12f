"""The search space: parameter ranges, the default space, and what each group tunes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.constants import PARAMS
from kdcore.config import GROUP_TERMS, MASKED_TERMS, TERMS, check, is_number


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


def space_from(raw: object) -> dict[str, ParamRange]:
    check(isinstance(raw, dict), "space", "expected a table of parameter ranges")
    space = dict(DEFAULT_SPACE)
    for name, spec in raw.items():
        check(name in PARAMS, f"space.{name}",
               f"unknown parameter (expected one of {list(PARAMS)})")
        if isinstance(spec, ParamRange):
            space[name] = spec
            continue
        check(isinstance(spec, dict), f"space.{name}", "expected a table with low/high[/log/step]")
        bad = set(spec) - {"low", "high", "log", "step"}
        check(not bad, f"space.{name}", f"unknown key {sorted(bad)[0] if bad else ''!r}")
        base = space[name].to_dict()
        if "step" not in spec and spec.get("log"):
            base.pop("step", None)
        space[name] = ParamRange(**{**base, **spec})
    return space


def validate_range(name: str, r: ParamRange) -> None:
    where = f"space.{name}"
    check(is_number(r.low) and is_number(r.high) and r.low <= r.high, where,
           f"needs finite low <= high, got low={r.low!r} high={r.high!r}")
    check(isinstance(r.log, bool), where, "log must be true or false")
    if r.log:
        check(r.low > 0, where, "a log range needs low > 0")
        check(r.step is None, where, "a log range cannot have a step")
    if r.step is not None:
        check(is_number(r.step) and r.step > 0, where, f"step must be > 0, got {r.step!r}")
    if name == "T":
        check(r.low > 0, where, "T must be > 0")
    elif name == "mask_pct":
        check(r.low >= 0 and r.high < 100, where, "mask_pct must lie in [0, 100)")
    else:
        check(r.low >= 0, where, "loss weights must be >= 0")
