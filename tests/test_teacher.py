"""The teacher: trained once, cached by content hash, loaded safely."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

import kdcore.teacher as kteacher
from kdcore.data import load_data
from kdcore.precision import CPU_BF16_ENV
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


def test_content_hash_covers_config_data_and_precision_not_device(synthetic, monkeypatch):
    config = _config(precision="fp32")
    h = config.content_hash(synthetic)
    assert len(h) == 16
    assert config.content_hash(synthetic) == h
    # The device says where the teacher trains, not what it is.
    assert dataclasses.replace(config, device="cuda").content_hash(synthetic) == h
    assert dataclasses.replace(config, device="cuda:1").content_hash(synthetic) == h
    # Precision changes the weights: an fp32 study must not reuse a bf16 teacher.
    bf16 = dataclasses.replace(config, precision="bf16").content_hash(synthetic)
    assert bf16 != h
    # ``auto`` counts as what it means on the teacher's device.
    auto = dataclasses.replace(config, precision="auto")
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # a CPU with bf16: auto is bf16
    assert auto.content_hash(synthetic) == bf16
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # a CPU without: auto is fp32
    assert auto.content_hash(synthetic) == h
    assert dataclasses.replace(auto, device="cuda").content_hash(synthetic) == bf16
    assert dataclasses.replace(config, lr=0.1).content_hash(synthetic) != h
    assert dataclasses.replace(config, cbam=True).content_hash(synthetic) != h
    other = load_data("synthetic:20", val_size=40, split_seed=1)
    assert config.content_hash(other) != h


@pytest.mark.parametrize("field, value", [
    ("momentum", 0.5), ("weight_decay", 0.0), ("eval_batch_size", 256), ("compile", True),
])
def test_content_hash_covers_the_trial_config_defaults(synthetic, monkeypatch, field, value):
    """The teacher trains with ``trial_config()``, TrialConfig defaults included (momentum,
    weight decay, ...): a change to any of them is another teacher."""
    config = _config(precision="fp32")
    h = config.content_hash(synthetic)
    trial = config.trial_config()
    assert getattr(trial, field) != value
    monkeypatch.setattr(TeacherConfig, "trial_config",
                        lambda self: dataclasses.replace(trial, **{field: value}))
    assert config.content_hash(synthetic) != h
    monkeypatch.setattr(TeacherConfig, "trial_config",
                        lambda self: dataclasses.replace(trial, device="cuda"))
    assert config.content_hash(synthetic) == h  # only the device stays out


def _old_key(teacher: TeacherConfig, data) -> str:
    """The cache key before issue 16, as it was computed: the TeacherConfig fields without
    device and precision, and the data fingerprint."""
    fields = {k: v for k, v in dataclasses.asdict(teacher).items()
              if k not in ("device", "precision", "checkpoint", "stages")}  # later fields
    blob = json.dumps({"teacher": fields, "data": data.fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _study(tmp_path, **kw):
    from search.study import StudyConfig

    return StudyConfig(**{"study": "s", "storage": str(tmp_path / "store"),
                          "data": "synthetic:20", "val_size": 40, "groups": ("kd",),
                          "teacher": _config(), **kw})


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stored_study_finds_its_teacher_under_the_old_key(tmp_path):
    from search.engine.teacher_task import load_cached, prepare_teacher
    from search.study import write_study_json

    config = _study(tmp_path)
    data = config.load_data()
    old = _old_key(config.teacher, data)
    # The old key is the one this version still reads, and not the one it writes.
    assert config.teacher.legacy_hash(data) == old
    assert old != config.teacher.content_hash(data)
    teachers = tmp_path / "store" / "teachers"
    torch.manual_seed(1)
    searched_with = build_teacher(config.teacher, data.num_classes)
    save_teacher(teachers / f"teacher-{old}.pt", searched_with, {"hash": old, "val_acc": 0.25})
    # Without a study that recorded it, the old file is not this config's teacher (new key).
    assert load_cached(config, data) is None

    write_study_json(config, data_fingerprint=data.fingerprint, teacher_hash=old)
    torch.manual_seed(2)  # a teacher under the new key as well: the recorded one still wins
    new = config.teacher.content_hash(data)
    save_teacher(teachers / f"teacher-{new}.pt", build_teacher(config.teacher, data.num_classes),
                 {"hash": new, "val_acc": 0.5})
    state, meta = load_cached(config, data)
    assert meta["hash"] == old and _state_equal(state, searched_with.state_dict())
    state, info = prepare_teacher(config, data)  # found in storage: no Ray
    assert info == {"teacher_hash": old, "teacher_val_acc": 0.25}
    assert _state_equal(state, searched_with.state_dict())

    # A recorded hash that is no key of this config (study.json of other settings) is
    # ignored: the current key's teacher loads.
    other = _old_key(dataclasses.replace(config.teacher, seed=7), data)
    save_teacher(teachers / f"teacher-{other}.pt", build_teacher(config.teacher, 10), {})
    write_study_json(config, data_fingerprint=data.fingerprint, teacher_hash=other)
    assert load_cached(config, data)[1]["hash"] == new
    # A recorded key whose file is gone: the current key's teacher too.
    write_study_json(config, data_fingerprint=data.fingerprint, teacher_hash=old)
    (teachers / f"teacher-{old}.pt").unlink()
    assert load_cached(config, data)[1]["hash"] == new


def test_fp32_study_does_not_reuse_a_bf16_teacher(tmp_path, monkeypatch):
    from search.engine.teacher_task import load_cached, train_and_store

    monkeypatch.setenv(CPU_BF16_ENV, "1")  # auto is bf16 where the teacher trains
    config = _study(tmp_path, precision="auto")
    data = config.load_data()
    info = train_and_store(config, data, threads=1)
    assert info["trained"] and info["hash"] == config.teacher.content_hash(data)
    assert load_cached(_study(tmp_path, precision="bf16"), data)[1]["hash"] == info["hash"]
    assert load_cached(_study(tmp_path, precision="fp32"), data) is None
    # A driver whose CPU resolves auto to fp32 finds it by the hash the task returns.
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert load_cached(config, data) is None
    assert load_cached(config, data, info["hash"])[1]["hash"] == info["hash"]


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
    with pytest.raises(ValueError, match="does not fit resnet"):
        load_teacher(path, wanted, 10)
    # A different number of classes does not match either.
    with pytest.raises(ValueError, match="does not fit resnet"):
        load_teacher(path, _config(**saved), 100)


def test_saved_teacher_gets_umask_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "teachers" / "teacher-x.pt"
        save_teacher(path, build_teacher(_config(), 10), {"hash": "x"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the other users of a cache
    assert [p.name for p in path.parent.iterdir()] == ["teacher-x.pt"]
    assert load_teacher(path, _config(), 10) is not None
