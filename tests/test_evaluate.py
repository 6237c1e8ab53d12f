"""Speed measurement: ``kdcore.evaluate.measure_interleaved`` and ``search.engine.speed``.

No assertion here depends on how fast this machine is: a fake clock and fake models make
every timing a hand-computed number.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kdcore.evaluate import measure_interleaved, quantile


class FakeClock:
    """Seconds that pass only when a fake model runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeNet(nn.Module):
    """Logs (name, batch) per forward and advances the clock by ``cost(now, batch)``."""

    def __init__(self, name: str, clock: FakeClock, log: list, cost) -> None:
        super().__init__()
        self.name, self.clock, self.log, self.cost = name, clock, log, cost
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor):
        self.log.append((self.name, x.shape[0]))
        self.clock.now += self.cost(self.clock.now, x.shape[0])
        return x, {}


def loaded_from(t0: float):
    """1 s per forward at batch 1 and 10 s at the large batch, three times that from ``t0``
    on (another run starting to compete for the cores)."""
    def cost(now: float, batch: int) -> float:
        return (1.0 if batch == 1 else 10.0) * (3.0 if now >= t0 else 1.0)
    return cost


SHAPE = (1, 2, 2)


def test_quantile_is_linear_between_order_statistics() -> None:
    # positions q * (n - 1) of the sorted values 1, 2, 4, 8: 0.75 -> 1.75, 1.5 -> 3, 2.25 -> 5
    assert quantile([8.0, 1.0, 4.0, 2.0], 0.25) == pytest.approx(1.75)
    assert quantile([8.0, 1.0, 4.0, 2.0], 0.5) == pytest.approx(3.0)
    assert quantile([8.0, 1.0, 4.0, 2.0], 0.75) == pytest.approx(5.0)
    assert quantile([7.0], 0.25) == 7.0


def test_models_are_interleaved_round_robin_with_rotating_order() -> None:
    clock, log = FakeClock(), []
    models = {n: FakeNet(n, clock, log, loaded_from(float("inf"))) for n in "abc"}
    measure_interleaved(models, SHAPE, rounds=3, repeats=2, large_batch=4, large_repeats=1,
                        warmup=1, precision="fp32", clock=clock)
    warm = [("a", 1), ("a", 4), ("b", 1), ("b", 4), ("c", 1), ("c", 4)]

    def round_of(order: str) -> list:
        return [(n, 1) for n in order for _ in range(2)] + [(n, 4) for n in order]

    assert log == warm + round_of("abc") + round_of("bca") + round_of("cab")


def test_median_and_quartiles_over_rounds_hand_computed() -> None:
    """Two identical architectures under a load that starts at round 3 of 7: measured
    interleaved, both see it in the same rounds and agree exactly.

    Warm-up: 2 models x (1 + 10) s = 22 s; a round: 2 x (2 x 1 s + 10 s) = 24 s, so round 3
    starts at 22 + 3 x 24 = 94 s. Rounds 0-2: 1 s per image at batch 1 (1000 ms), 256 / 10 =
    25.6 images/s; rounds 3-6: 3000 ms and 256 / 30 = 8.5333 images/s. Sorted latencies
    1000, 1000, 1000, 3000, 3000, 3000, 3000: median (position 3) 3000, q1 (position 1.5)
    1000, q3 (position 4.5) 3000.
    """
    clock, log = FakeClock(), []
    models = {n: FakeNet(n, clock, log, loaded_from(94.0)) for n in ("a", "b")}
    out = measure_interleaved(models, SHAPE, rounds=7, repeats=2, large_batch=256,
                              large_repeats=1, warmup=1, precision="fp32", clock=clock)
    for name in ("a", "b"):
        lat, rate = out[name]["latency_ms_bs1"], out[name]["images_per_s"]
        assert lat["rounds"] == pytest.approx([1000.0] * 3 + [3000.0] * 4)
        assert (lat["median"], lat["q1"], lat["q3"]) == pytest.approx((3000.0, 1000.0, 3000.0))
        assert (lat["min"], lat["max"]) == pytest.approx((1000.0, 3000.0))
        assert rate["rounds"] == pytest.approx([25.6] * 3 + [256 / 30] * 4)
        assert (rate["median"], rate["q1"], rate["q3"]) == pytest.approx(
            (256 / 30, 256 / 30, 25.6))
        assert out[name]["large_batch"] == 256
    a, b = out["a"]["latency_ms_bs1"], out["b"]["latency_ms_bs1"]
    assert b["q1"] <= a["median"] <= b["q3"] and a["q1"] <= b["median"] <= a["q3"]


def test_one_after_the_other_the_same_load_tells_two_identical_models_apart() -> None:
    """The same load measured without interleaving (a alone, then b): a runs from 0 to 95 s
    (warm-up 11 s, 7 rounds of 12 s, each forward starting before 94 s), b after 94 s only,
    so b seems 3x slower, outside a's spread (the laptop study's 1.5-1.9 ms, the smoke
    study's 6.6 against 2.0 ms)."""
    clock, log = FakeClock(), []
    cost = loaded_from(94.0)
    a = measure_interleaved({"a": FakeNet("a", clock, log, cost)}, SHAPE, rounds=7,
                            repeats=2, large_batch=256, warmup=1, precision="fp32",
                            clock=clock)["a"]["latency_ms_bs1"]
    b = measure_interleaved({"b": FakeNet("b", clock, log, cost)}, SHAPE, rounds=7,
                            repeats=2, large_batch=256, warmup=1, precision="fp32",
                            clock=clock)["b"]["latency_ms_bs1"]
    assert (a["median"], a["q1"], a["q3"]) == pytest.approx((1000.0, 1000.0, 1000.0))
    assert (b["median"], b["q1"], b["q3"]) == pytest.approx((3000.0, 3000.0, 3000.0))
    assert not a["q1"] <= b["median"] <= a["q3"]


def test_measure_interleaved_refuses_empty_settings() -> None:
    with pytest.raises(ValueError, match="measure_interleaved"):
        measure_interleaved({}, SHAPE)
    with pytest.raises(ValueError, match="measure_interleaved"):
        measure_interleaved({"a": nn.Identity()}, SHAPE, rounds=0)


def test_measure_architectures_writes_speed_json(tmp_path, monkeypatch) -> None:
    """The study's student and teacher are built, measured together, and described."""
    import search.engine.speed as speed
    from kdcore.data import load_data
    from kdcore.models import build_model, count_parameters
    from kdcore.teacher import build_teacher
    from search.study import load_study_config

    config = load_study_config("smoke", overrides={"storage": str(tmp_path), "study": "sp",
                                                   "device": "cpu"})
    data = load_data("synthetic:4", val_size=10)
    teacher_state = build_teacher(config.teacher, data.num_classes).state_dict()
    seen = {}

    def fake_measure(models, image_shape, device, **kwargs):
        seen.update(models=models, shape=image_shape, device=device, **kwargs)
        return {role: {"latency_ms_bs1": {"median": 1.0 + i, "q1": 0.5, "q3": 2.5},
                       "images_per_s": {"median": 100.0 * (i + 1), "q1": 90.0, "q3": 110.0}}
                for i, role in enumerate(models)}

    monkeypatch.setattr(speed, "measure_interleaved", fake_measure)
    doc = speed.measure_architectures(config, data, teacher_state, rounds=3, repeats=2,
                                      large_batch=8, threads=1)
    written = json.loads((tmp_path / "sp" / "speed.json").read_text())
    assert written == json.loads(json.dumps(doc))
    assert list(seen["models"]) == ["student", "teacher"]
    assert seen["shape"] == (3, 32, 32) and seen["device"] == "cpu"
    assert (seen["rounds"], seen["repeats"], seen["large_batch"]) == (3, 2, 8)
    assert seen["precision"] in ("bf16", "fp32")  # resolved, never "auto"
    student = build_model("resnet18", 10, "cifar", 0.125, False)  # the smoke preset's student
    assert written["models"]["student"]["params"] == count_parameters(student)
    assert written["models"]["student"]["arch"] == "resnet18 width 0.125, cifar stem, without CBAM"
    assert written["models"]["student"]["groups"] == ["baseline", "kd", "fa", "at", "combined"]
    assert written["models"]["teacher"]["arch"] == "resnet50 width 0.125, cifar stem, with CBAM"
    assert written["models"]["teacher"]["latency_ms_bs1"]["median"] == 2.0
    assert written["models"]["student"]["images_per_s"]["median"] == 100.0
    for key in ("device", "device_name", "precision", "torch_threads", "rounds",
                "repeats_bs1", "large_batch", "repeats_large", "warmup", "image_shape"):
        assert key in written, key
    assert written["torch_threads"] == 1 and written["rounds"] == 3
    assert not list((tmp_path / "sp").glob(".*tmp"))


def test_measure_architectures_times_real_models_without_a_teacher(tmp_path) -> None:
    """Really timed (tiny settings): positive numbers, q1 <= median <= q3; no speed asserted."""
    from kdcore.data import load_data
    from search.engine.speed import measure_architectures
    from search.study import load_study_config

    config = load_study_config("smoke", overrides={"storage": str(tmp_path), "study": "sp",
                                                   "device": "cpu"})
    data = load_data("synthetic:4", val_size=10)
    doc = measure_architectures(config, data, rounds=3, repeats=1, large_batch=4, warmup=1)
    assert list(doc["models"]) == ["student"]
    for key in ("latency_ms_bs1", "images_per_s"):
        stats = doc["models"]["student"][key]
        assert 0 < stats["q1"] <= stats["median"] <= stats["q3"]
        assert len(stats["rounds"]) == 3


def test_measure_interleaved_runs_under_the_requested_precision() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.dtypes: list[torch.dtype] = []

        def forward(self, x: torch.Tensor):
            out = self.fc(x.flatten(1))
            self.dtypes.append(out.dtype)
            return out, {}

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        probe = Probe()
        measure_interleaved({"p": probe}, SHAPE, rounds=1, repeats=1, large_batch=2,
                            warmup=0, precision=precision)
        assert probe.dtypes and set(probe.dtypes) == {dtype}


# ---------------------------------------------------------------------------------------------
# Corruption severities at any image size


def _corrupt_at_32px(x: torch.Tensor, corruption: str, severity: int,
                     g: torch.Generator) -> torch.Tensor:
    """``kdcore.evaluate.corrupt`` as it was before severities scaled with the image size
    (commit 8bd32d0), frozen here as the reference at 32x32."""
    import torchvision.transforms.v2.functional as TF

    from kdcore.evaluate import SEVERITY

    c = SEVERITY[corruption][severity - 1]
    b, _, h, w = x.shape
    if corruption == "gaussian_noise":
        out = x + torch.randn(x.shape, generator=g) * c
    elif corruption == "shot_noise":
        out = torch.poisson(x * c, generator=g) / c
    elif corruption == "impulse_noise":
        u = torch.rand(b, 1, h, w, generator=g)
        out = torch.where(u < c / 2, 0.0, torch.where(u > 1 - c / 2, 1.0, x))
    elif corruption == "gaussian_blur":
        out = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[c, c])
    elif corruption == "contrast":
        out = TF.adjust_contrast(x, c)
    elif corruption == "brightness":
        out = x + c
    else:  # occlusion
        side = max(1, round(c * h))
        top = (torch.rand(b, generator=g) * (h - side + 1)).long()
        left = (torch.rand(b, generator=g) * (w - side + 1)).long()
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
                  & (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None]))
        out = torch.where(inside[:, None], 0.5, x)
    return out.clamp(0.0, 1.0)


@pytest.mark.parametrize("size", [32, 64])
def test_corruptions_at_32px_are_unchanged(size: int) -> None:
    """Every corruption and severity gives today's tensor at 32x32; at 64x64 only the blur
    (measured in pixels) differs."""
    from kdcore.evaluate import CORRUPTIONS, corrupt

    x = torch.rand((3, 3, size, size), generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            got = corrupt(x, name, severity, torch.Generator().manual_seed(7 * severity))
            ref = _corrupt_at_32px(x, name, severity, torch.Generator().manual_seed(7 * severity))
            same = torch.equal(got, ref)
            assert same == (size == 32 or name != "gaussian_blur"), (name, severity)


def _spread(profile: np.ndarray) -> float:
    """Standard deviation (pixels) of a 1-D profile around its centre."""
    x = np.arange(len(profile)) - (len(profile) - 1) / 2
    return float(np.sqrt((x * x * profile).sum() / profile.sum()))


def _gaussian(half: int, sigma: float) -> np.ndarray:
    """torchvision's discrete kernel: exp(-x^2 / (2 sigma^2)) at x = -half..half, summing to 1."""
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def test_blur_sigma_scales_with_the_image_size() -> None:
    """A single bright pixel blurred at severity 5 (sigma 1 at 32 px): its spread is the
    kernel's, and the kernel is sigma 1 over 5 pixels at 32 px, sigma 2 over 9 pixels at 64 px
    (spreads 0.961 and 1.852 by hand from the kernels' weights)."""
    from kdcore.evaluate import blur_params, corrupt

    assert blur_params(1.0, 32) == (5, 1.0) and blur_params(0.4, 64) == (9, 0.8)
    assert blur_params(1.0, 16) == (3, 0.5) and blur_params(1.0, 96) == (13, 3.0)
    g = torch.Generator()
    spreads = {}
    for size, half, sigma in ((32, 2, 1.0), (64, 4, 2.0)):
        x = torch.zeros(1, 1, size, size)
        x[0, 0, size // 2, size // 2] = 1.0
        out = corrupt(x, "gaussian_blur", 5, g)[0, 0].double().numpy()
        c = size // 2
        kernel = _gaussian(half, sigma)
        np.testing.assert_allclose(out[c - half:c + half + 1, c - half:c + half + 1],
                                   np.outer(kernel, kernel), atol=1e-6)
        assert out.sum() == pytest.approx(1.0, abs=1e-5)  # nothing outside the kernel
        spreads[size] = _spread(out[c - half:c + half + 1, c])
    assert spreads[32] == pytest.approx(0.9614, abs=1e-3)
    assert spreads[64] == pytest.approx(1.8515, abs=1e-3)
    # Not square (32 high, 64 wide): sigma 1 along the height, 2 along the width.
    x = torch.zeros(1, 1, 32, 64)
    x[0, 0, 16, 32] = 1.0
    out = corrupt(x, "gaussian_blur", 5, g)[0, 0].double().numpy()
    np.testing.assert_allclose(out[14:19, 28:37], np.outer(_gaussian(2, 1.0), _gaussian(4, 2.0)),
                               atol=1e-6)
