"""The study's teacher: trained once, as a Ray task, cached in storage.

The teacher file lives at ``<storage>/teachers/teacher-<content hash>.pt`` (a local path or a
pyarrow URI, so every node of a cluster finds it); the hash is
``kdcore.teacher.TeacherConfig.content_hash`` (the teacher's whole training config with its
precision resolved, and the data). A stored study keeps the teacher it recorded in
``study.json`` (``teacher_hash``), even one stored under an older key. The driver first looks
there (``load_cached``: a damaged or foreign file is refused in one line before Ray starts); if
the file is missing, ``train_on_cluster`` runs ``train_and_store`` as a Ray task that asks for
one trial's resources (a CPU-only study: all CPUs of the largest node, ``teacher_cpus``), so
on a cluster it runs on a GPU worker even when the driver has none. Training holds an
exclusive lock on ``teacher-<hash>.lock`` next to the file (local and shared POSIX storage),
so two studies that need the same teacher at the same time train it once: the second waits,
then loads it.

A teacher given as ``teacher.checkpoint`` (a path or URI) is never trained: the driver reads
it (``from_checkpoint``: strictly, before Ray starts), measures it on the validation split and
ships its weights to the workers like a stored teacher's; ``study.json`` records the file's
content hash, and a resumed study refuses a file that changed since.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kdcore.config import GROUP_TERMS, TEACHERS, teacher_file
from kdcore.data import Dataset
from kdcore.evaluate import accuracy
from kdcore.features import network
from kdcore.teacher import build_teacher, get_teacher, load_teacher, load_weights, read_state_dict
from kdcore.train import image_shape
from search.engine.ray_start import cluster_slots, init_ray, quiet_ray
from search.store import files as fsutil
from search.study import StudyConfig, read_study_json


def teacher_path(config: StudyConfig, data: Dataset, digest: str | None = None) -> str:
    """``<storage>/teachers/teacher-<hash>.pt`` for this study's teacher and data (``digest``:
    that hash instead of ``content_hash``)."""
    digest = digest or config.teacher.content_hash(data)
    return fsutil.join(config.storage, TEACHERS, teacher_file(digest))


def recorded_hash(config: StudyConfig) -> str | None:
    """The ``teacher_hash`` of the study's ``study.json``, None where there is none."""
    return (read_study_json(config.storage, config.study) or {}).get("teacher_hash")


def load_cached(config: StudyConfig, data: Dataset,
                teacher_hash: str | None = None) -> tuple[dict, dict] | None:
    """(state_dict, meta) of the cached teacher, None when there is none; ValueError if bad.

    The study's recorded teacher comes first: ``teacher_hash`` (default: ``recorded_hash``,
    from ``study.json``) is loaded when it is one of this config's keys
    (``TeacherConfig.cache_keys``: the current one, ``auto``'s other resolution, the key used
    before issue 16) and its file exists, so a resumed study keeps the teacher it was
    searched with; a hash of another config (a study.json left by other settings) is
    ignored. Otherwise the file of the current key (``teacher_path``).
    """
    teacher_hash = teacher_hash or recorded_hash(config)
    if config.teacher.checkpoint:
        return from_checkpoint(config, data, teacher_hash)
    path = teacher_path(config, data)
    if teacher_hash and teacher_hash in config.teacher.cache_keys(data):
        recorded = teacher_path(config, data, teacher_hash)
        if fsutil.exists(recorded):
            path = recorded
    blob = fsutil.read_bytes(path)
    if blob is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = path if not fsutil.is_uri(path) else str(Path(tmp) / Path(path).name)
        if local != path:
            Path(local).write_bytes(blob)
        model = load_teacher(local, config.teacher, data.num_classes)
        meta = torch.load(local, map_location="cpu", weights_only=True).get("meta", {})
    return {k: v.detach().cpu() for k, v in network(model).state_dict().items()}, meta


def from_checkpoint(config: StudyConfig, data: Dataset,
                    recorded: str | None = None) -> tuple[dict, dict]:
    """(state_dict, meta) of the teacher in ``teacher.checkpoint``; ValueError in one line.

    Read from a local path or URI, loaded strictly into the teacher's model built with the
    study's stages (so a wrong key or stage is refused here, on the driver), measured on the
    validation split. ``meta["hash"]`` is the file's content hash; ``recorded`` (the study's
    ``teacher_hash``) must equal it.
    """
    from search.engine.trainable import teacher_stages

    path = config.teacher.checkpoint
    blob = fsutil.read_bytes(path)
    if blob is None:
        raise ValueError(f"teacher.checkpoint: no file at {path}")
    digest = hashlib.sha256(blob).hexdigest()[:16]
    if recorded and recorded != digest:
        raise ValueError(f"teacher.checkpoint: {path} changed since the study started (content "
                         f"hash {digest}, the study recorded {recorded}); use another --study")
    stages, count = teacher_stages(config)
    model = build_teacher(config.teacher, data.num_classes, image_shape(data), stages, count or 3)
    load_weights(model, read_state_dict(blob, path), path, config.teacher.arch)
    _, val_acc = accuracy(model, data.val_x, data.val_y, data.mean, data.std,
                          precision=config.precision)
    meta = {"hash": digest, "val_acc": val_acc, "checkpoint": path}
    return {k: v.detach().cpu() for k, v in network(model).state_dict().items()}, meta


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (local storage); a no-op for URIs."""
    if fsutil.is_uri(path):
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train_and_store(config: StudyConfig, data: Dataset, threads: int | None = None) -> dict:
    """Train the teacher unless another process did meanwhile; write it to storage.

    ``threads``: torch CPU threads (default: ``cpus_per_trial``). Returns ``{"trained": bool,
    "hash": ..., "node": ..., "seconds": ...}``; ``hash`` is the key computed here, where
    ``precision="auto"`` is resolved for the training (it can differ from the driver's on
    a CPU cluster of mixed CPUs). Runs inside the Ray task (or directly, in tests).
    """
    digest = config.teacher.content_hash(data)
    path = teacher_path(config, data, digest)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads or config.cpus_per_trial)))
    t0 = time.monotonic()

    def progress(metrics: dict, state: dict) -> None:
        print(f"teacher epoch {metrics['epoch']}/{config.teacher.epochs}: "
              f"val_acc {metrics['val_acc']:.4f} ({metrics['epoch_seconds']:.1f}s)", flush=True)

    try:
        with exclusive(path[: -len(".pt")] + ".lock"):
            if fsutil.exists(path):
                return {"trained": False, "hash": digest, "node": _node(),
                        "seconds": time.monotonic() - t0}
            with tempfile.TemporaryDirectory(prefix="kdsearch-teacher-") as tmp:
                _, trained, _ = get_teacher(config.teacher, data, tmp, report=progress)
                fsutil.write_bytes(path, (Path(tmp) / teacher_file(trained)).read_bytes())
    finally:
        torch.set_num_threads(previous_threads)
    return {"trained": True, "hash": digest, "node": _node(), "seconds": time.monotonic() - t0}


def _node() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "local"
    except ImportError:
        return "local"


def teacher_cpus(config: StudyConfig, node_cpus: list[float]) -> float:
    """CPUs the teacher task asks for, given the CPUs of each alive node.

    A GPU study's teacher takes one trial's resources. A CPU-only study's teacher takes the
    CPUs of the largest node: no trial can start before the teacher exists, so the rest of
    that node would only sit idle (on a 2-core laptop with one CPU per trial, half the machine).
    """
    if config.gpus_per_trial > 0 or not node_cpus:
        return config.cpus_per_trial
    return max(config.cpus_per_trial, math.floor(max(node_cpus)))


def train_on_cluster(config: StudyConfig, data_ref) -> dict:
    """Run ``train_and_store`` as a Ray task (resources from ``teacher_cpus``); its summary."""
    import ray

    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cpus = teacher_cpus(config, node_cpus)

    @ray.remote(num_cpus=cpus, num_gpus=config.gpus_per_trial, max_retries=1)
    def teacher_task(config: StudyConfig, data: Dataset) -> dict:
        return train_and_store(config, data, threads=int(cpus))

    return ray.get(teacher_task.remote(config, data_ref))


def describe(meta: dict, where: str) -> str:
    return (f"teacher {meta.get('hash', '?')}: val_acc {meta.get('val_acc', math.nan):.4f} "
            f"({where})")


def needs_teacher(config: StudyConfig) -> bool:
    return any(t != "ce" for g in config.groups for t in GROUP_TERMS[g])


def prepare_teacher(config: StudyConfig, data, address: str | None = None,
                    cached: tuple[dict, dict] | None = None) -> tuple[dict | None, dict]:
    """The study's teacher ``(state_dict, metadata)``: from storage, else trained on the cluster.

    Loading happens before Ray starts (a bad file is refused in one line); training is a Ray
    task with a trial's resources (``teacher_task``), started here if needed. A stored study
    loads the teacher its ``study.json`` records (``teacher_hash``, even under a key of an
    older version), else the current key's.
    """
    if not needs_teacher(config):
        return None, {}
    from search.engine.teacher_task import describe, load_cached, recorded_hash, train_on_cluster

    cached = cached or load_cached(config, data, recorded_hash(config))
    if cached is None:
        import ray

        quiet_ray()
        init_ray(config, address)
        cluster_slots(config)  # refuses a cluster that cannot run the task at all
        t0 = time.monotonic()
        info = train_on_cluster(config, ray.put(data))
        cached = load_cached(config, data, info.get("hash"))  # the key where it trained
        where = (f"trained on {info['node']} in {time.monotonic() - t0:.0f}s" if info["trained"]
                 else "trained meanwhile by another study")
        print(describe(cached[1], where), flush=True)
    else:
        where = (f"checkpoint {config.teacher.checkpoint}, not trained"
                 if config.teacher.checkpoint else "from storage")
        print(describe(cached[1], where), flush=True)
    state, meta = cached
    return state, {"teacher_hash": meta.get("hash"), "teacher_val_acc": meta.get("val_acc")}
