"""Numeric precision of training and evaluation: fp32, or bf16 autocast where it pays.

``precision="auto"`` means bf16 autocast on CUDA and on CPUs with bf16 arithmetic in hardware
(AVX512-BF16 or AMX-BF16: most current x86 server CPUs), fp32 everywhere else. Inside
autocast the convolutions and matrix products run in bf16; every loss term converts its
inputs to fp32 first (see ``losses.py``), and parameters, gradients and optimizer state stay
fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .names import PRECISIONS

# "1" or "0" forces the answer of ``cpu_supports_bf16`` (tests; CPUs torch misreads).
CPU_BF16_ENV = "KDSEARCH_CPU_BF16"


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16).

    Read at run time from ``torch.cpu.get_capabilities()``; ``$KDSEARCH_CPU_BF16`` set to
    ``1`` or ``0`` overrides it. Other CPUs (and torch builds without the query) answer
    False: there bf16 autocast is emulated and slower than fp32.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return False
    caps = get()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` (auto, fp32 or bf16) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_supports_bf16()):
        return "bf16"
    return "fp32"


def autocast(precision: str, device: str | torch.device):
    """A bf16 autocast context for ``device`` when ``precision`` resolves to bf16, else a no-op."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
