"""Your own models end to end: a student from the user's module, a torchvision teacher from a
checkpoint written by a plain PyTorch loop, an ImageFolder of 3 classes at 40x40.

The study is the README's example (examples/own_models): its model file, its teacher script
and its study config, with this test's data and storage. The model module sits in a folder
that only the driver has on its PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, env, kdsearch, ray_cluster, run, write_toml

EXAMPLE = REPO / "examples" / "own_models"
CLASSES = 3
SIZE = 40


def make_imagefolder(root: Path, train: int = 40, test: int = 12, size: int = SIZE) -> Path:
    """Learnable images: each class its own colour and bright quadrant, PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)])
    half = size // 2
    for split, n in (("train", train), ("test", test)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.normal(128, 40, (size, size, 3)) * 0.6 + colours[c] * 0.4
                r, q = divmod(c, 2)
                img[r * half:(r + 1) * half, q * half:(q + 1) * half] += 50
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """The data, the teacher checkpoint (the example's plain loop) and the model folder."""
    root = tmp_path_factory.mktemp("own")
    data = make_imagefolder(root / "data")
    teacher = root / "teacher.pt"
    done = subprocess.run([sys.executable, str(EXAMPLE / "train_teacher.py"), str(data),
                           str(teacher), "--epochs", "3"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    mods = root / "mods"
    mods.mkdir()
    shutil.copy(EXAMPLE / "tiny_models.py", mods)
    return {"root": root, "data": data, "teacher": teacher, "mods": mods}


def study_config(own: dict, storage: Path, name: str) -> Path:
    """The example's study config with this test's data, storage and checkpoint, and a
    smaller budget (one trial per group, two epochs)."""
    settings = tomllib.loads((EXAMPLE / "study.toml").read_text())
    settings.update(study=name, data=f"imagefolder:{own['data']}", storage=str(storage),
                    samples=1, max_epochs=2, grace_period=1, batch_size=16, seeds=2)
    settings["teacher"]["checkpoint"] = str(own["teacher"])
    return write_toml(storage.parent / f"{name}.toml", settings)


def plain_teacher_accuracy(own: dict) -> float:
    """The teacher's test accuracy measured without kdsearch: torchvision's ImageFolder and
    the normalisation the example trained it with."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean, std)])
    test = torchvision.datasets.ImageFolder(str(own["data"] / "test"), transform=transform)
    x = torch.stack([img for img, _ in test])
    y = torch.tensor([label for _, label in test])
    model = torchvision.models.resnet18(num_classes=CLASSES)
    model.load_state_dict(torch.load(own["teacher"], weights_only=True)["model"])
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def check_study(own: dict, storage: Path, name: str, stdout: str) -> None:
    """What the issue asks of the study: five groups tuned and reproduced, the teacher never
    trained, AT and FA reaching the student, the teacher in the report, no paper column."""
    import json

    from search.store.sink import read_table

    study_dir = storage / name
    trials, epochs = read_table(str(study_dir), "trials"), read_table(str(study_dir), "epochs")
    runs = read_table(str(study_dir), "runs")
    groups = ("baseline", "kd", "fa", "at", "combined")
    assert sorted(set(trials["group"])) == sorted(groups)
    assert sorted(runs.groupby("group").size().items()) == sorted((g, 2) for g in groups)
    # Never trained by kdsearch: no teacher epochs, no cached teacher file; the study records
    # the checkpoint's content hash.
    assert "teacher epoch" not in stdout and "not trained" in stdout
    assert not list(storage.glob("teachers/teacher-*.pt"))
    doc = json.loads((study_dir / "study.json").read_text())
    assert doc["teacher_hash"] == hashlib.sha256(own["teacher"].read_bytes()).hexdigest()[:16]
    assert doc["data_classes"] == [f"class{c}" for c in range(CLASSES)]
    # AT and FA reach the student in every epoch of the groups that use them.
    for group, terms in (("at", ("at",)), ("fa", ("fa",)), ("combined", ("at", "fa"))):
        rows = epochs[epochs["group"] == group]
        assert len(rows) > 0
        for term in terms:
            assert (rows[f"gshare_{term}"] > 0).all(), (group, term)
    teacher = json.loads((study_dir / "teacher.json").read_text())
    assert abs(teacher["test_acc"] - plain_teacher_accuracy(own)) <= 1 / (12 * CLASSES) + 1e-9
    assert teacher["val_acc"] == pytest.approx(doc["teacher_val_acc"])  # driver and reproduce
    report = (study_dir / "report" / "report.md").read_text()
    assert f"**{teacher['test_acc'] * 100:.2f}%** test accuracy" in report
    assert "from the checkpoint" in report
    assert "paper" not in report.lower()


@pytest.mark.slow
def test_own_student_and_checkpoint_teacher_run_end_to_end(own, tmp_path):
    config = study_config(own, tmp_path / "store", "own")
    done = run(kdsearch("run", "--config", str(config)), 900,
               env=env(PYTHONPATH=f"{REPO}:{own['mods']}"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distilled stages (student <- teacher): block1 <- layer1, block2 <- layer2, " \
           "block3 <- layer3" in done.stdout
    check_study(own, tmp_path / "store", "own", done.stdout)


@pytest.mark.slow
def test_own_models_reach_the_workers_of_a_cluster(own, tmp_path):
    """The head offers no CPU to trials, and the worker node's Python cannot import the
    model module: Ray's runtime_env ships it from the driver."""
    config = study_config(own, tmp_path / "store", "own-cluster")
    with ray_cluster(workers=("127.0.0.3",), head_cpus=0, cpus=2) as cluster:
        probe = run([sys.executable, "-c", "import tiny_models"], 60, env=env())
        assert probe.returncode != 0 and "No module named 'tiny_models'" in probe.stderr
        done = run(kdsearch("run", "--config", str(config), "--address", cluster["address"]),
                   900, env=env(PYTHONPATH=f"{REPO}:{own['mods']}"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_study(own, tmp_path / "store", "own-cluster", done.stdout)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written.

NOT_A_MODEL = "def not_a_model(num_classes):\n    return num_classes\n"


@pytest.fixture
def small(tmp_path, monkeypatch) -> dict:
    """A small ImageFolder, the example's model module (and one that builds no model) on
    sys.path, a random-weight checkpoint of the teacher, a config writer."""
    import torch
    import torchvision

    monkeypatch.setenv("KDSEARCH_CACHE", str(tmp_path / "cache"))
    mods = tmp_path / "mods"
    mods.mkdir()
    shutil.copy(EXAMPLE / "tiny_models.py", mods)
    (mods / "not_models.py").write_text(NOT_A_MODEL)
    monkeypatch.syspath_prepend(str(mods))
    data = make_imagefolder(tmp_path / "data", train=6, test=2)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": torchvision.models.resnet18(num_classes=CLASSES).state_dict()}, teacher)
    settings = tomllib.loads((EXAMPLE / "study.toml").read_text())
    settings.update(data=f"imagefolder:{data}", storage=str(tmp_path / "store"), val_size=3,
                    samples=1, max_epochs=1, grace_period=1)
    settings["teacher"]["checkpoint"] = str(teacher)

    def config(**changes) -> str:
        teacher_changes = changes.pop("teacher", {})
        body = {**settings, **changes, "teacher": {**settings["teacher"], **teacher_changes}}
        return str(write_toml(tmp_path / "bad.toml", body))

    return {"tmp": tmp_path, "data": data, "config": config}


def _wrong_keys_checkpoint(tmp_path: Path) -> str:
    import torch
    import torchvision

    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": torchvision.models.resnet34(num_classes=CLASSES).state_dict()},
               path)
    return str(path)


def _mixed_sizes(data: Path) -> None:
    from PIL import Image

    Image.new("RGB", (SIZE + 8, SIZE)).save(data / "train" / "class1" / "odd.png")


BAD = {
    "checkpoint with wrong keys": (
        lambda s: s["config"](teacher={"checkpoint": _wrong_keys_checkpoint(s["tmp"])}),
        "does not fit torchvision:resnet18: unexpected keys layer1.2.conv1.weight"),
    "stage the model lacks": (
        lambda s: s["config"](student_stages=["block1", "blockX", "block3"]),
        "student_stages: tiny_models:small_cnn has no node or module 'blockX' (it has block1, "
        "block2, block3, head;"),
    "unimportable module": (
        lambda s: s["config"](student="no_such_module:make"),
        "no_such_module:make: cannot import no_such_module (ModuleNotFoundError"),
    "callable that builds no module": (
        lambda s: s["config"](student="not_models:not_a_model"),
        "not_models:not_a_model(num_classes=3) returned int, not a torch.nn.Module"),
    "stage lists of different lengths": (
        lambda s: s["config"](student_stages=["block2", "block3"]),
        "student_stages: 2 student stages and 3 teacher stages"),
    "mixed image sizes": (
        lambda s: (_mixed_sizes(s["data"]), s["config"]())[1],
        "odd.png is 48x40, expected 40x40 like the others; set image_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_own_model_input_is_one_line_and_writes_nothing(case, small, capsys):
    from search.commands.cli import main

    make, expected = BAD[case]
    config = make(small)
    rc = main(["run", "--config", config])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and err.startswith("kdsearch run: error: "), err
    assert expected in err, err
    store = small["tmp"] / "store"
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]
