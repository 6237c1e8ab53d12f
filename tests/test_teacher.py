"""The teacher: trained once, cached by content hash, loaded safely."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kdcore.teacher as kteacher
from kdcore.data import load_data
from kdcore.teacher import (
    TeacherConfig,
    build_teacher,
    get_teacher,
    load_teacher,
    save_teacher,
)


def _config(**kw) -> TeacherConfig:
    base = dict(arch="resnet18", width=0.125, cbam=False, epochs=1, batch_size=32, lr=0.05)
    return TeacherConfig(**{**base, **kw})


def test_get_teacher_trains_once_then_loads_from_cache(synthetic, tmp_path, count_calls):
    calls = count_calls(kteacher, "fit")
    config = _config()
    model, digest, meta = get_teacher(config, synthetic, tmp_path)
    assert calls["n"] == 1
    path = tmp_path / f"teacher-{digest}.pt"
    assert path.is_file() and len(list(tmp_path.iterdir())) == 1  # no stray temp files
    assert meta["hash"] == digest and meta["data"] == synthetic.fingerprint
    assert meta["epochs_run"] == 1 and 0.0 <= meta["val_acc"] <= 1.0
    assert not model.training and all(not p.requires_grad for p in model.parameters())

    model2, digest2, meta2 = get_teacher(config, synthetic, tmp_path)
    assert calls["n"] == 1  # loaded from the cache, not trained again
    assert digest2 == digest and meta2 == meta
    assert not model2.training and all(not p.requires_grad for p in model2.parameters())
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model2(x)[0])

    # A different teacher config is a different cache entry and trains again.
    _, digest3, _ = get_teacher(_config(seed=1), synthetic, tmp_path)
    assert digest3 != digest and calls["n"] == 2


def test_content_hash_covers_config_and_data_not_device(synthetic):
    config = _config()
    h = config.content_hash(synthetic)
    assert len(h) == 16
    assert config.content_hash(synthetic) == h
    assert dataclasses.replace(config, device="cuda").content_hash(synthetic) == h
    assert dataclasses.replace(config, precision="fp32").content_hash(synthetic) == h
    assert dataclasses.replace(config, lr=0.1).content_hash(synthetic) != h
    assert dataclasses.replace(config, cbam=True).content_hash(synthetic) != h
    other = load_data("synthetic:20", val_size=40, split_seed=1)
    assert config.content_hash(other) != h


def test_trial_config_is_ce_only():
    tc = _config(arch="resnet50", width=0.25, cbam=True, epochs=3).trial_config()
    assert tc.group == "baseline" and tc.active_terms == ("ce",)
    assert (tc.student, tc.student_width, tc.student_cbam, tc.epochs) == ("resnet50", 0.25,
                                                                          True, 3)
    assert tc.precision == "auto"
    assert _config(precision="fp32").trial_config().precision == "fp32"


def test_load_teacher_round_trip(tmp_path):
    config = _config()
    torch.manual_seed(0)
    model = build_teacher(config, 10)
    path = tmp_path / "t.pt"
    save_teacher(path, model, {"val_acc": 0.5})
    loaded = load_teacher(path, config, 10)
    for (k, v), (_, v2) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert torch.equal(v, v2), k
    assert all(not p.requires_grad for p in loaded.parameters())


def test_load_teacher_corrupt_file(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(b"\x00garbage\xff" * 20)
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        load_teacher(path, _config(), 10)
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        load_teacher(tmp_path / "missing.pt", _config(), 10)


class _Payload:
    pass


def test_load_teacher_refuses_pickled_objects(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"state_dict": _Payload(), "meta": {}}, path)
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        load_teacher(path, _config(), 10)


@pytest.mark.parametrize("saved", [
    dict(arch="resnet18"),  # loaded as resnet50 below
    dict(width=0.25),
    dict(cbam=True),
])
def test_load_teacher_wrong_architecture(tmp_path, saved):
    path = tmp_path / "t.pt"
    save_teacher(path, build_teacher(_config(**saved), 10), {})
    wanted = _config(arch="resnet50") if saved == {"arch": "resnet18"} else _config()
    with pytest.raises(ValueError, match="does not match architecture"):
        load_teacher(path, wanted, 10)
    # A different number of classes does not match either.
    with pytest.raises(ValueError, match="does not match architecture"):
        load_teacher(path, _config(**saved), 100)
