"""Training-step benchmark: images/s of each group's step, fed two ways.

``device`` feed: the uint8 images live on the training device and ``train_batches`` crops,
flips and normalizes whole batches there (what ``fit`` does). ``dataloader`` feed: the same
step fed by a torchvision-style pipeline — a ``torch.utils.data.DataLoader`` over PIL
images with ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor`` and
``Normalize`` — the usual CIFAR recipe, for comparison.

Each measurement times ``steps`` optimizer steps after ``warmup`` untimed ones, including
the time to produce the batches. On CUDA it also reports peak memory and the share of the
card's peak bf16 rate reached, from FLOPs counted by ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrialConfig
from .data import Dataset, train_batches
from .models import build_model
from .objective import build_connectors
from .train import build_student, prepare_teacher, train_step

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
    batch: int = 64
    device: str = "cpu"
    steps: int = 5
    warmup: int = 2
    workers: int = 2
    compile: bool = False


def _config(spec: BenchSpec) -> TrialConfig:
    return TrialConfig.for_group(
        spec.group,
        student=spec.student,
        teacher=spec.teacher,
        student_width=spec.width,
        teacher_width=spec.width,
        batch_size=spec.batch,
        device=spec.device,
        compile=spec.compile,
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


def run_bench(spec: BenchSpec, data: Dataset) -> dict:
    """Time ``spec.steps`` training steps of one group with one feed; returns a result row."""
    config = _config(spec)
    cuda = spec.device.startswith("cuda")
    student = build_student(config, data.num_classes).to(spec.device)
    teacher = None
    if config.needs_teacher:
        teacher = prepare_teacher(
            build_model(spec.teacher, data.num_classes, width=spec.width, cbam=True), config
        )
    connectors = build_connectors(config, student, teacher).to(spec.device)
    if cuda:
        student = student.to(memory_format=torch.channels_last)
        connectors = connectors.to(memory_format=torch.channels_last)
    forward = torch.compile(student) if spec.compile else student
    params = list(student.parameters()) + list(connectors.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    batches = _batches(spec, data, config)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

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
        "batch": spec.batch,
        "student": spec.student,
        "teacher": spec.teacher,
        "width": spec.width,
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
        **{k_: rows[0][k_] for k_ in ("group", "feed", "device", "batch", "student", "teacher")},
        "concurrent": k,
        "images_per_s": sum(r["images_per_s"] for r in rows),
        "images_per_s_slowest": min(r["images_per_s"] for r in rows) * k,
        "gpu_mem_gib": rows[0].get("gpu_mem_gib"),
    }
