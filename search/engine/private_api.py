"""Every use of a private attribute of Ray, in one place, for the versions pinned in
pyproject.toml (Ray 2.60). Where a library changes one of them, the function here raises
``RuntimeError`` naming the library version, and ``tests/test_private_api.py`` fails first.

- ``restored_parts(tuner)``: the callbacks and the search algorithm of a ``Tuner.restore``-d
  experiment. Tune pickles them with the experiment; a study that moved (or an Optuna URL
  given anew) must point them at today's sink, study and storage, and Tune has no public
  way to reach them (``Tuner._local_tuner``, ``TunerInternal._tune_config``).
- ``reload_auth_mode()``: Ray reads ``RAY_AUTH_MODE`` once per process, when it is imported;
  a driver that turns token authentication on afterwards (``ray_start.init_ray``) makes Ray
  read it again (``ray._raylet.Config.initialize``).

Optuna needs none: the searcher reaches trials through the public storage API.
"""

from __future__ import annotations

from typing import Any


def _ray_version() -> str:
    import ray

    return ray.__version__


def restored_parts(tuner) -> tuple[list, Any]:
    """(callbacks, search algorithm) that a restored ``tuner`` will run with."""
    local = getattr(tuner, "_local_tuner", None)
    tune_config = getattr(local, "_tune_config", None)
    if local is None or tune_config is None or not hasattr(local, "get_run_config"):
        raise RuntimeError(f"Ray {_ray_version()}: Tuner._local_tuner._tune_config is gone; "
                           "update search/engine/private_api.py")
    return list(local.get_run_config().callbacks or []), tune_config.search_alg


def reload_auth_mode() -> None:
    """Make this process's Ray read ``RAY_AUTH_MODE`` (and the token) again."""
    try:
        from ray._raylet import Config
    except ImportError:
        raise RuntimeError(f"Ray {_ray_version()}: ray._raylet.Config is gone; update "
                           "search/engine/private_api.py") from None
    Config.initialize("")
