"""Shared fixtures: a small thread budget and the location of the real CIFAR-10 JPEG copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Root of CIFAR-10 in ImageFolder layout (``train/``, ``test/``).

    Taken from ``KDSEARCH_DATA`` (a spec ``imagefolder:PATH``) or ``<repo>/../shared/data/
    cifar10-jpeg``; the test is skipped when neither exists.
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
        pytest.skip(f"real CIFAR-10 data not found at {root} (set KDSEARCH_DATA=imagefolder:PATH)")
    return root
