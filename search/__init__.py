"""search: Ray Tune + Optuna around kdcore, in rooms whose names say what lives there.

- ``study``: the study config, its search space, presets, settings from files and flags, and
  ``study.json`` (imports neither torch nor Ray);
- ``store``: files and storage locations, the Parquet sink, row builders, compaction;
- ``engine``: Ray start-up, the searcher, trial scheduler, trainable, callback, progress
  views, the teacher task, the search experiment, reproduce runs, size and speed;
- ``commands``: one module per ``kdsearch`` command, and the parser;
- ``bench``: the scheduler and table benchmarks and the Ray-free mini-study.

Imports point one way: commands -> engine -> store, study; bench -> engine, store, study.

Studies written before the rooms existed hold pickles (Tune's experiment state, its
searcher) that name the old flat modules, such as ``search.searcher.GroupSearcher``; those
names still resolve (``MOVED``), so such a study loads and resumes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "search.callback": "search.engine.callback",
    "search.progress": "search.engine.progress",
    "search.scheduler": "search.engine.scheduler",
    "search.searcher": "search.engine.searcher",
    "search.simulated": "search.engine.simulated",
    "search.teacher_task": "search.engine.teacher_task",
    "search.trainable": "search.engine.trainable",
    "search.sink": "search.store.sink",
    "search.fsutil": "search.store.files",
    "search.compact": "search.store.compact",
    "search.tune": "search.engine.experiment",  # trial_dirname, in Tune's TuneConfig
    "search.reproduce": "search.engine.reproduce",  # _tune_entry, the reproduce trainable
}
"""Old module -> the module that holds its names now (for unpickling old studies only)."""


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as a view of its new module (PEP 562 ``__getattr__``)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        new = importlib.import_module(MOVED[module.__name__])
        module.__getattr__ = lambda attr: getattr(new, attr)
        module.__doc__ = f"Moved to {new.__name__} (kept for studies pickled before)."


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())
