"""Training-step benchmark: images/s of each group's step, fed two ways.

``device`` feed: the uint8 images live on the training device and ``train_batches`` crops,
flips and normalizes whole batches there (what ``fit`` does). ``dataloader`` feed: the same
step fed by a torchvision-style pipeline — a ``torch.utils.data.DataLoader`` over PIL
images with ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor`` and
``Normalize`` — the usual CIFAR recipe, for comparison.

Each measurement times ``steps`` optimizer steps after ``warmup`` untimed ones, including
the time to produce the batches. On CUDA it also reports peak memory and the share of the
card's peak bf16 rate reached, from FLOPs counted by ``torch.utils.flop_counter``. Every row
names the precision it ran at, resolved (``"bf16"`` or ``"fp32"``, never ``"auto"``).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrialConfig
from .data import Dataset, train_batches
from .evaluate import synchronizer
from .memory import keep_freed_memory
from .models import build_model
from .precision import resolve_precision
from .train import prepare_teacher, train_step, trainable_modules

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name match.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "L40S": 362.0,
}


@dataclass(frozen=True)
class BenchSpec:
    group: str
    feed: str  # "device" or "dataloader"
    student: str = "resnet18"
    teacher: str = "resnet50"
    width: float = 1.0
    teacher_width: float | None = None  # None: the same as ``width``
    teacher_cbam: bool = True
    batch: int = 64
    device: str = "cpu"
    steps: int = 5
    warmup: int = 2
    workers: int = 2
    compile: bool = False
    precision: str = "auto"  # auto, fp32 or bf16 (autocast of the timed step)


def _config(spec: BenchSpec) -> TrialConfig:
    return TrialConfig.for_group(
        spec.group,
        student=spec.student,
        teacher=spec.teacher,
        student_width=spec.width,
        teacher_width=spec.width if spec.teacher_width is None else spec.teacher_width,
        teacher_cbam=spec.teacher_cbam,
        batch_size=spec.batch,
        device=spec.device,
        compile=spec.compile,
        precision=resolve_precision(spec.precision, spec.device),
    )


class _PILDataset(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) images served one PIL image at a time through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(images.shape[1], padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _batches(spec: BenchSpec, data: Dataset, config: TrialConfig):
    """An endless iterator of (x, y) batches on the training device for ``spec.feed``."""
    device = torch.device(spec.device)
    if spec.feed == "device":
        x, y = data.train_x.to(device), data.train_y.to(device)
        epoch = 0
        while True:
            epoch += 1
            yield from train_batches(
                x, y, spec.batch, seed=0, epoch=epoch, mean=data.mean, std=data.std
            )
    elif spec.feed == "dataloader":
        ds = _PILDataset(data.train_x.numpy(), data.train_y.numpy(), data.mean, data.std)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=spec.batch,
            shuffle=True,
            drop_last=True,
            num_workers=spec.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=spec.workers > 0,
        )
        while True:
            for xb, yb in loader:
                xb = xb.to(device, non_blocking=True)
                if device.type == "cuda":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, yb.to(device, non_blocking=True)
    else:
        raise ValueError(f"feed: expected 'device' or 'dataloader', got {spec.feed!r}")


def step_flops(config: TrialConfig, student, teacher, connectors, optimizer, x, y) -> int:
    """FLOPs of one training step (forward, backward, Grad-CAM), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(config, student, teacher, connectors, optimizer, x, y)
    return counter.get_total_flops()


def peak_bf16_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _setup(spec: BenchSpec, data: Dataset):
    """(config, student, its forward, teacher, connectors, optimizer) for ``spec``."""
    config = _config(spec)
    if not spec.device.startswith("cuda"):
        keep_freed_memory()  # as fit does (kdcore.memory)
    teacher = None
    if config.needs_teacher:
        teacher = prepare_teacher(
            build_model(
                config.teacher,
                data.num_classes,
                width=config.teacher_width,
                cbam=config.teacher_cbam,
            ),
            config,
        )
    student, connectors = trainable_modules(config, data.num_classes, teacher)  # as fit's
    forward = torch.compile(student) if spec.compile else student
    params = list(student.parameters()) + list(connectors.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return config, student, forward, teacher, connectors, optimizer


def run_bench(spec: BenchSpec, data: Dataset) -> dict:
    """Time ``spec.steps`` training steps of one group with one feed; returns a result row."""
    config, student, forward, teacher, connectors, optimizer = _setup(spec, data)
    cuda = spec.device.startswith("cuda")
    batches = _batches(spec, data, config)
    sync = synchronizer(spec.device)

    for _ in range(spec.warmup):
        xb, yb = next(batches)
        train_step(config, forward, teacher, connectors, optimizer, xb, yb)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(spec.steps):
        xb, yb = next(batches)
        train_step(config, forward, teacher, connectors, optimizer, xb, yb)
    sync()
    seconds = time.perf_counter() - t0
    batches.close()  # stops DataLoader workers so they do not compete with later measurements
    images_per_s = spec.steps * spec.batch / seconds
    row = {
        "group": spec.group,
        "feed": spec.feed,
        "device": spec.device,
        "precision": config.precision,
        "batch": spec.batch,
        "student": spec.student,
        "teacher": spec.teacher,
        "width": spec.width,
        "teacher_width": config.teacher_width,
        "steps": spec.steps,
        "images_per_s": images_per_s,
        "step_ms": 1000 * seconds / spec.steps,
        "threads": torch.get_num_threads(),
    }
    flops = step_flops(config, student, teacher, connectors, optimizer, xb, yb)
    row["gflop_per_image"] = flops / spec.batch / 1e9
    row["achieved_tflops"] = flops / spec.batch * images_per_s / 1e12
    if cuda:
        row["gpu_name"] = torch.cuda.get_device_name(torch.device(spec.device))
        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_bf16_tflops(spec.device)
        row["peak_bf16_tflops"] = peak
        row["fraction_of_peak"] = row["achieved_tflops"] / peak if peak else None
    return row


def _worker(spec: BenchSpec, data: Dataset, threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        queue.put(run_bench(spec, data))
    except Exception as exc:  # reported to the parent, which raises
        queue.put({"error": f"{exc.__class__.__name__}: {exc}"})


def run_concurrent(spec: BenchSpec, data: Dataset, k: int, threads: int | None = None) -> dict:
    """K processes each running the same benchmark at once (as K fractional-GPU trials would).

    Returns the total images/s and the per-process rows.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(spec, data, threads, queue)) for _ in range(k)]
    for p in procs:
        p.start()
    rows = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"concurrent benchmark failed: {errors[0]}")
    # The processes start at different times; the sum of rates slightly overstates the overlap
    # only if one finishes long before the others, so report the slowest process too.
    return {
        **{
            k_: rows[0][k_]
            for k_ in ("group", "feed", "device", "precision", "batch", "student", "teacher")
        },
        "concurrent": k,
        "images_per_s": sum(r["images_per_s"] for r in rows),
        "images_per_s_slowest": min(r["images_per_s"] for r in rows) * k,
        "gpu_mem_gib": rows[0].get("gpu_mem_gib"),
    }


def alternate(specs: list[BenchSpec], data: Dataset, rounds: int) -> list[dict]:
    """Time ``specs`` one step each in turn, ``rounds`` times, on one set of models.

    For comparing precisions and feeds on a machine whose load changes from second to second:
    every round sees all specs at nearly the same moment. The specs may differ only in
    ``precision`` and ``feed``. A first round warms every path up untimed. Returns one row per
    spec with the median images/s over rounds (wall clock, and per CPU-second of this process,
    which other processes' load does not inflate on one thread) and the per-round seconds.
    """
    same = {(s.group, s.student, s.teacher, s.width, s.teacher_width, s.teacher_cbam, s.batch,
             s.device, s.compile) for s in specs}
    if len(same) != 1:
        raise ValueError("alternate: specs may differ only in precision and feed")
    _, student, forward, teacher, connectors, optimizer = _setup(specs[0], data)
    configs = [_config(s) for s in specs]
    feeds = [_batches(s, data, c) for s, c in zip(specs, configs, strict=True)]
    sync = synchronizer(specs[0].device)
    wall: list[list[float]] = [[] for _ in specs]
    cpu: list[list[float]] = [[] for _ in specs]
    try:
        for r in range(rounds + 1):
            for i, (config, feed) in enumerate(zip(configs, feeds, strict=True)):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                xb, yb = next(feed)
                train_step(config, forward, teacher, connectors, optimizer, xb, yb)
                sync()
                if r:
                    wall[i].append(time.perf_counter() - t0)
                    cpu[i].append(time.process_time() - c0)
    finally:
        for feed in feeds:
            feed.close()
    batch = specs[0].batch
    return [
        {
            "group": spec.group,
            "feed": spec.feed,
            "precision": config.precision,
            "device": spec.device,
            "batch": batch,
            "width": spec.width,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "images_per_s": batch / statistics.median(w),
            "images_per_cpu_s": batch / statistics.median(c),
            "step_seconds": w,
        }
        for spec, config, w, c in zip(specs, configs, wall, cpu, strict=True)
    ]
