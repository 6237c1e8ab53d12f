"""Reliability: faults survived, bad input refused, nothing lost (see docs/RELIABILITY.md).

Faults are injected into real Ray runs: a trial's worker process, the driver, and a whole
worker node of a two-node loopback cluster are killed with SIGKILL while a study runs. Bad
input is fed to the command line, which must answer with one line on stderr and exit status 2
while an existing study stays byte-for-byte unchanged. Every process a test starts is stopped
by process id; all traffic stays on loopback addresses.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    REPO,
    TINY,
    check_search_tables,
    cmdline,
    descendants,
    env,
    kdsearch,
    processes,
    ray_cluster,
    run,
    spawn,
    tiny,
    wait_for,
    write_toml,
)

from search.store.sink import read_raw, read_table
from search.study import config_from_study_json, group_params, read_study_json

SEARCH_KEYS = ("trial_id", "attempt", "epoch")


@contextlib.contextmanager
def _started(argv: list[str], log: Path, **extra_env: str):
    """A driver in its own session, output to ``log``; when the block ends (or fails) the
    driver, its local Ray and every worker it started are killed (``helpers.spawn``)."""
    with open(log, "wb") as fh, spawn(argv, env=env(**extra_env), stdout=fh,
                                      stderr=subprocess.STDOUT) as proc:
        yield proc


def _wait_for_rows(proc: subprocess.Popen, log: Path, study_dir: str, ready, timeout=300):
    """Poll the ``epochs`` table until ``ready(rows)``; the driver must still be running."""
    def rows_ready():
        if proc.poll() is not None:
            raise AssertionError(f"driver ended (rc {proc.poll()})")
        rows = read_raw(study_dir, "epochs")
        return (rows,) if len(rows) and ready(rows) else None

    try:
        return wait_for(rows_ready, timeout, "epoch rows", period=0.2)[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {log.read_text(errors='replace')[-3000:]}") from None


def _finish(proc: subprocess.Popen, log: Path, timeout=400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None


def _assert_parts_whole(study_dir: str) -> dict[str, int]:
    """Every Parquet part a reader can see is a whole file; temporaries are hidden.

    Returns the number of visible parts and of hidden leftovers (a writer killed mid-write
    may leave a hidden temporary, which no reader lists)."""
    root = Path(study_dir)
    visible = hidden = 0
    for table in ("epochs", "trials", "runs", "robustness"):
        if not (root / table).is_dir():
            continue
        rows = 0
        for path in (root / table).rglob("*"):
            if not path.is_file():
                continue
            if path.name.startswith((".", "_")):
                hidden += 1
                continue
            assert path.suffix == ".parquet" and path.name.startswith("part-"), path
            rows += pq.read_table(path).num_rows  # raises on a half-written file
            visible += 1
        # pyarrow's own discovery (hidden files ignored) sees exactly those rows
        found = ds.dataset(root / table, format="parquet", partitioning="hive").count_rows()
        assert found == rows == len(read_raw(study_dir, table)), (table, found, rows)
    top = {p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert top <= {"study.json", "optuna.db"}, top
    return {"visible_parts": visible, "hidden_leftovers": hidden}


# ---------------------------------------------------------------------------------------------
# 1. A trial's worker process killed in the middle of an epoch


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_exactly(tmp_path):
    """SIGKILL the trial's Ray worker during epoch 2: Tune restarts it from the epoch-1
    checkpoint, every epoch is recorded once, and the trial's numbers equal those of an
    uninterrupted ``kdcore.fit`` with the same TrialConfig and seed."""
    from kdcore.teacher import load_teacher
    from kdcore.train import fit

    # synthetic:100 -> 900 training images: a kd epoch takes ~3-4 s on one core.
    settings = {**TINY, "data": "synthetic:100", "study": "wk", "groups": ["kd"], "samples": 1,
                "max_epochs": 3, "grace_period": 3}
    cfg = write_toml(tmp_path / "wk.toml", settings)
    store, log = tmp_path / "store", tmp_path / "tune.log"
    study_dir = str(store / "wk")
    with _started(kdsearch("tune", "--config", str(cfg), "--storage", str(store)), log) as proc:
        _wait_for_rows(proc, log, study_dir, lambda r: (r.epoch >= 1).any())
        below = descendants([proc.pid])
        workers = [pid for pid in below if "ray::train_trial." in cmdline(pid)]
        assert len(workers) == 1, [cmdline(p) for p in below]
        # Ray's dashboard is off locally: at most the minimal head, bound to loopback.
        for pid in below:
            if "dashboard/dashboard.py" in cmdline(pid):
                assert "--host=127.0.0.1" in cmdline(pid) and "--minimal" in cmdline(pid)
        # The epoch-1 checkpoint is on disk (the worker writes it before it reports)...
        wait_for(lambda: list((store / "wk" / "ray" / "search").glob("*/checkpoint_000000")),
                 60, "the epoch-1 checkpoint")
        # ...and the driver registers it with one call to the worker, which leaves no trace
        # on disk: a margin for that call, far inside epoch 2 (epochs take 3-4 s).
        time.sleep(0.5)
        os.kill(workers[0], signal.SIGKILL)
        rc = _finish(proc, log)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert not any(p in {pid for pid, _, _ in processes()} for p in workers)

    trials = read_table(study_dir, "trials")
    assert len(trials) == 1
    t = trials.iloc[0]
    assert (t.status, t.epochs_run) == ("completed", 3)
    # Tune saw the worker die and retried the trial (FailureConfig); the error is on file
    errors = list((store / "wk" / "ray" / "search").glob("*/error.txt"))
    assert len(errors) == 1, errors
    text = errors[0].read_text()
    assert text.count("Failure #") == 1 and f"pid: {workers[0]}" in text, text[:1000]
    raw = read_raw(study_dir, "epochs")
    epochs = read_table(study_dir, "epochs").sort_values("epoch")
    # each (trial, epoch) once, and nothing was ever written twice
    assert epochs.epoch.tolist() == [1, 2, 3] and len(raw) == 3
    # the kill landed in epoch 2, before its report: epochs 2 and 3 ran in the second attempt
    assert epochs.attempt.tolist() == [1, 2, 2], epochs[["epoch", "attempt"]]

    doc = read_study_json(str(store), "wk")
    config = config_from_study_json(doc)
    data = config.load_data()
    assert data.fingerprint == doc["data_fingerprint"]
    teacher = load_teacher(config.teacher_cache / f"teacher-{doc['teacher_hash']}.pt",
                           config.teacher, data.num_classes)
    trial = config.trial_config("kd", {p: float(t[f"cfg_{p}"]) for p in group_params("kd")},
                                int(t.seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))  # what the trainable uses
    try:
        ref = fit(trial, data, teacher)
    finally:
        torch.set_num_threads(threads)
    assert ref.epochs_run == 3
    worst = 0.0
    for metric in ("val_acc", "val_loss", "train_loss", "loss_ce", "loss_kl"):
        want = [h[metric] for h in ref.history]
        got = epochs[metric].tolist()
        assert got == pytest.approx(want, abs=1e-6, rel=0), (metric, got, want)
        worst = max(worst, *(abs(a - b) for a, b in zip(got, want, strict=True)))
    assert t.best_val_acc == pytest.approx(max(h["val_acc"] for h in ref.history), abs=1e-6)
    print(f"\nworker kill: attempts {epochs.attempt.tolist()}, "
          f"final val_acc {epochs.val_acc.iloc[-1]:.6f} val_loss {epochs.val_loss.iloc[-1]:.6f}, "
          f"largest difference to uninterrupted fit {worst:.3g}")


# ---------------------------------------------------------------------------------------------
# 2. The driver killed during `kdsearch tune`, then `--resume`


@pytest.mark.slow
def test_driver_killed_then_resume_loses_nothing(tmp_path):
    """SIGKILL the driver (and its local Ray) mid-study; ``--resume`` finishes it with every
    trial and epoch recorded once, the sampled configurations intact and every part whole."""
    settings = {**TINY, "study": "r", "groups": ["kd"], "samples": 3, "max_epochs": 4,
                "grace_period": 4}
    cfg = write_toml(tmp_path / "r.toml", settings)
    store, log = tmp_path / "store", tmp_path / "first.log"
    cmd = kdsearch("tune", "--config", str(cfg), "--storage", str(store), "--study", "r")
    study_dir = str(store / "r")
    with _started(cmd, log) as proc:
        rows = _wait_for_rows(proc, log, study_dir,
                              lambda r: r.groupby("trial_id").epoch.max().max() >= 2)
        # Tune saved its experiment state (which trial has which checkpoint) after that
        # report: what --resume restores from (it saves every few trial checkpoints).
        reported = rows.loc[rows.epoch >= 2, "timestamp"].min()
        wait_for(lambda: any(f.stat().st_mtime > reported for f in
                             (store / "r" / "ray" / "search").glob("experiment_state-*.json")),
                 60, "Tune to save its experiment state after epoch 2")
        killed = len(proc.watch.alive())  # the driver, its local Ray and workers
        proc.reap()
    before = read_table(study_dir, "trials")
    assert len(before) < 3  # it really was interrupted
    rows_before = read_raw(study_dir, "epochs")
    done = run(cmd + ["--resume"], 400, env=env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "search summary" in done.stdout

    config = config_from_study_json(read_study_json(str(store), "r"))
    trials = check_search_tables(study_dir, config, "kd")  # complete, in range, one per key
    assert set(trials.status) <= {"completed", "asha_stopped"}
    epochs = read_table(study_dir, "epochs")
    assert not epochs.duplicated(list(SEARCH_KEYS)).any()
    raw = read_raw(study_dir, "epochs")
    resumed = raw[raw.attempt >= 2]
    assert len(resumed) and (resumed.epoch > 1).all()  # continued from a checkpoint
    # rows written before the kill are still there, unchanged
    keys = rows_before[list(SEARCH_KEYS)].apply(tuple, axis=1)
    assert set(keys) <= set(raw[list(SEARCH_KEYS)].apply(tuple, axis=1))
    # Optuna's history survived: samples distinct configurations, each in the space, and a
    # resumed trial kept the configuration it was sampled with
    params = [f"cfg_{p}" for p in group_params("kd")]
    assert len(trials[params].drop_duplicates()) == config.samples
    for _, t in trials.iterrows():
        mine = raw.loc[raw.trial_id == t.trial_id, params]
        assert (mine == t[params].to_numpy()).all().all(), t.trial_id
    assert (store / "r" / "ray" / "search.done.json").is_file()
    # The same Optuna study continued: one Optuna trial per Tune trial, in agreeing states;
    # proposals made but never saved by Tune before the kill are FAIL and marked orphaned.
    import optuna

    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{store / 'r' / 'optuna.db'}")
    kept = [t for t in study.trials if not t.user_attrs.get("orphaned")]
    assert sorted(t.user_attrs["trial_id"] for t in kept) == sorted(trials.trial_id)
    state = {"completed": "COMPLETE", "asha_stopped": "PRUNED"}
    for t in kept:
        row = trials.set_index("trial_id").loc[t.user_attrs["trial_id"]]
        assert t.state.name == state[row.status], (t.number, t.state, row.status)
    assert all(t.state.name == "FAIL" for t in study.trials if t.user_attrs.get("orphaned"))
    files = _assert_parts_whole(study_dir)
    print(f"\ndriver kill: {killed} processes killed, {len(before)} trials finished before, "
          f"{len(rows_before)} epoch rows kept, {len(resumed)} resumed epochs, {files}")


# ---------------------------------------------------------------------------------------------
# 3. A worker node of a two-node cluster killed


FAST_NODE_DEATH = {  # the head declares a silent node dead after ~3 s instead of ~30 s
    "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
}


@pytest.mark.slow
def test_worker_node_killed_trials_finish_on_the_head(tmp_path):
    """SIGKILL the raylet and workers of node 127.0.0.3 while it runs a trial: that trial
    finishes on the head from its checkpoint; no trial fails, no epoch is lost."""
    settings = {**TINY, "data": "synthetic:150", "study": "nk", "groups": ["baseline"],
                "samples": 2, "max_epochs": 3}
    cfg = write_toml(tmp_path / "nk.toml", settings)
    store, log = tmp_path / "store", tmp_path / "tune.log"
    study_dir = str(store / "nk")
    with ray_cluster(workers=("127.0.0.3",), extra_env=FAST_NODE_DEATH) as cluster:
        with _started(kdsearch("tune", "--config", str(cfg), "--storage", str(store),
                               "--address", cluster["address"]), log) as proc:
            _wait_for_rows(proc, log, study_dir, lambda r: (r.node == "127.0.0.3").any())
            # the worker node: everything its `ray start` session started, and their children
            node_session = cluster["leaders"][1]
            procs = processes()
            members = {pid for pid, _, pgid in procs if pgid == node_session}
            victims = members | descendants(list(members), procs)
            raylets = [p for p in victims if cmdline(p).split(" ")[0].endswith("/raylet")]
            assert len(raylets) == 1 and "--node_ip_address=127.0.0.3" in cmdline(raylets[0])
            assert any("ray::train_trial." in cmdline(p) for p in victims)
            assert not any("--node-ip-address=127.0.0.2" in cmdline(p) for p in victims)
            killed_at = time.time()
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            rc = _finish(proc, log)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    config = config_from_study_json(read_study_json(str(store), "nk"))
    trials = check_search_tables(study_dir, config, "baseline")
    assert len(trials) == config.samples
    assert set(trials.status) <= {"completed", "asha_stopped"}, trials[["status", "error"]]
    raw = read_raw(study_dir, "epochs")
    on_worker = raw[raw.node == "127.0.0.3"]
    assert len(on_worker) >= 1 and (on_worker.timestamp < killed_at).all()
    assert (raw.loc[raw.timestamp > killed_at, "node"] == "127.0.0.2").all()
    moved = on_worker.trial_id.iloc[0]
    latest = read_table(study_dir, "epochs")
    after = latest[(latest.trial_id == moved) & (latest.timestamp > killed_at)]
    assert len(after) >= 1 and (after.node == "127.0.0.2").all() and (after.attempt >= 2).all()
    print(f"\nnode kill: {len(victims)} processes of 127.0.0.3 killed; trial {moved} ran "
          f"epochs {sorted(on_worker.epoch)} there and {sorted(after.epoch)} on the head")


# ---------------------------------------------------------------------------------------------
# 6. A diverging configuration (the study is reused as "earlier results" by the bad-input test)


DIVERGE = {**TINY, "study": "div", "groups": ["kd", "baseline"], "samples": 2, "max_epochs": 2,
           "grace_period": 2, "space": {"w_kl": {"low": 1e36, "high": 1e37, "log": True}}}


@pytest.fixture(scope="module")
def diverged_study(tmp_path_factory):
    """A finished study: kd with a planted w_kl range (1e36..1e37, diverges in epoch 1) and a
    baseline that behaves. Returns (storage, completed process)."""
    root = tmp_path_factory.mktemp("diverge")
    cfg = write_toml(root / "div.toml", DIVERGE)
    store = root / "store"
    done = run(kdsearch("tune", "--config", str(cfg), "--storage", str(store)), 400, env=env())
    return store, done


@pytest.mark.slow
def test_diverging_configuration_is_recorded_and_the_study_completes(diverged_study):
    store, done = diverged_study
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"kd\s+2 trials \(2 diverged\)", done.stdout), done.stdout[-2000:]
    study_dir = str(store / "div")
    trials = read_table(study_dir, "trials")
    kd, base = trials[trials.group == "kd"], trials[trials.group == "baseline"]
    assert len(kd) == 2 and (kd.status == "diverged").all() and (kd.epochs_run == 0).all()
    assert kd.error.str.contains("non-finite loss in epoch 1").all()
    assert kd.cfg_w_kl.between(1e36, 1e37).all()
    assert len(base) == 2 and (base.status == "completed").all() and (base.epochs_run == 2).all()
    epochs = read_table(study_dir, "epochs")
    assert set(epochs.group) == {"baseline"} and len(epochs) == 4  # no row for a diverged epoch
    assert epochs.val_loss.map(np.isfinite).all()
    assert (store / "div" / "ray" / "search.done.json").is_file()
    files = _assert_parts_whole(study_dir)
    print(f"\ndiverge: kd {kd.status.tolist()}, baseline {base.status.tolist()}, {files}")


# ---------------------------------------------------------------------------------------------
# 4. Bad input: one line on stderr, exit status 2, no traceback, earlier results untouched


class _Evil:
    """Unpickling this creates the file ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _png(path: Path, seed: int, size=(32, 32)) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, classes=("ant", "bee"), train=6, test=2) -> Path:
    for split, n in (("train", train), ("test", test)):
        for c, cls in enumerate(classes):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", 100 * c + i + (0 if split == "train" else 50))
    return root


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and every directory, as 'dir')."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_dir():
                out[str(path)] = "dir"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def bad_inputs(diverged_study, tmp_path_factory):
    """The existing study plus every planted bad input, and a snapshot of all of it."""
    from kdcore.teacher import TeacherConfig, build_teacher, save_teacher

    store, done = diverged_study
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path_factory.mktemp("bad")
    base = {**TINY, "study": "new", "groups": ["kd"], "samples": 1}
    paths = {"S": str(store), "T": str(root), "base": str(write_toml(root / "base.toml", base))}
    # Teachers: three configs whose cache entries are planted in <storage>/teachers/.
    data = tiny(root).load_data()
    for name, seed in (("corrupt", 7), ("wrongarch", 8), ("pickled", 9)):
        settings = {**base, "teacher": {**TINY["teacher"], "seed": seed}}
        paths[f"t_{name}"] = str(write_toml(root / f"t_{name}.toml", settings))
        config = tiny(root, teacher=settings["teacher"])
        target = store / "teachers" / f"teacher-{config.teacher.content_hash(data)}.pt"
        assert not target.exists()
        if name == "corrupt":
            target.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
        elif name == "wrongarch":
            wrong = TeacherConfig(arch="resnet18", width=0.125, cbam=False)
            save_teacher(target, build_teacher(wrong, 10), {})
        else:
            torch.save({"state_dict": _Evil(root / "PWNED"), "meta": {}}, target)
    # Bad study settings in files.
    for name, settings in {
        "arch": {**base, "student": "vgg16"}, "groups": {**base, "groups": ["kd", "nope"]},
        "w_neg": {**base, "space": {"w_fa": {"low": -1.0, "high": 1.0, "log": False}}},
        "w_inf": {**base, "space": {"w_kl": {"low": 0.1, "high": float("inf")}}},
        "T0": {**base, "space": {"T": {"low": 0.0, "high": 4.0, "log": False}}},
        "mask": {**base, "space": {"mask_pct": {"low": 0.0, "high": 100.0}}},
        "batch": {**base, "batch_size": -4}, "tepochs": {**base, "teacher": {"epochs": 0}},
    }.items():
        paths[f"c_{name}"] = str(write_toml(root / f"c_{name}.toml", settings))
    # Image folders: good, class folders differ, empty class, non-image file, truncated JPEG.
    _image_folder(root / "img_good")
    differ = _image_folder(root / "img_differ")
    (differ / "test" / "bee").rename(differ / "test" / "wasp")
    empty = _image_folder(root / "img_empty")
    (empty / "train" / "cat").mkdir()
    (empty / "test" / "cat").mkdir()
    junk = _image_folder(root / "img_junk")
    (junk / "train" / "bee" / "notes.png").write_text("not an image\n")
    trunc = _image_folder(root / "img_trunc")
    from PIL import Image

    Image.open(trunc / "train" / "ant" / "0.png").save(trunc / "train" / "ant" / "x.jpg")
    blob = (trunc / "train" / "ant" / "x.jpg").read_bytes()
    (trunc / "train" / "ant" / "x.jpg").write_bytes(blob[: len(blob) // 3])
    # Studies with a damaged Parquet part: garbage bytes, and a real part cut in half.
    for name in ("div-garbage", "div-trunc"):
        shutil.copytree(store / "div", store / name)
    garbage = store / "div-garbage" / "epochs" / "group=baseline" / "part-9-garbage.parquet"
    garbage.write_bytes(b"PAR1" + os.urandom(200))
    part = sorted((store / "div-trunc" / "trials" / "group=kd").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-40])
    paths["garbage"], paths["trunc"] = str(garbage), str(part)
    # A regular file where storage would need a directory.
    (root / "afile").write_text("I am a file\n")
    cache = tmp_path_factory.mktemp("cache")
    return {"paths": paths, "roots": (store, root), "cache": cache,
            "snapshot": _snapshot(store, root)}


# (id, command line with {placeholders}, text the one line must contain, run as a subprocess)
BAD_INPUT = [
    # unknown group or architecture
    ("group-flag", "tune --config {base} --storage {S} --group nope", "invalid choice", True),
    ("group-file", "tune --config {c_groups} --storage {S}", "groups:", False),
    ("arch-set", "train --group kd --set student=resnet99 --storage {S} --data synthetic:4",
     "student: unknown architecture", False),
    ("arch-file", "tune --config {c_arch} --storage {S}", "student", False),
    # negative or non-finite weights
    ("w-negative", "train --group kd --set w_kl=-1 --storage {S} --data synthetic:4", "w_kl:",
     False),
    ("w-inf", "train --group at --set w_at=inf --storage {S} --data synthetic:4", "w_at:", False),
    ("w-space-neg", "tune --config {c_w_neg} --storage {S}", "space.w_fa", False),
    ("w-space-inf", "tune --config {c_w_inf} --storage {S}", "space.w_kl", False),
    # temperature
    ("T-zero", "train --group kd --set T=0 --storage {S} --data synthetic:4", "T:", False),
    ("T-space", "tune --config {c_T0} --storage {S}", "space.T", False),
    # mask_pct outside [0, 100)
    ("mask-100", "train --group at --set mask_pct=100 --storage {S} --data synthetic:4",
     "mask_pct:", False),
    ("mask-neg", "train --group fa --set mask_pct=-10 --storage {S} --data synthetic:4",
     "mask_pct:", False),
    ("mask-space", "tune --config {c_mask} --storage {S}", "space.mask_pct", False),
    # epochs or batch size <= 0
    ("epochs-set", "train --set epochs=0 --storage {S} --data synthetic:4", "epochs:", False),
    ("batch-set", "train --set batch_size=0 --storage {S} --data synthetic:4", "batch_size:",
     False),
    ("epochs-flag", "tune --config {base} --storage {S} --epochs -1", "max_epochs", False),
    ("batch-file", "tune --config {c_batch} --storage {S}", "batch_size", False),
    ("teacher-epochs", "teacher --config {c_tepochs} --storage {S}", "teacher.epochs", False),
    # data
    ("data-missing", "tune --config {base} --storage {S} --data imagefolder:{T}/nowhere",
     "does not exist", False),
    ("data-classes", "tune --config {base} --storage {S} --data imagefolder:{T}/img_differ",
     "class folders differ", False),
    ("data-empty", "tune --config {base} --storage {S} --data imagefolder:{T}/img_empty",
     "empty class folder", False),
    ("data-nonimage", "tune --config {base} --storage {S} --data imagefolder:{T}/img_junk",
     "notes.png", False),
    ("data-truncated", "train --storage {S} --data imagefolder:{T}/img_trunc --val-size 2",
     "x.jpg", False),
    # teacher checkpoints planted where the study expects its teacher
    ("teacher-corrupt", "teacher --config {t_corrupt} --storage {S}",
     "cannot read teacher checkpoint", False),
    ("tune-teacher-corrupt", "tune --config {t_corrupt} --storage {S}",
     "cannot read teacher checkpoint", True),
    ("teacher-wrongarch", "tune --config {t_wrongarch} --storage {S}",
     "does not fit resnet50 (width 0.125, cbam True, stem cifar): missing keys", False),
    ("teacher-pickled", "teacher --config {t_pickled} --storage {S}",
     "cannot read teacher checkpoint", False),
    # a damaged Parquet part: analyze names the file
    ("parquet-garbage", "analyze --study div-garbage --storage {S}", "{garbage}", True),
    ("parquet-truncated", "analyze --study div-trunc --storage {S} --format csv", "{trunc}",
     False),
    # storage that cannot be a directory (root ignores chmod, so: a path under a file)
    ("storage-tune", "tune --config {base} --storage {T}/afile/store", "storage:", True),
    ("storage-teacher", "teacher --config {base} --storage {T}/afile/store", "storage:", False),
    ("storage-train", "train --storage {T}/afile/store --data synthetic:4", "storage:", False),
    # an unreachable Ray address
    ("address-resume", "tune --resume --study div --storage {S} --address 127.0.0.9:1",
     "address:", False),
    ("address-env", "tune --config {base} --storage {S} ENV:RAY_ADDRESS=127.0.0.9:1",
     "address:", True),
    ("address-reproduce",
     "reproduce --study div --group baseline --storage {S} --address 127.0.0.9:1",
     "address:", False),
    # study names that would escape storage (here they would reach the real study 'div')
    ("name-analyze", "analyze --study ../div --storage {S}/teachers", "study:", False),
    ("name-reproduce", "reproduce --study ../div --storage {S}/teachers", "study:", False),
    ("name-resume", "tune --resume --study ../div --storage {S}/teachers", "study:", False),
    ("name-teacher", "teacher --config {base} --study /abs --storage {S}", "study:", False),
    ("name-train", "train --study ../x --storage {S}/teachers --data synthetic:4", "study:",
     False),
]


def _run_cli(argv: list[str], extra_env: dict[str, str], subprocess_: bool, capfd,
             monkeypatch) -> tuple[int, str]:
    if subprocess_:
        # Ray's default environment (token authentication on): starting Ray would print.
        base = {k: v for k, v in os.environ.items()
                if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        proc = run(kdsearch(*argv), 300, env={**base, "PYTHONPATH": str(REPO),
                                              "RAY_USAGE_STATS_ENABLED": "0", **extra_env})
        return proc.returncode, proc.stderr
    from search.commands.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # --address defaults to it
    for key, value in extra_env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        import ray

        started_ray = ray.is_initialized()
        ray.shutdown()
    assert not started_ray, "bad input must be refused before Ray starts"
    return rc, capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("case, line, needle, as_subprocess", BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_and_earlier_results_untouched(
        bad_inputs, case, line, needle, as_subprocess, capfd, monkeypatch):
    paths = bad_inputs["paths"]
    words = [w.format(**paths) for w in line.split()]
    extra = dict(w[4:].split("=", 1) for w in words if w.startswith("ENV:"))
    argv = [w for w in words if not w.startswith("ENV:")]
    extra["KDSEARCH_CACHE"] = str(bad_inputs["cache"])
    rc, err = _run_cli(argv, extra, as_subprocess, capfd, monkeypatch)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"kdsearch {argv[0]}: error: "), lines[0]
    assert needle.format(**paths) in lines[0], lines[0]
    assert not (Path(paths["T"]) / "PWNED").exists()  # the pickled payload never ran
    print(f"\n{case}: {lines[0]}")
    after = _snapshot(*bad_inputs["roots"])
    changed = {k for k in after.keys() | bad_inputs["snapshot"].keys()
               if after.get(k) != bad_inputs["snapshot"].get(k)}
    assert not changed, sorted(changed)


# ---------------------------------------------------------------------------------------------
# 5. Files from elsewhere are never unpickled; Ray's dashboard stays off locally


SOURCES = [p for pkg in ("kdcore", "search", "analysis") for p in (REPO / pkg).rglob("*.py")]


def test_no_source_unpickles_files():
    assert len(SOURCES) >= 20
    banned = re.compile(r"\bpickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
                        r"|\bread_pickle\(|yaml\.(unsafe_)?load\(|yaml\.Loader\b")
    offenders = []
    loads = 0
    for path in SOURCES:
        text = path.read_text()
        offenders += [f"{path}:{m.group(0)}" for m in banned.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle") and any(
                    a.name in ("load", "loads") for a in node.names):
                offenders.append(f"{path}:{node.lineno}: from {node.module} import load")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)):
                continue
            if node.func.value.id == "torch":
                loads += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only")
            if node.func.value.id in ("pickle", "cloudpickle", "dill", "joblib"):
                offenders.append(f"{path}:{node.lineno}: {node.func.value.id}.load")
    assert not offenders, offenders
    assert loads >= 3  # the checker sees the real calls (teacher, checkpoint, trainable)


def test_pickled_objects_are_refused(tmp_path):
    from kdcore.teacher import TeacherConfig, load_teacher
    from kdcore.train import load_checkpoint

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker), "epoch": 1}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        load_teacher(path, TeacherConfig(width=0.125), 10)
    assert not marker.exists()
    # the control: the same file does run its payload when unpickled without the guard
    torch.load(path, weights_only=False)["state_dict"].close()  # deliberate, our own file
    assert marker.exists()


def test_local_ray_has_no_public_dashboard(tmp_path, monkeypatch):
    import ray

    from search.engine.ray_start import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(tiny(tmp_path))
    assert len(calls) == 1
    kw = calls[0]
    assert kw["address"] == "local" and kw["include_dashboard"] is False
    assert kw.get("dashboard_host", "127.0.0.1") == "127.0.0.1"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
