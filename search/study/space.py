"""The search space: parameter ranges, the default space, and what each group tunes.

A study's ``space`` holds shared ranges by parameter (``[space.w_at]``) and, keyed by a group
name, ranges of that group alone (``[space.at.w_at]``, which beat the shared one). A group
tunes its own terms' settings (``group_params``: T and the weights, mask_pct when masked) and
any training setting (``TRAINING_PARAMS``: lr, weight_decay, momentum, batch_size,
lr_schedule, mask_target) that its space names (``group_space``). A range is a float or int
interval (``low``/``high``, ``log``, ``step``), a list of ``choices``, or one ``value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.constants import (
    CATEGORICAL_PARAMS,
    INT_PARAMS,
    LOSS_PARAMS,
    PARAMS,
    TRAINING_PARAMS,
)
from kdcore.config import GROUP_TERMS, GROUPS, MASKED_TERMS, TERMS, check, is_int, is_number


@dataclass(frozen=True)
class ParamRange:
    """A search range: [low, high] (uniform or log-uniform, optionally on a ``step`` grid),
    or ``choices`` (categorical); low == high, or one choice, is a fixed value."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    def ends(self) -> tuple[Any, Any]:
        """The two extreme values (the first and last choice of a categorical range)."""
        return (self.choices[0], self.choices[-1]) if self.categorical else (self.low, self.high)

    def to_dict(self) -> dict:
        if self.categorical:
            return {"choices": list(self.choices)}
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
TUNED_GROUPS = tuple(g for g in GROUPS if g != "baseline")


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


def group_space(space: dict[str, Any], group: str) -> dict[str, ParamRange]:
    """The ranges ``group`` searches: its own parameters and the training settings named in
    ``space``, each from the group's own table where it has one, else the shared range."""
    if group == "baseline":
        return {}
    own = space.get(group, {})
    names = [*group_params(group)]
    names += [p for p in TRAINING_PARAMS if p in space or p in own]
    return {p: own.get(p, space.get(p)) for p in names}


def space_from(raw: object) -> dict[str, Any]:
    """A space from plain values (a config file, ``study.json``); ``ValueError`` naming the
    entry (``space.lr``, ``space.at.w_at``)."""
    check(isinstance(raw, dict), "space", "expected a table of parameter ranges")
    space: dict[str, Any] = dict(DEFAULT_SPACE)
    for name, spec in sorted(raw.items(), key=lambda kv: kv[0] in GROUPS):  # shared first
        if name in GROUPS:
            check(name != "baseline", "space.baseline", "the baseline tunes nothing")
            check(isinstance(spec, dict), f"space.{name}", "expected a table of ranges")
            space[name] = {p: _range(f"space.{name}.{p}", p, s, space.get(p))
                           for p, s in spec.items()}
            continue
        space[name] = _range(f"space.{name}", name, spec, space.get(name))
    return space


def _range(where: str, name: str, spec: object, base: ParamRange | None) -> ParamRange:
    check(name in PARAMS, where, f"unknown parameter (expected one of {list(PARAMS)} or a "
          f"group's table {list(TUNED_GROUPS)})")
    if isinstance(spec, ParamRange):
        return spec
    check(isinstance(spec, dict), where, "expected a table with low/high[/log/step], "
          "choices or value")
    bad = set(spec) - {"low", "high", "log", "step", "choices", "value"}
    check(not bad, where, f"unknown key {sorted(bad)[0] if bad else ''!r}")
    if "value" in spec:
        check(len(spec) == 1, where, "a fixed value takes no other key")
        v = spec["value"]
        return ParamRange(choices=(v,)) if name in CATEGORICAL_PARAMS else ParamRange(v, v)
    if name in CATEGORICAL_PARAMS or "choices" in spec:
        check(set(spec) == {"choices"}, where, "a categorical range takes only choices")
        choices = spec["choices"]
        check(isinstance(choices, list | tuple) and len(choices) > 0, where,
              "choices must be a non-empty list")
        return ParamRange(choices=tuple(choices))
    check(base is not None or {"low", "high"} <= set(spec), where,
          "needs low and high (no default range)")
    values = {**(base.to_dict() if base is not None and not base.categorical else {}), **spec}
    if "step" not in spec and spec.get("log"):
        values.pop("step", None)
    if name not in INT_PARAMS:  # a TOML integer is a float range's bound all the same
        values.update({k: float(v) for k, v in values.items()
                       if k in ("low", "high", "step") and is_int(v)})
    return ParamRange(**values)


def validate_space(space: dict[str, Any]) -> None:
    """Every range of ``space`` (shared and per group), checked by ``validate_range``."""
    check(isinstance(space, dict) and set(LOSS_PARAMS) <= set(space), "space",
          f"needs the parameters {list(LOSS_PARAMS)}")
    for name, r in space.items():
        if isinstance(r, dict):
            for p, inner in r.items():
                where = f"space.{name}.{p}"
                check(p in group_params(name) or p in TRAINING_PARAMS, where,
                      f"group {name!r} does not tune {p} (it tunes {list(group_params(name))} "
                      f"and the training settings {list(TRAINING_PARAMS)})")
                validate_range(p, inner, where)
        else:
            validate_range(name, r)


def validate_range(name: str, r: ParamRange, where: str | None = None) -> None:
    where = where or f"space.{name}"
    if name in CATEGORICAL_PARAMS:
        allowed = CATEGORICAL_PARAMS[name]
        check(r.categorical and all(c in allowed for c in r.choices)
              and len(set(r.choices)) == len(r.choices), where,
              f"choices must be distinct values among {list(allowed)}, got {r.choices!r}")
        return
    check(not r.categorical or all(is_number(c) for c in r.choices), where,
          f"choices must be numbers, got {r.choices!r}")
    if r.categorical:
        check(len(set(r.choices)) == len(r.choices), where, "choices must be distinct")
        if name in INT_PARAMS:
            check(all(is_int(c) for c in r.choices), where, f"{name} choices must be integers")
        return
    check(is_number(r.low) and is_number(r.high) and r.low <= r.high, where,
          f"needs finite low <= high, got low={r.low!r} high={r.high!r}")
    check(isinstance(r.log, bool), where, "log must be true or false")
    if r.log:
        check(r.low > 0, where, "a log range needs low > 0")
        check(r.step is None, where, "a log range cannot have a step")
    if r.step is not None:
        check(is_number(r.step) and r.step > 0, where, f"step must be > 0, got {r.step!r}")
    if name in INT_PARAMS:
        check(is_int(r.low) and is_int(r.high) and (r.step is None or is_int(r.step)), where,
              f"{name} takes integer low, high and step")
    if name == "T":
        check(r.low > 0, where, "T must be > 0")
    elif name == "mask_pct":
        check(r.low >= 0 and r.high < 100, where, "mask_pct must lie in [0, 100)")
    elif name in LOSS_PARAMS:
        check(r.low >= 0, where, "loss weights must be >= 0")
    # lr, weight_decay, momentum and batch_size: TrialConfig checks both ends of the range


def typed(name: str, value: Any) -> Any:
    """A parameter's value in its type: int, str (categorical) or float."""
    if name in CATEGORICAL_PARAMS:
        return str(value)
    return int(round(float(value))) if name in INT_PARAMS else float(value)


def space_to_dict(space: dict[str, Any]) -> dict[str, Any]:
    """Plain values of a space (``study.json``): shared ranges and per-group tables."""
    return {p: ({q: s.to_dict() for q, s in r.items()} if isinstance(r, dict) else r.to_dict())
            for p, r in space.items()}
