"""Shared fixtures: a small thread budget and the location of the real CIFAR-10 JPEG copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: the test models are tiny, and on a shared 2-core machine two
# OpenMP threads spin at every barrier while the other core is busy (measured: a 14 s subset
# took 350 s with 2 threads under load, 17 s with 1). KDSEARCH_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("KDSEARCH_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic():
    """A small learnable synthetic dataset (200 train images, 40 of them validation)."""
    from kdcore.data import load_data

    return load_data("synthetic:20", val_size=40)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, name)`` wraps ``owner.name`` and returns ``{"n": calls so far}``."""

    def wrap(owner, name: str) -> dict:
        calls = {"n": 0}
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return wrap


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Root of CIFAR-10 in ImageFolder layout (``train/``, ``test/``).

    Taken from ``KDSEARCH_DATA`` (a spec ``imagefolder:PATH``) or ``<repo>/../shared/data/
    cifar10-jpeg``; the test is skipped when neither exists, except in CI (``CI=true``),
    which must have the data and run these tests.
    """
    spec = os.environ.get("KDSEARCH_DATA", "")
    if spec:
        kind, _, path = spec.partition(":")
        if kind != "imagefolder" or not path:
            pytest.skip(f"KDSEARCH_DATA={spec!r} is not an imagefolder:PATH spec")
        root = Path(path).expanduser()
    else:
        root = REPO.parent / "shared" / "data" / "cifar10-jpeg"
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        reason = f"real CIFAR-10 data not found at {root} (set KDSEARCH_DATA=imagefolder:PATH)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the real-data tests: {reason}")
        pytest.skip(reason)
    return root
