"""A study's settings from a preset, the environment, a config file and the command line.

Precedence: flag > config file > environment variable > preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import StudyConfig
from .presets import PRESETS

# Command-line names that differ from StudyConfig's.
ALIASES = {"epochs": "max_epochs", "group": "groups", "trial_scheduler": "scheduler"}


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


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
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
        raw = merge(raw, PRESETS[preset])
    raw = merge(raw, environment or {})
    if config_file is not None:
        raw = merge(raw, read_config_file(config_file))
    return merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})


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
        "sampler": get("sampler"), "n_startup": get("n_startup"),
        "scheduler": get("trial_scheduler"), "time_budget": get("time_budget"),
        "warm_start": get("warm_start"), "warm_start_storage": get("warm_start_storage"),
    }
