"""Size and speed of a study's architectures, measured once and interleaved: ``speed.json``.

Latency and throughput belong to an architecture, not to a group: every group of a study
trains the same student. Each reproduce run also times its own student (the ``runs``
table's ``latency_ms_bs1``, ``images_per_s_bs256``), but while other runs compete for the
same cores, so those numbers differ between runs by load. ``measure_architectures`` builds
the study's student and teacher once, after the runs have finished (when no trial competes),
and measures them interleaved (``kdcore.evaluate.measure_interleaved``): both see the same
load in the same rounds. The report's "Size and speed (per architecture)" section reads the
file it writes.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from analysis.constants import SPEED_FILE, describe_arch
from kdcore.evaluate import measure_interleaved
from kdcore.models import count_parameters
from kdcore.precision import resolve_precision
from kdcore.zoo import build_network
from search.engine.trainable import frozen_teacher
from search.store import files as fsutil
from search.study import StudyConfig


def speed_json_path(config: StudyConfig) -> str:
    """``<storage>/<study>/speed.json``."""
    return fsutil.join(config.study_dir, SPEED_FILE)


def device_name(device: str) -> str:
    """The GPU's name on CUDA; on the CPU the model name from /proc/cpuinfo where there is one."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_architectures(
    config: StudyConfig, data, teacher_state: dict | None = None, *, rounds: int = 7,
    repeats: int = 5, large_batch: int = 256, large_repeats: int = 1, warmup: int = 2,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure the study's student (and teacher, when ``teacher_state`` is given) interleaved
    on ``config.device`` with ``config.precision``; write and return ``speed.json``.

    The student is built with fresh weights (``kdcore.zoo.build_network`` with the study's
    ``student``, ``student_width``, ``student_cbam`` and ``stem``): latency does not depend on
    weight values. The teacher is ``search.engine.trainable.frozen_teacher`` of ``teacher_state``.
    ``data`` gives the number of classes and the image shape (its test images). ``threads``
    sets torch's intra-op threads for the measurement (restored afterwards); None keeps the
    current setting. Call it when no trial runs: nothing else should compete.

    ``<study_dir>/speed.json`` (written atomically) holds the conditions — ``study``,
    ``measured_at``, ``device``, ``device_name``, ``precision`` (resolved), ``torch_threads``,
    ``torch`` (version), ``rounds``, ``repeats_bs1``, ``large_batch``, ``repeats_large``,
    ``warmup``, ``image_shape`` — and ``models``: per role (``student``, ``teacher``) its
    ``arch`` (one line), ``spec``, ``params``, the ``groups`` that use it (student only),
    ``latency_ms_bs1`` (ms per image at batch 1) and ``images_per_s`` (at ``large_batch``),
    each as {median, q1, q3, min, max, rounds} over the rounds.
    """
    num_classes = data.num_classes
    shape = tuple(int(data.test_x.shape[i]) for i in (3, 1, 2))  # (N, H, W, C) -> (C, H, W)
    specs = {"student": {"arch": config.student, "width": config.student_width,
                         "cbam": config.student_cbam, "stem": config.stem}}
    models = {"student": build_network(config.student, num_classes, config.stem,
                                       config.student_width, config.student_cbam)}
    if teacher_state is not None:
        t = config.teacher
        specs["teacher"] = {"arch": t.arch, "width": t.width, "cbam": t.cbam, "stem": t.stem}
        models["teacher"] = frozen_teacher(config, teacher_state, num_classes, shape[1:])
    precision = resolve_precision(config.precision, config.device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        measured = measure_interleaved(
            models, shape, config.device, rounds=rounds, repeats=repeats,
            large_batch=large_batch, large_repeats=large_repeats, warmup=warmup,
            precision=precision)
    finally:
        torch.set_num_threads(before)
    doc: dict[str, Any] = {
        "study": config.study, "measured_at": time.time(), "device": config.device,
        "device_name": device_name(config.device), "precision": precision,
        "torch_threads": used_threads, "torch": torch.__version__, "rounds": rounds,
        "repeats_bs1": repeats, "large_batch": large_batch, "repeats_large": large_repeats,
        "warmup": warmup, "image_shape": list(shape), "models": {},
    }
    for role, model in models.items():
        entry = {"arch": describe_arch(**specs[role]), "spec": specs[role],
                 "params": count_parameters(model)}
        if role == "student":
            entry["groups"] = list(config.groups)
        entry["latency_ms_bs1"] = measured[role]["latency_ms_bs1"]
        entry["images_per_s"] = measured[role]["images_per_s"]
        doc["models"][role] = entry
    fsutil.write_bytes(speed_json_path(config), json.dumps(doc, indent=2).encode())
    return doc
