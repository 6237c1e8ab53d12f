"""Every use of a private attribute of Ray, in one place, for the versions pinned in
pyproject.toml (Ray 2.60). Where a library changes one of them, the function here raises
``RuntimeError`` naming the library version, and ``tests/test_private_api.py`` fails first.

- ``restored_parts(tuner)``: the callbacks and the search algorithm of a ``Tuner.restore``-d
  experiment. Tune pickles them with the experiment; a study that moved (or an Optuna URL
  given anew) must point them at today's sink, study and storage, and Tune has no public
  way to reach them (``Tuner._local_tuner``, ``TunerInternal._tune_config``). The same path
  gives any tuner's searcher after ``fit`` (its search clock for a time budget).
- ``reload_auth_mode()``: Ray reads ``RAY_AUTH_MODE`` once per process, when it is imported;
  a driver that turns token authentication on afterwards (``ray_start.init_ray``) makes Ray
  read it again (``ray._raylet.Config.initialize``).

- ``restoring_trainable(fn, usable)``: Tune restores a trial from the checkpoint its saved
  experiment state names and refuses one that is gone (``Trainable.restore``). A driver
  killed after a trial wrote newer checkpoints and before Tune saved its state names one
  that Tune has since deleted (it keeps ``num_to_keep``); the trainable class here swaps it
  for ``usable(checkpoint)`` first (``ray.tune.trainable.function_trainable.wrap_function``,
  ``ray.train._internal.session._TrainingResult``).

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


def restoring_trainable(fn, usable):
    """Tune's trainable class for function ``fn`` whose ``restore`` replaces a checkpoint by
    ``usable(checkpoint)``: itself, another one, or None (nothing left: the trial starts
    afresh, as if it had no checkpoint)."""
    try:
        from ray.train._internal.session import _TrainingResult
        from ray.tune.trainable.function_trainable import wrap_function
    except ImportError:
        raise RuntimeError(f"Ray {_ray_version()}: wrap_function or _TrainingResult moved; "
                           "update search/engine/private_api.py") from None
    base = wrap_function(fn)

    class Restoring(base):
        def restore(self, checkpoint_path):
            if isinstance(checkpoint_path, _TrainingResult):
                found = usable(checkpoint_path.checkpoint)
                if found is None:
                    return None
                checkpoint_path = _TrainingResult(checkpoint=found,
                                                  metrics=checkpoint_path.metrics)
            return super().restore(checkpoint_path)

    # Tune names trials after the trainable: train_trial_<id>, as for the function itself
    Restoring.__name__ = Restoring.__qualname__ = getattr(fn, "__name__", base.__name__)
    return Restoring
