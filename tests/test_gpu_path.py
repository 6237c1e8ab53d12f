"""The GPU code path: its logic on the CPU (CI has no GPU), and the real thing where CUDA exists."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kdcore import TrialConfig, fit, load_data
from kdcore.bench import BenchSpec, alternate, run_bench, run_concurrent
from kdcore.data import normalize
from kdcore.evaluate import accuracy, evaluate_student
from kdcore.models import build_model
from kdcore.precision import CPU_BF16_ENV, cpu_supports_bf16, resolve_precision
from kdcore.train import use_bf16
from search.commands.cli import main

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TINY = {"student_width": 0.125, "teacher_width": 0.125, "batch_size": 16}


def test_precision_defaults_follow_device(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert use_bf16(TrialConfig(device="cuda")) is True
    assert use_bf16(TrialConfig(device="cuda", precision="fp32")) is False
    assert use_bf16(TrialConfig(device="cpu")) is False
    assert use_bf16(TrialConfig(device="cpu", precision="bf16")) is True
    assert resolve_precision("auto", "mps") == "fp32"
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # a CPU with bf16 in hardware
    assert use_bf16(TrialConfig(device="cpu")) is True
    assert use_bf16(TrialConfig(device="cpu", precision="fp32")) is False
    with pytest.raises(ValueError, match="^precision:"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx512_bf16": False, "amx_bf16": True}, True),
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, False),
        ({"architecture": "arm64"}, False),
    ],
)
def test_cpu_bf16_detection_reads_capabilities(monkeypatch, caps, expected):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_supports_bf16() is expected
    assert resolve_precision("auto", "cpu") == ("bf16" if expected else "fp32")
    monkeypatch.setenv(CPU_BF16_ENV, "0" if expected else "1")  # the override wins
    assert cpu_supports_bf16() is (not expected)


class _DtypeProbe(torch.nn.Module):
    """A linear classifier that records the dtype its logits were computed in."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)
        self.dtypes = []

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        self.dtypes.append(logits.dtype)
        return logits, {}


def test_evaluation_runs_under_the_requested_precision():
    data = load_data("synthetic:4", val_size=8)
    data = dataclasses.replace(data, test_x=data.test_x[:, :8, :8])  # 8x8 keeps the probe tiny
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        probe = _DtypeProbe()
        out = evaluate_student(probe, data, precision=precision, with_robustness=False,
                               speed_repeats=3)
        assert out["metrics"]["precision"] == precision
        assert probe.dtypes and set(probe.dtypes) == {dtype}  # accuracy and speed alike
        _, acc = accuracy(probe, data.test_x, data.test_y, data.mean, data.std,
                          precision=precision)
        assert 0.0 <= acc <= 1.0 and probe.dtypes[-1] == dtype


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


def test_bench_rows_and_concurrent_total_on_cpu(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # rows name the resolved precision, never "auto"
    data = load_data("synthetic:8", val_size=10)
    spec = BenchSpec(group="kd", feed="device", width=0.125, batch=8, steps=2, warmup=1)
    row = run_bench(spec, data)
    assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    assert row["precision"] == "bf16"
    fp32 = run_bench(BenchSpec(group="kd", feed="device", width=0.125, batch=8, steps=2,
                               warmup=1, precision="fp32"), data)
    assert fp32["precision"] == "fp32"
    dl = run_bench(BenchSpec(group="kd", feed="dataloader", width=0.125, batch=8, steps=2,
                             warmup=1, workers=0), data)
    assert dl["feed"] == "dataloader"
    assert dl["gflop_per_image"] == pytest.approx(row["gflop_per_image"])
    both = run_concurrent(spec, data, k=2, threads=1)
    assert both["concurrent"] == 2 and both["images_per_s"] > 0
    assert both["precision"] == "bf16"


def test_alternate_times_each_spec_every_round(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    data = load_data("synthetic:8", val_size=10)
    specs = [BenchSpec(group="kd", feed="device", width=0.125, batch=8, precision=p)
             for p in ("auto", "bf16")]
    specs.append(BenchSpec(group="kd", feed="dataloader", width=0.125, batch=8, workers=0,
                           precision="fp32"))
    rows = alternate(specs, data, rounds=2)
    assert [(r["feed"], r["precision"]) for r in rows] == [
        ("device", "fp32"), ("device", "bf16"), ("dataloader", "fp32")]
    for r in rows:
        assert len(r["step_seconds"]) == 2 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0
    with pytest.raises(ValueError, match="^alternate:"):
        alternate([specs[0], BenchSpec(group="at", feed="device", width=0.125, batch=8)], data, 1)


@pytest.mark.parametrize(("flag", "cpu_bf16", "expected"),
                         [("auto", "0", "fp32"), ("auto", "1", "bf16"), ("fp32", "1", "fp32"),
                          ("bf16", "0", "bf16")])
def test_bench_cli_json_lines(capsys, monkeypatch, flag, cpu_bf16, expected):
    monkeypatch.setenv(CPU_BF16_ENV, cpu_bf16)
    rc = main(["bench", "--data", "synthetic:8", "--group", "at", "--width", "0.125",
               "--batch", "8", "--steps", "1", "--warmup", "1", "--workers", "0", "--json",
               "--precision", flag])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["group"], r["feed"]) for r in rows] == [("at", "device"), ("at", "dataloader")]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert [r["precision"] for r in rows] == [expected, expected]


@pytest.mark.parametrize(("cpu_bf16", "expected"), [("1", ["bf16", "fp32"]), ("0", ["fp32"])])
def test_bench_default_times_bf16_against_fp32_in_one_run(capsys, monkeypatch, cpu_bf16,
                                                          expected):
    monkeypatch.setenv(CPU_BF16_ENV, cpu_bf16)
    rc = main(["bench", "--data", "synthetic:8", "--group", "kd", "--width", "0.125",
               "--batch", "8", "--steps", "1", "--warmup", "1", "--feeds", "device", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["precision"] for r in rows] == expected  # auto resolved; fp32 not timed twice


def test_bench_cli_rejects_an_unknown_precision(capsys):
    assert main(["bench", "--data", "synthetic:8", "--precision", "auto,fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision" in err[0]


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


def test_keep_freed_memory_sets_glibc_thresholds(monkeypatch):
    import kdcore.memory as memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: FakeLibc())
    assert memory.keep_freed_memory() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30), (-2, 256 << 20)]
    assert memory.keep_freed_memory() is True and len(calls) == 3  # once per process
    monkeypatch.setattr(memory, "_applied", False)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))  # e.g. musl
    assert memory.keep_freed_memory() is False and len(calls) == 3


def test_fit_on_cpu_keeps_freed_memory(synthetic, count_calls):
    import kdcore.train as ktrain

    calls = count_calls(ktrain, "keep_freed_memory")
    fit(TrialConfig(epochs=1, student_width=0.125, batch_size=32, precision="fp32"), synthetic)
    assert calls["n"] == 1
