"""The private attributes of Ray that kdsearch uses (``search/engine/private_api.py``) still
exist in the installed version; where one is gone, the adapter says which Ray it was."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")  # (the device image has no Ray)

import ray
from ray import tune

from search.engine import private_api


def test_restored_parts_reach_the_callbacks_and_the_search_algorithm(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    callback, search_alg = tune.Callback(), BasicVariantGenerator()
    tuner = tune.Tuner(lambda config: None,
                       tune_config=tune.TuneConfig(search_alg=search_alg),
                       run_config=tune.RunConfig(callbacks=[callback],
                                                 storage_path=str(tmp_path)))
    callbacks, found = private_api.restored_parts(tuner)
    assert callbacks == [callback] and found is search_alg


def test_a_changed_tuner_is_named_with_the_ray_version():
    class Tuner:  # what a Ray without Tuner._local_tuner would hand back
        pass

    with pytest.raises(RuntimeError, match=rf"^Ray {ray.__version__}: Tuner\._local_tuner"):
        private_api.restored_parts(Tuner())


def test_ray_still_has_the_auth_mode_reload():
    from ray._raylet import Config

    assert callable(Config.initialize)


def test_restoring_trainable_swaps_the_checkpoint_before_tunes_restore(monkeypatch):
    """The class ``restoring_trainable`` builds hands Tune's ``restore`` the checkpoint that
    ``usable`` gives, and restores nothing where ``usable`` finds none."""
    from ray.train._internal.session import _TrainingResult

    seen = []
    cls = private_api.restoring_trainable(lambda config: None,
                                          lambda c: None if c.path == "/gone/all" else
                                          tune.Checkpoint("/kept/checkpoint_000004"))
    base = cls.__mro__[1]
    monkeypatch.setattr(base, "restore", lambda self, arg: seen.append(arg))
    trainable = object.__new__(cls)  # no actor: only the method is under test
    trainable.restore(_TrainingResult(checkpoint=tune.Checkpoint("/gone/checkpoint_000001"),
                                      metrics={"training_iteration": 2}))
    assert seen[0].checkpoint.path == "/kept/checkpoint_000004"
    assert seen[0].metrics == {"training_iteration": 2}
    assert trainable.restore(_TrainingResult(checkpoint=tune.Checkpoint("/gone/all"),
                                             metrics={})) is None and len(seen) == 1
    assert cls.__name__ == "<lambda>" and issubclass(cls, tune.Trainable)
