"""The GPU code path: its logic on the CPU (CI has no GPU), and the real thing where CUDA exists."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdcore import TrialConfig, fit, load_data
from kdcore.bench import BenchSpec, run_bench, run_concurrent
from kdcore.data import normalize
from kdcore.models import build_model
from kdcore.train import use_bf16
from search.cli import main

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TINY = {"student_width": 0.125, "teacher_width": 0.125, "batch_size": 16}


def test_precision_defaults_follow_device():
    assert use_bf16(TrialConfig(device="cuda")) is True
    assert use_bf16(TrialConfig(device="cuda", precision="fp32")) is False
    assert use_bf16(TrialConfig(device="cpu")) is False
    assert use_bf16(TrialConfig(device="cpu", precision="bf16")) is True


def test_normalized_batches_are_channels_last():
    x = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (4, 3, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[1, 2, 3, 4], (x[1, 3, 4, 2].float() / 255 - 0.5) / 0.25)


def test_bf16_autocast_path_trains_and_reports_float_metrics():
    """The bf16 branch of fit (the CUDA default) runs on CPU autocast with finite metrics."""
    data = load_data("synthetic:8", val_size=20)
    teacher = build_model("resnet50", 10, width=0.125, cbam=True)
    cfg = TrialConfig.for_group("combined", precision="bf16", epochs=1, **TINY)
    seen = []
    result = fit(cfg, data, teacher, report=lambda m, s: seen.append(m))
    assert result.epochs_run == 1
    for key in ("train_loss", "loss_ce", "loss_kl", "loss_at", "loss_fa", "val_loss"):
        assert math.isfinite(seen[0][key]), key
    assert abs(sum(seen[0][f"gshare_{t}"] for t in ("ce", "kl", "at", "fa")) - 1) < 1e-4


def test_bench_rows_and_concurrent_total_on_cpu():
    data = load_data("synthetic:8", val_size=10)
    spec = BenchSpec(group="kd", feed="device", width=0.125, batch=8, steps=2, warmup=1)
    row = run_bench(spec, data)
    assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    dl = run_bench(BenchSpec(group="kd", feed="dataloader", width=0.125, batch=8, steps=2,
                             warmup=1, workers=0), data)
    assert dl["feed"] == "dataloader"
    assert dl["gflop_per_image"] == pytest.approx(row["gflop_per_image"])
    both = run_concurrent(spec, data, k=2, threads=1)
    assert both["concurrent"] == 2 and both["images_per_s"] > 0


def test_bench_cli_json_lines(capsys):
    rc = main(["bench", "--data", "synthetic:8", "--group", "at", "--width", "0.125",
               "--batch", "8", "--steps", "1", "--warmup", "1", "--workers", "0", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["group"], r["feed"]) for r in rows] == [("at", "device"), ("at", "dataloader")]
    assert all(r["images_per_s"] > 0 for r in rows)


def test_bench_cli_rejects_bad_batch(capsys):
    assert main(["bench", "--data", "synthetic:8", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch" in err[0]


@pytest.mark.cuda
@cuda
def test_cuda_fit_all_groups_bf16_channels_last():
    data = load_data("synthetic:16", val_size=40)
    teacher = build_model("resnet50", 10, width=0.25, cbam=True)
    for group in ("baseline", "kd", "fa", "at", "combined"):
        cfg = TrialConfig.for_group(group, device="cuda", epochs=2, **TINY)
        result = fit(cfg, data, teacher)
        assert result.epochs_run == 2 and result.best_val_acc > 0
        assert next(result.student.parameters()).is_cuda


@pytest.mark.cuda
@cuda
def test_cuda_resume_matches_uninterrupted():
    data = load_data("synthetic:16", val_size=40)
    teacher = build_model("resnet50", 10, width=0.25, cbam=True)
    cfg = TrialConfig.for_group("at", device="cuda", epochs=3, precision="fp32", **TINY)
    torch.backends.cudnn.deterministic = True
    full = fit(cfg, data, teacher).history
    states = []
    first = TrialConfig.for_group("at", device="cuda", epochs=1, precision="fp32", **TINY)
    fit(first, data, teacher, report=lambda m, s: states.append(s))
    resumed = fit(cfg, data, teacher, checkpoint=states[-1]).history
    assert resumed[-1]["val_acc"] == pytest.approx(full[-1]["val_acc"], abs=0.05)


@pytest.mark.cuda
@cuda
def test_cuda_gradcam_gives_no_weight_gradients():
    from kdcore.masks import gradcam_masks

    teacher = build_model("resnet50", 10, width=0.25, cbam=True).cuda().eval().requires_grad_(False)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, masks = gradcam_masks(teacher, x, y, ("layer3", "layer4"), 50)
    assert masks["layer3"].shape == (8, 8, 8)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.cuda
@cuda
def test_cuda_training_steps_never_synchronize_the_host():
    """Steps fed by the device loader issue no host synchronization (the epoch's reads do)."""
    from kdcore.data import train_batches
    from kdcore.objective import build_connectors
    from kdcore.train import build_student, prepare_teacher, train_step

    data = load_data("synthetic:16", val_size=40).to("cuda")
    cfg = TrialConfig.for_group("combined", device="cuda", **TINY)
    student = build_student(cfg, 10).cuda().to(memory_format=torch.channels_last)
    teacher = prepare_teacher(build_model("resnet50", 10, width=0.125, cbam=True), cfg)
    connectors = build_connectors(cfg, student, teacher).cuda()
    optimizer = torch.optim.SGD([*student.parameters(), *connectors.parameters()], lr=0.01)
    batches = train_batches(data.train_x, data.train_y, 16, seed=0, epoch=1,
                            mean=data.mean, std=data.std)
    first = next(batches)  # the epoch's permutation is copied to the device once, here
    train_step(cfg, student, teacher, connectors, optimizer, *first,
               share_params=list(student.parameters()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _, (xb, yb) in zip(range(3), batches, strict=False):
            train_step(cfg, student, teacher, connectors, optimizer, xb, yb,
                       share_params=list(student.parameters()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
