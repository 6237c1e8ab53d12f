"""Evaluation of a trained student: clean test accuracy, corruptions, size and speed.

Corruptions follow the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019) at severities
1-5, applied on the device to whole batches of [0, 1] images before normalization. Random
corruptions draw from a generator seeded by (corruption, severity), so every model sees the
same corrupted images.

``precision`` (auto, fp32 or bf16; ``kdcore.precision``) sets the autocast of every forward
pass here, as in training: corruptions are applied in fp32, the model runs under autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from .models import count_parameters
from .precision import autocast, resolve_precision

# Severity parameters (index 0 = severity 1), after CIFAR-10-C's choices for 32x32 images.
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to every channel
    "occlusion": (0.1, 0.2, 0.3, 0.4, 0.5),  # side of a grey square, as a share of the image
}
CORRUPTIONS = tuple(SEVERITY)


def corrupt(x: Tensor, corruption: str, severity: int, g: torch.Generator) -> Tensor:
    """Corrupt a float (B, C, H, W) batch in [0, 1]; ``g`` is a CPU generator."""
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
        out = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[c, c])
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
def accuracy(
    model: nn.Module,
    x_uint8: Tensor,
    y: Tensor,
    mean,
    std,
    batch_size: int = 512,
    transform: Callable[[Tensor], Tensor] | None = None,
    precision: str = "auto",
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on uint8 (N, H, W, C) images, optionally transformed."""
    model.eval()
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(y), batch_size):
        xb = x_uint8[i : i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0
        if transform is not None:
            xb = transform(xb)
        yb = y[i : i + batch_size].to(device)
        with autocast(precision, device):
            logits, _ = model((xb - m) / s)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = max(len(y), 1)
    return loss_sum.item() / n, correct.item() / n


def robustness(
    model: nn.Module,
    x_uint8: Tensor,
    y: Tensor,
    mean,
    std,
    batch_size: int = 512,
    corruptions: tuple[str, ...] = CORRUPTIONS,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    precision: str = "auto",
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


@torch.no_grad()
def speed(
    model: nn.Module,
    image_shape=(3, 32, 32),
    device: str = "cpu",
    repeats: int = 20,
    large_batch: int = 256,
    precision: str = "auto",
) -> dict:
    """Median latency per sample at batch 1 (ms) and throughput at ``large_batch`` (images/s)."""
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def median_seconds(batch: int, n: int) -> float:
        x = torch.randn(batch, *image_shape, device=device)
        with autocast(precision, device):
            model(x)  # warm-up
            times = []
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return {
        "latency_ms_bs1": 1000 * median_seconds(1, repeats),
        f"images_per_s_bs{large_batch}": large_batch
        / median_seconds(large_batch, max(3, repeats // 5)),
    }


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
