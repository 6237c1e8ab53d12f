"""Models by spec and their distilled features: ``kdcore.names.model_kind``, ``kdcore.zoo``,
``kdcore.features`` (FeatureNet, stages, the hook fallback), the objective's stage pairing,
teacher checkpoints, the config's per-side stages, user code on Ray workers and
``kdsearch models``.

Every expectation is computed independently: by hand from the architecture, or by calling the
underlying torch modules directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import kdcore.features as features
from kdcore.config import TeacherConfig, TrialConfig
from kdcore.features import FeatureNet, candidates, default_stages, distillable, network
from kdcore.losses import attention_transfer
from kdcore.names import model_kind
from kdcore.objective import build_connectors, connector_key, loss_terms, stage_pairs
from kdcore.teacher import build_teacher, load_teacher, load_weights, read_state_dict
from kdcore.train import prepare_teacher
from kdcore.zoo import build_network

REPO = Path(__file__).resolve().parents[1]
OWN_MODELS = REPO / "examples" / "own_models"
TINY = "tiny_models:small_cnn"
TV18 = "torchvision:resnet18"


# ---------------------------------------------------------------------------------------------
# Fixtures and small models


@pytest.fixture
def tiny_models(monkeypatch):
    """examples/own_models on sys.path (``tiny_models:small_cnn`` importable); the module is
    forgotten afterwards."""
    monkeypatch.syspath_prepend(str(OWN_MODELS))
    yield
    sys.modules.pop("tiny_models", None)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_module(name, source)`` writes ``<tmp>/<name>.py``, puts tmp on sys.path and
    returns the file; every module written is forgotten afterwards."""
    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        names.append(name)
        import importlib

        importlib.invalidate_caches()
        return path

    yield write
    for name in names:
        sys.modules.pop(name, None)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is not identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _x(b: int = 2, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _tv18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=3)
    _randomize_bn(net, seed)
    return net


class Branchy(nn.Module):
    """Data-dependent control flow in forward: torch.fx cannot trace it."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2.0
        x = self.block(x)
        return self.fc(x.mean((2, 3)))


class ModeNet(nn.Module):
    """Functional dropout and a branch on ``self.training``: fx bakes the mode into the graph."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = nn.Identity()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = F.dropout(self.conv(x), 0.5, self.training)
        if self.training:
            x = x + 1.0
        x = self.tail(x)
        return self.fc(x.mean((2, 3)))


class Blurred(nn.Module):
    """A forward reading a buffer directly (as timm's BlurPool does): a ``get_attr`` node."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("filt", torch.full((4, 1, 3, 3), 1 / 9))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = F.conv2d(self.conv(x), self.filt, padding=1, groups=4)
        return self.fc(x.mean((2, 3)))


class OneResolution(nn.Module):
    """Only one spatial resolution above 1x1 (the input's)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


# ---------------------------------------------------------------------------------------------
# 1. model_kind


@pytest.mark.parametrize("spec, kind", [
    ("resnet18", "builtin"), ("resnet34", "builtin"), ("resnet50", "builtin"),
    ("torchvision:resnet18", "torchvision"), ("timm:x", "timm"),
    ("pkg.mod:make", "module"), ("tiny_models:small_cnn", "module"), ("m:_f2", "module"),
])
def test_model_kind_accepts_the_spec_forms(spec, kind):
    assert model_kind(spec) == kind


@pytest.mark.parametrize("spec", [
    "foo", "a-b:c", ":x", "mod:1a", "mod:", "torchvision:", "timm:", "pkg..mod:f", "resnet101",
    "", None, 3, ["resnet18"],
])
def test_model_kind_refuses_other_specs_listing_the_forms(spec):
    with pytest.raises(ValueError) as err:
        model_kind(spec)
    msg = str(err.value)
    assert "\n" not in msg
    for form in ("resnet18", "resnet34", "resnet50", "torchvision:NAME", "timm:NAME",
                 "MODULE:CALLABLE"):
        assert form in msg


# ---------------------------------------------------------------------------------------------
# 2. FeatureNet over a torchvision model


def test_featurenet_stage_and_logits_equal_the_modules_called_by_hand():
    net = _tv18()
    model = features.with_features(net, ("layer2", "layer3.1.relu_1"), 32, spec=TV18)
    assert isinstance(model, FeatureNet) and network(model) is net
    model.eval()
    x = _x()
    with torch.no_grad():
        logits, feats = model(x)
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        l2 = net.layer2(net.layer1(h))
        l3 = net.layer3(l2)
        expected_logits = net(x)
    assert list(feats) == ["layer2", "layer3.1.relu_1"]
    assert feats["layer2"].shape == (2, 128, 4, 4)  # 32 -> 16 (conv1) -> 8 (maxpool) -> 4
    assert torch.equal(feats["layer2"], l2)
    assert torch.equal(feats["layer3.1.relu_1"], l3)  # the last node of layer3
    assert torch.equal(logits, expected_logits)


def test_featurenet_stage_channels_by_hand():
    model = features.with_features(_tv18(), ("layer1", "layer2", "layer3"), 32, spec=TV18)
    assert model.stage_channels == {"layer1": 64, "layer2": 128, "layer3": 256}
    node = features.with_features(_tv18(), ("layer2.0.conv1", "layer3.1.relu_1"), 32, spec=TV18)
    assert node.stage_channels == {"layer2.0.conv1": 128, "layer3.1.relu_1": 256}


def test_featurenet_state_dict_and_parameters_are_the_classifiers_own():
    model = distillable(TV18, 3, ("layer1", "layer2"))
    fresh = torchvision.models.resnet18(num_classes=3).state_dict()
    assert list(network(model).state_dict()) == list(fresh)
    assert list(model.state_dict()) == [f"net.{k}" for k in fresh]  # each once, under net.
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert len(params) == len(list(network(model).parameters()))
    # ResNet-18: 11,689,512 parameters with 1000 classes; fc is 512 * 1000 + 1000 of them.
    assert sum(p.numel() for p in params) == 11_689_512 - 513_000 + 512 * 3 + 3
    assert [n for n, _ in model.named_children()] == ["net"]


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
def test_featurenet_train_and_eval_switch_the_traced_graph():
    torch.manual_seed(0)
    net = ModeNet()
    model = features.with_features(net, ("tail",), 16)
    assert model.training  # as built (the probe restores the mode)
    x = _x(side=16)

    model.eval()
    with torch.no_grad():
        logits, feats = model(x)
        conv = net.conv(x)
        assert torch.equal(feats["tail"], conv)  # no dropout, no +1 in the eval graph
        assert torch.equal(logits, net(x))
        assert torch.equal(model(x)[0], logits)  # deterministic

    model.train()
    assert net.training
    with torch.no_grad():
        torch.manual_seed(1)
        _, a = model(x)
        torch.manual_seed(1)
        expected = F.dropout(net.conv(x), 0.5, True) + 1.0
        torch.manual_seed(2)
        _, b = model(x)
    assert torch.equal(a["tail"], expected)
    assert not torch.equal(a["tail"], b["tail"])  # dropout is random in train mode

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[1]["tail"], net.conv(x))


def test_featurenet_with_dropout_module_differs_in_train_and_matches_in_eval():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = features.with_features(net, ("2",), 16)
    x = _x(side=16)
    with torch.no_grad():
        model.train()
        first, second = model(x), model(x)
        assert not torch.equal(first[1]["2"], second[1]["2"])
        model.eval()
        logits, feats = model(x)
        assert torch.equal(feats["2"], torch.relu(net[0](x)))
        assert torch.equal(logits, net(x))


def test_featurenet_to_dtype_moves_the_buffers_its_graph_reads():
    """Moving a FeatureNet (``.to(device)`` in training; ``.double()`` here on the CPU) must
    move every tensor its traced forward reads, buffers read directly (``get_attr``, such as
    timm's BlurPool filter) included: the outputs stay those of the moved classifier."""
    torch.manual_seed(0)
    net = Blurred()
    model = features.with_features(net, ("conv",), 8).double().eval()
    assert net.filt.dtype == torch.float64
    x = _x(side=8).double()
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.equal(feats["conv"], net.conv(x))
        assert torch.equal(logits, net(x))


# ---------------------------------------------------------------------------------------------
# 3. Gradients through the extracted features


def test_attention_transfer_on_a_stage_reaches_that_stage_and_not_later_layers():
    model = distillable(TV18, 3, ("layer2",))
    target = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(5))
    _, feats = model(_x())
    assert feats["layer2"].requires_grad
    attention_transfer(feats["layer2"], target).backward()
    net = network(model)
    for name in ("layer1", "layer2"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    for name in ("layer3", "layer4", "fc"):
        for p in getattr(net, name).parameters():
            assert p.grad is None or not p.grad.any(), name


def test_hooked_features_carry_gradients_too(monkeypatch):
    monkeypatch.setattr(features, "_WARNED", set())
    torch.manual_seed(0)
    net = Branchy()
    model = features.with_features(net, ("block",), 16, spec="branchy-grad")
    _, feats = model(_x(side=16))
    attention_transfer(feats["block"], torch.rand(2, 6, 8, 8)).backward()
    assert net.block[0].weight.grad is not None and net.block[0].weight.grad.abs().sum() > 0
    assert net.fc.weight.grad is None or not net.fc.weight.grad.any()


# ---------------------------------------------------------------------------------------------
# 4. The hook fallback for untraceable models


def test_untraceable_model_falls_back_to_hooks_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(features, "_WARNED", set())
    torch.manual_seed(0)
    net = Branchy()
    assert features.graph_nodes(net) is None
    capsys.readouterr()
    model = features.with_features(net, ("conv", "block"), 16, spec="branchy")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "torch.fx cannot trace" in err and "branchy" in err and "hooks" in err
    assert model.stage_channels == {"conv": 4, "block": 6}

    model.eval()
    branches = set()
    for sign in (1.0, -1.0):  # both branches of the data-dependent ``if``
        x = _x(side=16)
        with torch.no_grad():
            net.conv.bias.fill_(sign * 5.0)
            logits, feats = model(x)
            h = net.conv(x)
            expected_conv = h.clone()
            branches.add(bool(h.sum() > 0))
            if h.sum() > 0:
                h = h * 2.0
            expected_block = torch.relu(net.block[0](h))
            assert torch.equal(feats["conv"], expected_conv)
            assert torch.equal(feats["block"], expected_block)
            assert torch.equal(logits, net.fc(expected_block.mean((2, 3))))
    assert branches == {True, False}
    # A second model of the same spec does not repeat the line.
    features.with_features(Branchy(), ("block",), 16, spec="branchy")
    assert capsys.readouterr().err == ""


def test_untraceable_model_refuses_a_node_name_naming_its_modules(monkeypatch):
    monkeypatch.setattr(features, "_WARNED", set())
    with pytest.raises(ValueError) as err:
        features.with_features(Branchy(), ("conv.mul",), 16, spec="branchy", field="student_stages")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("student_stages:")
    assert "'conv.mul'" in msg
    for module in ("conv", "block", "fc"):
        assert module in msg


# ---------------------------------------------------------------------------------------------
# 5. default_stages


def test_default_stages_of_the_small_cnn(tiny_models):
    import tiny_models as tm

    # 40x40: block1 (conv, bn, relu) at 40x40, block2 (maxpool + block) at 20x20, block3 at
    # 10x10, then the mean over the positions: the last node at each resolution is a ReLU.
    net = tm.small_cnn(3)
    assert default_stages(net, 40) == ("block1.2", "block2.1.2", "block3.1.2")
    assert default_stages(net, 40, count=2) == ("block2.1.2", "block3.1.2")
    shapes = {c.name: c.shape for c in candidates(net, 40)}
    assert shapes["block1.2"] == (16, 40, 40)
    assert shapes["block2.0"] == (16, 20, 20)  # the max-pool
    assert shapes["block2.1.2"] == (32, 20, 20)
    assert shapes["block3.1.2"] == (64, 10, 10)
    assert shapes["head"] == (3,)
    # Chosen automatically by distillable when no stage is given.
    model = distillable(TINY, 3, (), image_size=40)
    assert model.stages == ("block1.2", "block2.1.2", "block3.1.2")
    assert model.stage_channels == {"block1.2": 16, "block2.1.2": 32, "block3.1.2": 64}


def test_default_stages_of_torchvision_resnet18_at_32():
    # 32 -> 16 (conv1) -> 8 (maxpool, layer1) -> 4 (layer2) -> 2 (layer3) -> 1 (layer4).
    net = torchvision.models.resnet18(num_classes=3)
    assert default_stages(net, 32) == ("layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1")
    assert net.training  # candidates restores the mode


def test_default_stages_refuses_too_few_resolutions():
    with pytest.raises(ValueError, match="name the stages") as err:
        default_stages(OneResolution(), 16)
    assert "\n" not in str(err.value) and "16x16" in str(err.value)
    assert default_stages(OneResolution(), 16, count=1) == ("conv",)


# ---------------------------------------------------------------------------------------------
# 6.-7. Stage and spec errors


def test_unknown_stage_names_the_field_and_some_modules():
    with pytest.raises(ValueError) as err:
        distillable(TV18, 3, ("layerX",), field="teacher.stages")
    msg = str(err.value)
    assert msg.startswith("teacher.stages:")
    assert "'layerX'" in msg and "layer1" in msg and "conv1" in msg
    assert "\n" not in msg


def test_builtin_resnet_refuses_a_stage_outside_layer1_to_layer4():
    with pytest.raises(ValueError, match="'layer5'") as err:
        distillable("resnet18", 3, ("layer2", "layer5"), width=0.125, field="student_stages")
    assert str(err.value).startswith("student_stages:")
    model = distillable("resnet18", 3, ("layer1",), width=0.125)
    assert model is network(model)  # a built-in ResNet is returned as it is


@pytest.mark.parametrize("stage", ["fc", "flatten"])
def test_a_stage_without_spatial_output_is_refused(stage):
    """torchvision's resnet18 ends ``flatten`` -> ``fc``: neither is a (C, H, W) map."""
    with pytest.raises(ValueError) as err:
        distillable(TV18, 3, (stage,), field="student_stages")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("student_stages:") and repr(stage) in msg


def test_user_code_errors_are_one_line(user_module):
    user_module("kdtest_notmodule", "def make(num_classes):\n    return 3\n")
    user_module("kdtest_broken", "raise RuntimeError('boom')\n")
    user_module("kdtest_raises", "def make(num_classes):\n    raise KeyError('x')\n")
    cases = {
        "kdtest_notmodule:make": "not a torch.nn.Module",
        "kdtest_notmodule:other": "no callable 'other'",
        "kdtest_broken:make": "cannot import kdtest_broken",
        "kdtest_no_such_module_anywhere:make": "cannot import",
        "kdtest_raises:make": "raised KeyError",
    }
    for spec, text in cases.items():
        with pytest.raises(ValueError) as err:
            build_network(spec, 3)
        assert text in str(err.value), spec
        assert "\n" not in str(err.value), spec
    # And through distillable, as the trainer builds it.
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        distillable("kdtest_notmodule:make", 3, ())


def test_user_code_is_called_with_num_classes(user_module):
    user_module("kdtest_ok", "from torch import nn\n"
                "def make(num_classes):\n    return nn.Linear(2, num_classes)\n")
    net = build_network("kdtest_ok:make", 5)
    assert isinstance(net, nn.Linear) and net.out_features == 5


@pytest.mark.parametrize("spec, text", [
    ("torchvision:resnet1000", "not a torchvision classification model"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("timm:no_such_timm_net", "not a timm model"),
])
def test_unknown_torchvision_and_timm_names_are_one_line(spec, text):
    with pytest.raises(ValueError) as err:
        build_network(spec, 3)
    assert text in str(err.value) and spec in str(err.value)
    assert "\n" not in str(err.value)


def test_torchvision_builder_gets_num_classes_and_fresh_weights():
    net = build_network(TV18, 7)
    assert isinstance(net, torchvision.models.ResNet) and net.fc.out_features == 7


# ---------------------------------------------------------------------------------------------
# 8. timm models


def test_timm_model_with_a_named_stage():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = distillable("timm:resnet10t", 4, ("layer2",))
    # resnet10t: a stride-2 deep stem and a max-pool (32 -> 8), layer1 at 64 channels 8x8,
    # layer2 at 128 channels 4x4.
    assert model.stage_channels == {"layer2": 128}
    net = network(model).eval()
    model.eval()
    x = _x()
    with torch.no_grad():
        logits, feats = model(x)
        expected = net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x))))))
        assert logits.shape == (2, 4)
        assert feats["layer2"].shape == (2, 128, 4, 4)
        assert torch.allclose(feats["layer2"], expected, atol=1e-6)
        assert torch.allclose(logits, net(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 9. Teacher checkpoints


def _small_state(tiny_seed: int = 0) -> tuple[nn.Module, dict]:
    import tiny_models as tm

    torch.manual_seed(tiny_seed)
    src = tm.small_cnn(3)
    _randomize_bn(src, tiny_seed)
    return src.eval(), src.state_dict()


def _saved(blob) -> bytes:
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.getvalue()


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_read_state_dict_accepts_the_usual_layouts(tiny_models, tmp_path):
    _, sd = _small_state()
    layouts = {
        "raw": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd, "meta": {"acc": 0.5}},
        "dataparallel": {f"module.{k}": v for k, v in sd.items()},
        "dataparallel_under_model": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    for label, blob in layouts.items():
        data = _saved(blob)
        path = tmp_path / f"{label}.pt"
        path.write_bytes(data)
        assert _same_state(read_state_dict(path), sd), label
        assert _same_state(read_state_dict(str(path)), sd), label
        assert _same_state(read_state_dict(data, name=label), sd), label


def test_read_state_dict_refuses_files_without_a_tensor_dict(tmp_path):
    for label, blob in {"ints": {"a": 1, "b": 2}, "empty": {}, "list": [torch.zeros(1)],
                        "nested": {"model": {"a": 1}}}.items():
        path = tmp_path / f"{label}.pt"
        torch.save(blob, path)
        with pytest.raises(ValueError, match="holds no state dict") as err:
            read_state_dict(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        read_state_dict(tmp_path / "junk.pt")


def test_load_weights_names_missing_unexpected_and_misshaped_keys(tiny_models):
    _, sd = _small_state()
    model = distillable(TINY, 3, ("block2",), image_size=16)
    wrong = {("extra." + k if k.startswith("head.") else k): v for k, v in sd.items()}
    with pytest.raises(ValueError) as err:
        load_weights(model, wrong, "ckpt.pt", TINY)
    msg = str(err.value)
    assert "\n" not in msg and "ckpt.pt" in msg and TINY in msg
    assert "missing keys head.weight" in msg
    assert "unexpected keys extra.head.weight" in msg

    other_classes = {**sd, "head.weight": torch.zeros(7, 64), "head.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match="other shapes at head.weight, head.bias"):
        load_weights(model, other_classes, "ckpt.pt", TINY)


def test_load_weights_gives_the_source_models_outputs(tiny_models):
    seed = 3
    src, sd = _small_state(seed)
    torch.manual_seed(seed + 1)  # other fresh weights
    model = distillable(TINY, 3, ("block1", "block3"), image_size=16)
    loaded = load_weights(model, sd, "ckpt.pt", TINY)
    assert loaded is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = _x(side=16)
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.equal(logits, src(x))
        assert torch.equal(feats["block1"], src.block1(x))
        assert torch.equal(feats["block3"], src.block3(src.block2(src.block1(x))))


def test_load_teacher_from_a_torchvision_checkpoint(tmp_path):
    src = _tv18(seed=4).eval()
    path = tmp_path / "teacher.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    config = TeacherConfig(arch=TV18, checkpoint=str(path), stages=("layer1", "layer2"))
    teacher = load_teacher(path, config, 3, 32, stages=config.stages)
    assert isinstance(teacher, FeatureNet) and not teacher.training
    x = _x()
    with torch.no_grad():
        logits, feats = teacher(x)
        assert torch.equal(logits, src(x))
        h = src.maxpool(src.relu(src.bn1(src.conv1(x))))
        assert torch.equal(feats["layer2"], src.layer2(src.layer1(h)))
    # A checkpoint of another number of classes does not fit.
    with pytest.raises(ValueError, match="does not fit torchvision:resnet18"):
        load_teacher(path, config, 10, 32, stages=config.stages)


def test_build_teacher_without_stages_returns_logits_only():
    teacher = build_teacher(TeacherConfig(arch=TV18), 3)
    logits, feats = teacher(_x())
    assert logits.shape == (2, 3) and feats == {}


# ---------------------------------------------------------------------------------------------
# 10. The objective's stage pairs and connectors


def _combined(**kw) -> TrialConfig:
    return TrialConfig.for_group("combined", **{
        "student": TINY, "teacher": TV18, "student_stages": ("block1", "block2", "block3"),
        "teacher_stages": ("layer1", "layer2", "layer3"), **kw})


def test_connector_key():
    assert connector_key("layer3.1.relu_1") == "layer3_1_relu_1"
    assert connector_key("layer2") == "layer2"


def test_stage_pairs_in_order(tiny_models):
    config = _combined()
    student = distillable(TINY, 3, config.given_stages("student"))
    teacher = distillable(TV18, 3, config.given_stages("teacher"))
    assert stage_pairs(config, student, teacher) == (
        ("block1", "layer1"), ("block2", "layer2"), ("block3", "layer3"))
    # Built-in models take them from the config's ``stages``.
    builtin = TrialConfig.for_group("at", stages=("layer3", "layer4"))
    s = distillable("resnet18", 3, ("layer3", "layer4"), width=0.125)
    t = distillable("resnet50", 3, ("layer3", "layer4"), width=0.125)
    assert stage_pairs(builtin, s, t) == (("layer3", "layer3"), ("layer4", "layer4"))


def test_build_connectors_map_student_to_teacher_channels(tiny_models):
    config = _combined()
    student = distillable(TINY, 3, config.given_stages("student"))
    teacher = distillable(TV18, 3, config.given_stages("teacher"))
    connectors = build_connectors(config, student, teacher)
    assert list(connectors) == ["block1", "block2", "block3"]
    # small_cnn: 16, 32, 64 channels; resnet18: 64, 128, 256; a 1x1 conv (out, in, 1, 1).
    for key, (c_in, c_out) in {"block1": (16, 64), "block2": (32, 128),
                               "block3": (64, 256)}.items():
        conv = connectors[key][0]
        assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (c_out, c_in, 1, 1), key
        assert connectors[key][1].num_features == c_out
    # Node names with dots get dot-free keys.
    dotted = _combined(student_stages=("block1.2", "block2.1.2", "block3.1.2"))
    student = distillable(TINY, 3, dotted.given_stages("student"))
    assert list(build_connectors(dotted, student, teacher)) == [
        "block1_2", "block2_1_2", "block3_1_2"]


def test_loss_terms_combined_with_a_user_student_and_a_torchvision_teacher(tiny_models):
    config = _combined()
    torch.manual_seed(0)
    student = distillable(TINY, 3, config.given_stages("student"))
    teacher = prepare_teacher(distillable(TV18, 3, config.given_stages("teacher")), config)
    connectors = build_connectors(config, student, teacher)
    x, y = _x(b=4), torch.tensor([0, 1, 2, 0])
    logits, terms = loss_terms(config, student, teacher, connectors, x, y)
    assert logits.shape == (4, 3)
    assert set(terms) == {"ce", "kl", "at", "fa"}
    for name, value in terms.items():
        assert torch.isfinite(value) and value.item() >= 0, name
    assert terms["at"].item() > 0 and terms["fa"].item() > 0
    total = sum(config.weight(t) * v for t, v in terms.items())
    total.backward()
    assert student.net.block1[0].weight.grad.abs().sum() > 0
    assert connectors["block1"][0].weight.grad.abs().sum() > 0


def test_mismatched_stage_counts_are_refused(tiny_models):
    config = TrialConfig.for_group("at", student=TINY, teacher=TV18)  # both automatic
    student = distillable(TINY, 3, ("block1", "block2"))
    teacher = distillable(TV18, 3, ("layer1", "layer2", "layer3"))
    with pytest.raises(ValueError, match="equal lengths"):
        stage_pairs(config, student, teacher)
    with pytest.raises(ValueError, match="equal lengths"):
        loss_terms(config, student, prepare_teacher(teacher, config), nn.ModuleDict(), _x(),
                   torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# 11. Config


def test_width_and_cbam_only_on_builtin_models():
    with pytest.raises(ValueError, match="^student_width:"):
        TrialConfig(student=TV18, student_width=0.5)
    with pytest.raises(ValueError, match="^student_cbam:"):
        TrialConfig(student=TV18, student_cbam=True)
    with pytest.raises(ValueError, match="^teacher_cbam:"):
        TrialConfig(teacher=TV18, teacher_cbam=True)
    with pytest.raises(ValueError, match="^teacher_width:"):
        TrialConfig(teacher="timm:resnet10t", teacher_width=2.0)
    with pytest.raises(ValueError, match="^student: unknown architecture 'foo'"):
        TrialConfig(student="foo")
    assert TrialConfig(student="resnet18", student_width=0.5, student_cbam=True).student_cbam


def test_teacher_cbam_defaults_by_model():
    assert TrialConfig(teacher=TV18).teacher_cbam is False
    assert TrialConfig().teacher_cbam is True  # resnet50, the paper's teacher
    assert TrialConfig(teacher="resnet18", teacher_cbam=False).teacher_cbam is False
    assert TeacherConfig(arch=TV18).cbam is False
    assert TeacherConfig().cbam is True
    assert TeacherConfig(arch="resnet34", cbam=False).cbam is False
    assert TeacherConfig(stages=["layer1"]).stages == ("layer1",)


def test_given_stages_and_auto_count():
    c = TrialConfig()
    assert c.given_stages("student") == ("layer2", "layer3", "layer4")
    assert c.given_stages("teacher") == ("layer2", "layer3", "layer4")

    c = TrialConfig(student=TV18, stages=("layer3", "layer4"))
    assert c.given_stages("student") == ()
    assert c.given_stages("teacher") == ("layer3", "layer4")
    assert c.auto_count("student") == 2

    c = TrialConfig(student=TV18, teacher="timm:resnet10t")
    assert c.given_stages("student") == () and c.given_stages("teacher") == ()
    assert c.auto_count("student") == 3 and c.auto_count("teacher") == 3

    c = TrialConfig(student=TV18, teacher="timm:resnet10t", teacher_stages=["layer1", "layer2"])
    assert c.teacher_stages == ("layer1", "layer2")
    assert c.auto_count("student") == 2
    assert c.given_stages("student") == ()

    c = TrialConfig(student_stages=("layer1", "layer2", "layer3"))
    assert c.given_stages("student") == ("layer1", "layer2", "layer3")  # its own list wins
    assert c.to_dict()["student_stages"] == ["layer1", "layer2", "layer3"]


def test_stage_lists_of_different_lengths_are_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        TrialConfig(student=TV18, teacher=TV18, student_stages=("layer1", "layer2"),
                    teacher_stages=("layer3",))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("student_stages:")
    assert "2 student stages" in msg and "1 teacher stages" in msg
    # A built-in side counts its ``stages``.
    with pytest.raises(ValueError, match="3 student stages and 2 teacher stages"):
        TrialConfig(teacher=TV18, teacher_stages=("layer1", "layer2"))
    with pytest.raises(ValueError, match="^student_stages:"):
        TrialConfig(student_stages=("layer1", "layerX", "layer3"))  # built-in: layer1..4 only
    with pytest.raises(ValueError, match="^teacher_stages: must be distinct"):
        TrialConfig(teacher=TV18, teacher_stages=("layer1", "layer1"))


def _hand_key(precision: str, fingerprint: str) -> str:
    """The teacher key of ``TeacherConfig()`` as computed before the per-side stages: the
    TrialConfig fields of that time, written out by hand (device left out)."""
    trial = {
        "group": "baseline", "student": "resnet50", "student_width": 1.0, "student_cbam": True,
        "teacher": "resnet50", "teacher_width": 1.0, "teacher_cbam": True, "stem": "cifar",
        "T": 4.0, "w_ce": 1.0, "w_kl": 0.0, "w_at": 0.0, "w_fa": 0.0, "mask_pct": 0.0,
        "mask_target": "label", "stages": ["layer2", "layer3", "layer4"], "lr": 0.05,
        "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "epochs": 30,
        "batch_size": 64, "patience": 0, "seed": 0, "precision": precision, "compile": False,
        "eval_batch_size": 512,
    }
    blob = json.dumps({"trial": trial, "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_teacher_hash_unchanged_by_the_new_fields_at_their_defaults(monkeypatch):
    data = SimpleNamespace(fingerprint="fp-test")
    config = TeacherConfig()
    for precision in ("fp32", "bf16"):
        assert config._hash_with(precision, data) == _hand_key(precision, "fp-test")
    # The teacher's own stages and a checkpoint do not change how it trains.
    assert TeacherConfig(stages=("layer3",), checkpoint="t.pt")._hash_with("fp32", data) == \
        _hand_key("fp32", "fp-test")

    trial = config.trial_config()
    for field, value in (("student_stages", ("layer2", "layer3", "layer4")),
                         ("teacher_stages", ("layer1", "layer2", "layer3"))):
        monkeypatch.setattr(TeacherConfig, "trial_config",
                            lambda self, f=field, v=value: dataclasses.replace(trial, **{f: v}))
        assert config._hash_with("fp32", data) != _hand_key("fp32", "fp-test"), field


# ---------------------------------------------------------------------------------------------
# 12. User code on Ray workers


def test_module_path_of_a_file_a_package_and_installed_code(tmp_path, monkeypatch):
    from search.engine.user_code import module_path

    (tmp_path / "kdtest_single.py").write_text("X = 1\n")
    pkg = tmp_path / "kdtest_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "models.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_path("kdtest_single") == (tmp_path / "kdtest_single.py").resolve()
    assert module_path("kdtest_pkg") == pkg.resolve()
    assert module_path("kdtest_pkg.sub.models") == pkg.resolve()  # the top-level package
    assert module_path("numpy") is None  # installed
    assert module_path("kdcore") is None and module_path("search.engine") is None  # ours
    with pytest.raises(ValueError, match="kdtest_missing_mod"):
        module_path("kdtest_missing_mod")
    for name in ("kdtest_single", "kdtest_pkg"):
        assert name not in sys.modules  # found, not imported


def test_runtime_env_ships_the_studys_own_model_code(tmp_path, monkeypatch):
    from search.engine.user_code import runtime_env
    from search.study import StudyConfig

    mod = tmp_path / "kdtest_study_models.py"
    mod.write_text("def small(num_classes):\n    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = str(tmp_path / "store")
    config = StudyConfig(storage=store, student="kdtest_study_models:small")
    assert runtime_env(config) == {"py_modules": [str(mod.resolve())]}
    both = StudyConfig(storage=store, student="kdtest_study_models:small",
                       teacher=TeacherConfig(arch="kdtest_study_models:small"))
    assert runtime_env(both) == {"py_modules": [str(mod.resolve())]}  # listed once
    assert runtime_env(StudyConfig(storage=store)) is None
    assert runtime_env(StudyConfig(storage=store, student=TV18)) is None


# ---------------------------------------------------------------------------------------------
# 13. kdsearch models


def test_kdsearch_models_lists_the_small_cnn(tiny_models, capsys):
    import tiny_models as tm

    from search.commands.cli import main

    # 3x3 convs without bias: 3*16*9 + 16*32*9 + 32*64*9; BatchNorm 2 * (16 + 32 + 64);
    # the head 64 * 10 + 10 (10 classes by default).
    by_hand = 432 + 4608 + 18432 + 2 * (16 + 32 + 64) + 650
    assert sum(p.numel() for p in tm.small_cnn(10).parameters()) == by_hand == 24_346
    assert main(["models", TINY, "--image-size", "40"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"{TINY}: 24,346 parameters; input 3x40x40")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith("  ")}
    assert rows["block2.1.2"][0] == "32x20x20"
    assert "  block2.1.2  32x20x20" in out
    assert rows["block1.0"] == ["16x40x40"]
    assert "head" not in rows and "mean" not in rows  # not (C, H, W) outputs
    marked = [name for name, rest in rows.items() if rest[1:] == ["<-", "default"]]
    assert marked == ["block1.2", "block2.1.2", "block3.1.2"]
    assert "default stages: ['block1.2', 'block2.1.2', 'block3.1.2']" in out


def test_kdsearch_models_bad_spec_is_one_line_and_status_2(capsys):
    from search.commands.cli import main

    assert main(["models", "foo:bar"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kdsearch models: error: foo:bar: cannot import foo")
    assert captured.out == ""
