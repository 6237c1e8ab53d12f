"""The presets: ``smoke``, ``laptop`` and ``paper`` (README, docs/SEARCH.md)."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on 2 CPU cores: tiny widths, a class-balanced subset, a few epochs and trials.
    "smoke": {
        "study": "smoke", "samples": 4, "max_epochs": 3, "grace_period": 1,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 0.125,
        "teacher": {"arch": "resnet50", "width": 0.125, "cbam": True, "epochs": 8,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.05, "patience": 0, "val_size": 200,
        "train_per_class": 100, "test_per_class": 50, "cpus_per_trial": 1.0,
        "gpus_per_trial": 0.0, "device": "cpu", "seeds": 2,
    },
    # Real CIFAR-10 on a 2-core CPU (bf16) in at most 90 minutes, whole pipeline; sized by
    # measurement in docs/SEARCH.md ("The laptop preset"). A ResNet-50 teacher without CBAM
    # (CBAM costs 2-4x its forward on CPU) trained 45 epochs vs students trained 8. 12 trials
    # per group: in the replays of docs/PERFORMANCE.md ("Search efficiency") 8 reached the
    # bank's 90th percentile in 30% of at's searches, 12 in 57%, for 1.5x the epochs.
    "laptop": {
        "study": "laptop", "samples": 12, "max_epochs": 8, "grace_period": 2,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 0.25,
        "teacher": {"arch": "resnet50", "width": 0.25, "cbam": False, "epochs": 45,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine", "patience": 0,
        "precision": "auto", "val_size": 1000, "train_per_class": 500, "test_per_class": 300,
        "cpus_per_trial": 1.0, "gpus_per_trial": 0.0, "device": "cpu", "seeds": 5,
    },
    # The paper's protocol (DESIGN.md) on full CIFAR-10, for GPUs and clusters.
    "paper": {
        "study": "paper", "samples": 48, "max_epochs": 30, "grace_period": 5,
        "reduction_factor": 2.0, "student": "resnet18", "student_width": 1.0,
        "teacher": {"arch": "resnet50", "width": 1.0, "cbam": True, "epochs": 30,
                    "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "constant", "patience": 5, "val_size": 5000,
        "cpus_per_trial": 2.0, "gpus_per_trial": 1.0,
        "device": "cuda", "seeds": 5,
    },
}
