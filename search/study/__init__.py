"""The study: its config (``config``), search space (``space``), presets (``presets``),
settings from files, environment and flags (``loading``), and ``study.json`` (``stored``).

Importing it imports neither torch nor Ray.
"""

from .config import TEACHER_FIELDS, StudyConfig
from .loading import (
    ALIASES,
    ENVIRONMENT,
    environment_settings,
    given_settings,
    load_study_config,
    overrides_from_args,
    read_config_file,
)
from .presets import PRESETS
from .space import DEFAULT_SPACE, PARAMS, ParamRange, group_params, typed
from .stored import (
    GROWING_FIELDS,
    RUNTIME_FIELDS,
    check_same_data,
    config_from_study_json,
    package_versions,
    read_study_json,
    record_if_changed,
    record_settings,
    resolve_study,
    settle,
    study_json_path,
    write_study_json,
)

__all__ = [
    "ALIASES", "check_same_data", "config_from_study_json", "DEFAULT_SPACE", "ENVIRONMENT",
    "environment_settings", "given_settings", "group_params", "GROWING_FIELDS",
    "load_study_config", "overrides_from_args", "package_versions", "ParamRange", "PARAMS",
    "PRESETS", "read_config_file", "read_study_json", "record_if_changed", "record_settings",
    "resolve_study", "RUNTIME_FIELDS", "settle", "study_json_path", "StudyConfig",
    "TEACHER_FIELDS", "typed", "write_study_json",
]
