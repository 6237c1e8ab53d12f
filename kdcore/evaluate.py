"""Evaluation of a trained student: clean test accuracy, corruptions, size and speed.

Corruptions follow the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019) at severities
1-5, applied on the device to whole batches of [0, 1] images before normalization. Random
corruptions draw from a generator seeded by (corruption, severity), so every model sees the
same corrupted images.

``precision`` (auto, fp32 or bf16; ``kdcore.precision``) sets the autocast of every forward
pass here, as in training: corruptions are applied in fp32, the model runs under autocast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import count_parameters
from .precision import autocast, resolve_precision

# Severity parameters (index 0 = severity 1), after CIFAR-10-C's choices for 32x32 images.
# Those measured in pixels (the blur's sigma and its 5-pixel kernel) scale with the image's
# size / 32 (``blur_params``); the others are intensities or shares, the same at any size.
REFERENCE_SIZE = 32
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels at 32x32
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to every channel
    "occlusion": (0.1, 0.2, 0.3, 0.4, 0.5),  # side of a grey square, as a share of the image
}
CORRUPTIONS = tuple(SEVERITY)


def blur_params(sigma: float, size: int) -> tuple[int, float]:
    """(odd kernel size, sigma) of a blur of ``sigma`` pixels at 32 px along an axis of
    ``size`` pixels: both scale with size / 32 (5 and ``sigma`` at 32, 9 and 2 x ``sigma``
    at 64; the kernel's half width is 2 x size / 32 rounded half up, at least 1)."""
    scale = size / REFERENCE_SIZE
    return 2 * max(1, int(2 * scale + 0.5)) + 1, sigma * scale


def corrupt(x: Tensor, corruption: str, severity: int, g: torch.Generator) -> Tensor:
    """Corrupt a float (B, C, H, W) batch in [0, 1]; ``g`` is a CPU generator.

    Exactly CIFAR-10-C's severities at 32x32; pixel-measured ones scale with the size.
    """
    import torchvision.transforms.v2.functional as TF  # here: training needs no torchvision

    c = SEVERITY[corruption][severity - 1]
    b, _, h, w = x.shape

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(x.device)

    if corruption == "gaussian_noise":
        out = x + torch.randn(x.shape, generator=g).to(x.device) * c
    elif corruption == "shot_noise":
        out = torch.poisson(x.cpu() * c, generator=g).to(x.device) / c
    elif corruption == "impulse_noise":
        u = rand(b, 1, h, w)
        out = torch.where(u < c / 2, 0.0, torch.where(u > 1 - c / 2, 1.0, x))
    elif corruption == "gaussian_blur":
        (kx, sx), (ky, sy) = blur_params(c, w), blur_params(c, h)
        out = TF.gaussian_blur(x, kernel_size=[kx, ky], sigma=[sx, sy])
    elif corruption == "contrast":
        out = TF.adjust_contrast(x, c)
    elif corruption == "brightness":
        out = x + c
    elif corruption == "occlusion":
        side = max(1, round(c * h))
        top = (rand(b) * (h - side + 1)).long()
        left = (rand(b) * (w - side + 1)).long()
        rows = torch.arange(h, device=x.device)[None, :, None]
        cols = torch.arange(w, device=x.device)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + side)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + side)[:, None, None])
        )
        out = torch.where(inside[:, None], 0.5, x)
    else:
        raise ValueError(f"corruption: unknown {corruption!r}, expected one of {list(CORRUPTIONS)}")
    return out.clamp(0.0, 1.0)


@torch.no_grad()
def cross_entropy_and_accuracy(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device, precision: str = "auto"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` over normalized ``(x, y)`` batches.

    Each forward runs under ``precision``'s autocast on ``device``, where the sums stay until
    they are read once at the end. The one scoring loop behind ``accuracy`` and
    ``kdcore.train.evaluate_split``.
    """
    precision = resolve_precision(precision, device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for xb, yb in batches:
        with autocast(precision, device):
            logits, _ = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
        n += len(yb)
    n = max(n, 1)
    return loss_sum.item() / n, correct.item() / n


@torch.no_grad()
def accuracy(model: nn.Module, x_uint8: Tensor, y: Tensor, mean, std, batch_size: int = 512,
             transform: Callable[[Tensor], Tensor] | None = None, precision: str = "auto",
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on uint8 (N, H, W, C) images, optionally transformed.

    ``transform`` gets each batch as float [0, 1] images before normalization, outside
    autocast.
    """
    model.eval()
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(y), batch_size):
            xb = x_uint8[i : i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0
            if transform is not None:
                xb = transform(xb)
            yield (xb - m) / s, y[i : i + batch_size].to(device)

    return cross_entropy_and_accuracy(model, batches(), device, precision)


def robustness(model: nn.Module, x_uint8: Tensor, y: Tensor, mean, std, batch_size: int = 512,
               corruptions: tuple[str, ...] = CORRUPTIONS,
               severities: tuple[int, ...] = (1, 2, 3, 4, 5), precision: str = "auto",
               ) -> list[dict]:
    """Accuracy under each corruption and severity: rows of {corruption, severity, acc}."""
    rows = []
    for ci, name in enumerate(corruptions):
        for sev in severities:
            g = torch.Generator().manual_seed(1000 * ci + sev)
            _, acc = accuracy(
                model,
                x_uint8,
                y,
                mean,
                std,
                batch_size,
                transform=lambda xb, n=name, s=sev, g=g: corrupt(xb, n, s, g),
                precision=precision,
            )
            rows.append({"corruption": name, "severity": sev, "acc": acc})
    return rows


def synchronizer(device) -> Callable[[], None]:
    """What waits for ``device``'s queued work: ``torch.cuda.synchronize`` on CUDA, else nothing.

    Timers call it before reading the clock (here, ``kdcore.bench``, ``kdcore.train``).
    """
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _block_seconds(model: nn.Module, x: Tensor, forwards: int, sync: Callable[[], None],
                   clock: Callable[[], float]) -> float:
    """Wall seconds of ``forwards`` forward passes of ``model`` on ``x``, timed as one block."""
    sync()
    t0 = clock()
    for _ in range(forwards):
        model(x)
    sync()
    return clock() - t0


@torch.no_grad()
def speed(
    model: nn.Module,
    image_shape=(3, 32, 32),
    device: str = "cpu",
    repeats: int = 20,
    large_batch: int = 256,
    precision: str = "auto",
) -> dict:
    """Median latency per sample at batch 1 (ms) and throughput at ``large_batch`` (images/s).

    One model measured on its own: whatever else runs on the machine at that moment is in
    the number. To compare models, use :func:`measure_interleaved`.
    """
    model = model.to(device).eval()
    sync = synchronizer(device)

    def median_seconds(batch: int, n: int) -> float:
        x = torch.randn(batch, *image_shape, device=device)
        with autocast(precision, device):
            model(x)  # warm-up
            times = [_block_seconds(model, x, 1, sync, time.perf_counter) for _ in range(n)]
        return sorted(times)[len(times) // 2]

    return {
        "latency_ms_bs1": 1000 * median_seconds(1, repeats),
        f"images_per_s_bs{large_batch}": large_batch
        / median_seconds(large_batch, max(3, repeats // 5)),
    }


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between order statistics
    (numpy's default): position ``q * (n - 1)`` of the sorted values."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles (q1, q3), min and max of per-round values, and the values in order."""
    return {"median": quantile(values, 0.5), "q1": quantile(values, 0.25),
            "q3": quantile(values, 0.75), "min": min(values), "max": max(values),
            "rounds": list(values)}


@torch.no_grad()
def measure_interleaved(
    models: Mapping[str, nn.Module],
    image_shape=(3, 32, 32),
    device: str = "cpu",
    rounds: int = 7,
    repeats: int = 5,
    large_batch: int = 256,
    large_repeats: int = 1,
    warmup: int = 2,
    precision: str = "auto",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict]:
    """Latency at batch 1 and throughput at ``large_batch`` of several models, interleaved.

    Measuring models one after the other puts whatever else the machine does at that time
    into one model's number only (two runs of the same architecture measured 6.6 and 2.0 ms
    per image while other runs competed for the cores). Here every model is warmed up
    (``warmup`` untimed forwards at each batch size), then ``rounds`` rounds run; in each
    round every model, in turn, times ``repeats`` forwards at batch 1 as one block, then
    every model times ``large_repeats`` forwards at ``large_batch``. The order rotates by
    one model per round (round r starts with model r mod n), so no model always runs first
    or right after the large batches. A load that comes and goes then falls on all models
    in the same rounds.

    Returns, per model name: ``latency_ms_bs1`` (ms per image at batch 1: block seconds /
    ``repeats``) and ``images_per_s`` (``large_batch`` x ``large_repeats`` / block seconds),
    each as :func:`spread` over the rounds (median, q1, q3, min, max, per-round values),
    plus ``large_batch``. ``clock`` (seconds) is there for tests.
    """
    if rounds < 1 or repeats < 1 or large_repeats < 1 or warmup < 0 or not models:
        raise ValueError("measure_interleaved: needs models, rounds, repeats and "
                         f"large_repeats >= 1, warmup >= 0 (got {len(models)} models, "
                         f"{rounds}, {repeats}, {large_repeats}, {warmup})")
    names = list(models)
    nets = {name: models[name].to(device).eval() for name in names}
    sync = synchronizer(device)
    small = torch.randn(1, *image_shape, device=device)
    large = torch.randn(large_batch, *image_shape, device=device)
    latency: dict[str, list[float]] = {name: [] for name in names}
    throughput: dict[str, list[float]] = {name: [] for name in names}
    with autocast(precision, device):
        for name in names:
            for x in (small, large):
                for _ in range(warmup):
                    nets[name](x)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                seconds = _block_seconds(nets[name], small, repeats, sync, clock)
                latency[name].append(1000 * seconds / repeats)
            for name in order:
                seconds = _block_seconds(nets[name], large, large_repeats, sync, clock)
                images = large_batch * large_repeats
                throughput[name].append(images / seconds if seconds > 0 else math.inf)
    return {name: {"latency_ms_bs1": spread(latency[name]),
                   "images_per_s": spread(throughput[name]), "large_batch": large_batch}
            for name in names}


def evaluate_student(
    model: nn.Module,
    data,
    device: str = "cpu",
    batch_size: int = 512,
    with_robustness: bool = True,
    speed_repeats: int = 20,
    precision: str = "auto",
) -> dict:
    """Everything ``reproduce`` records for one student: test metrics, robustness, size, speed.

    ``metrics["precision"]`` names the resolved precision (``"bf16"`` or ``"fp32"``).
    """
    model = model.to(device).eval()
    precision = resolve_precision(precision, device)
    test_loss, test_acc = accuracy(
        model, data.test_x, data.test_y, data.mean, data.std, batch_size, precision=precision
    )
    rows = (
        robustness(
            model, data.test_x, data.test_y, data.mean, data.std, batch_size, precision=precision
        )
        if with_robustness
        else []
    )
    shape = tuple(data.test_x.shape[i] for i in (3, 1, 2))
    result = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "corrupt_acc_mean": sum(r["acc"] for r in rows) / len(rows) if rows else float("nan"),
        "params": count_parameters(model),
        "precision": precision,
        **speed(model, shape, device, speed_repeats, precision=precision),
    }
    return {"metrics": result, "robustness": rows}
