"""Trial tables at scale: the on-disk layout, compaction beside readers and writers, SIGKILL
in the middle of a compaction, other Parquet readers, and the light ``analyze`` command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import env, run, spawn

from analysis import layout, load_study
from analysis.constants import SCHEMAS
from search.store.compact import compact_group, compact_partition, compact_study
from search.store.sink import ParquetSink, part_files, read_raw, read_table

GROUPS = ("kd", "at")


def epoch(trial: str, e: int, attempt: int = 0, acc: float = 0.5, ts: float = 0.0) -> dict:
    return {"study": "s", "trial_id": trial, "attempt": attempt, "epoch": e, "seed": 0,
            "cfg_T": 2.0, "val_acc": acc, "node": "n0", "timestamp": ts or time.time()}


def write_parts(study_dir: str, epochs_per_group: int = 60, groups=GROUPS) -> None:
    """Epoch rows one part each (a re-sent epoch and a retried attempt among them), trial
    rows (one written twice), runs with an extra column and robustness rows."""
    sink = ParquetSink(study_dir, compact_every=None)
    for g in groups:
        for i in range(epochs_per_group):
            sink.append("epochs", g, [epoch(f"{g}{i // 10}", i % 10 + 1, acc=i / 1000)])
        sink.append("epochs", g, [epoch(f"{g}0", 2, acc=0.9)])  # re-sent, newer
        sink.append("epochs", g, [epoch(f"{g}0", 3, attempt=1, acc=0.8)])
        for t in range(epochs_per_group // 10):
            sink.append("trials", g, [{"study": "s", "trial_id": f"{g}{t}", "status":
                                       "asha_stopped", "epochs_run": 10, "best_val_acc": 0.4}])
        sink.append("trials", g, [{"study": "s", "trial_id": f"{g}0", "status": "completed",
                                   "epochs_run": 30, "best_val_acc": 0.5, "error": ""}])
        for seed in (1, 2):
            sink.append("runs", g, [{"study": "s", "seed": seed, "test_acc": 0.8,
                                     "params": 10, "extra_metric": 1.5}])
            sink.append("robustness", g, [{"study": "s", "seed": seed, "corruption": "fog",
                                           "severity": s, "acc": 0.5} for s in (1, 2)])
    Path(study_dir, "study.json").write_text(json.dumps({"study": "s", "max_epochs": 30}))


def snapshot(study_dir: str) -> dict[str, pd.DataFrame]:
    return {t: read_raw(study_dir, t) for t in SCHEMAS}


def assert_same_rows(study_dir: str, expected: dict[str, pd.DataFrame]) -> None:
    for table, rows in expected.items():
        got = read_raw(study_dir, table)
        pd.testing.assert_frame_equal(got, rows, check_like=False, obj=table)


def partition_names(study_dir: str, table: str, group: str) -> list[str]:
    return sorted(os.listdir(Path(study_dir, table, f"group={group}")))


@pytest.fixture
def start():
    """``start(script, *args)``: ``python -c script args`` in its own session; when the test
    ends (passed or not) it and everything it started are killed by id (``helpers.spawn``)."""
    with contextlib.ExitStack() as stack:
        def started(script: str, *args: str) -> subprocess.Popen:
            return stack.enter_context(spawn([sys.executable, "-c", script, *args], env=env(),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        yield started


def _count(path: Path) -> int:
    """The number in ``path`` (0 while it does not exist); written by ``_set_count``."""
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _set_count(path: Path, n: int) -> None:
    path.with_suffix(".tmp").write_text(str(n))
    path.with_suffix(".tmp").replace(path)  # atomic: a reader sees the old or the new number


# ---------------------------------------------------------------- layout and compaction


def test_compaction_keeps_every_row_in_write_order(tmp_path: Path) -> None:
    study = str(tmp_path / "s")
    write_parts(study)
    before = snapshot(study)
    deduped = {t: read_table(study, t) for t in SCHEMAS}
    assert len(deduped["epochs"]) == 2 * 61  # the re-sent epoch counts once, attempt 1 apart
    kd0 = deduped["epochs"].query("trial_id == 'kd0' and epoch == 2 and attempt == 0")
    assert kd0["val_acc"].tolist() == [0.9]
    assert deduped["trials"].set_index("trial_id").loc["kd0", "status"] == "completed"

    done = compact_study(study, min_age_s=0)
    assert sorted((d.table, d.group, d.merged) for d in done) == sorted(
        [("epochs", g, 62) for g in GROUPS] + [("trials", g, 7) for g in GROUPS]
        + [("runs", g, 2) for g in GROUPS] + [("robustness", g, 2) for g in GROUPS])
    for table in SCHEMAS:
        for g in GROUPS:
            names = partition_names(study, table, g)
            assert len(names) == 1 and layout.COMPACTED.fullmatch(names[0]), names
    assert_same_rows(study, before)  # same rows, same order: deduplication unchanged
    for table in SCHEMAS:
        pd.testing.assert_frame_equal(read_table(study, table), deduped[table])
    assert all(d.merged == 0 for d in compact_study(study, min_age_s=0))  # nothing left


def test_only_files_older_than_the_margin_are_merged(tmp_path: Path) -> None:
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=20)
    names = partition_names(study, "epochs", "kd")
    cutoff = layout.entry(names[12]).lo  # parts 0..11 are "older than the margin"
    fs = pafs.LocalFileSystem()
    before = snapshot(study)
    result = compact_partition(fs, f"{study}/epochs", "kd", "epochs", cutoff)
    assert (result.merged, result.newer, result.files) == (12, len(names) - 12, len(names) - 11)
    after = partition_names(study, "epochs", "kd")
    assert after[0].startswith(names[0][:25]) and layout.entry(after[0]).hi == layout.entry(
        names[11]).lo
    assert after[1:] == names[12:]  # newer parts untouched
    assert_same_rows(study, before)
    # A second, later compaction merges the compacted file with the rest.
    compact_partition(fs, f"{study}/epochs", "kd", "epochs", time.time_ns())
    assert len(partition_names(study, "epochs", "kd")) == 1
    assert_same_rows(study, before)


def test_the_sink_compacts_a_partition_every_n_appends(tmp_path: Path, monkeypatch) -> None:
    import search.store.sink

    monkeypatch.setattr(search.store.sink, "RUNNING_MARGIN_S", 0.0)
    study = str(tmp_path / "s")
    sink = ParquetSink(study, compact_every=4)
    for i in range(9):
        sink.append("epochs", "kd", [epoch("t", i + 1)])
    sink.append("epochs", "at", [epoch("u", 1)])
    names = partition_names(study, "epochs", "kd")  # 4 -> 1, then 1 + 4 -> 1, then 1 part
    assert len(names) == 2 and layout.COMPACTED.fullmatch(names[0]) and layout.PART.fullmatch(
        names[1])
    assert read_raw(study, "epochs").query("group == 'kd'")["epoch"].tolist() == list(
        range(1, 10))
    assert len(partition_names(study, "epochs", "at")) == 1


WRITER = """
import sys, time
from pathlib import Path
from search.store.sink import ParquetSink
s = ParquetSink(sys.argv[1])
done = Path(sys.argv[2])  # how many compactions the test has run so far
for i in range(300):
    if i in (100, 200, 299):  # interleave: rows 100, 200, 299 wait for 1, 2, 3 compactions
        deadline = time.monotonic() + 120
        while int(done.read_text() if done.exists() else 0) < i // 100 + (i == 299):
            assert time.monotonic() < deadline, "the test stopped compacting"
            time.sleep(0.01)
    s.append('epochs', 'kd', [{'trial_id': f't{i}', 'attempt': 0, 'epoch': 1,
                               'timestamp': time.time()}])
    time.sleep(0.005)
"""


def test_compaction_beside_a_writer_loses_nothing(tmp_path: Path, start) -> None:
    """A search appends while compactions (margin 0.2 s) run: every row ends up once. The
    writer waits at rows 100, 200 and 299 until 1, 2 and 3 compactions have run, so at least
    three run while it writes, however fast or slow either side is."""
    study = str(tmp_path / "s")
    done = tmp_path / "compactions"
    writer = start(WRITER, study, str(done))
    rounds = 0
    while writer.poll() is None:
        if Path(study, "epochs", "group=kd").is_dir():
            compact_group(study, "kd", ("epochs",), min_age_s=0.2)
            rounds += 1
            _set_count(done, rounds)
        time.sleep(0.05)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    compact_group(study, "kd", ("epochs",))
    rows = read_raw(study, "epochs")
    assert rounds >= 3
    assert sorted(rows["trial_id"]) == sorted(f"t{i}" for i in range(300))
    assert len(partition_names(study, "epochs", "kd")) == 1


STEPWISE = """
import sys, time
from pathlib import Path
import pyarrow.fs as pafs
from analysis import layout
from search.store.compact import compact_partition
study = sys.argv[1]
fs = pafs.LocalFileSystem()
stamps = {}
for table in ("epochs", "trials"):
    for g in ("kd", "at"):
        folder = f"{study}/{table}/group={g}"
        stamps[table, g] = [layout.entry(p).lo for p in layout.visible_files(fs, folder)]
step_file, seen_file = Path(sys.argv[2]), Path(sys.argv[3])
for step in range(1, 13):
    for (table, g), times in stamps.items():
        cutoff = times[min(len(times) - 1, step * len(times) // 12)] + 1
        compact_partition(fs, f"{study}/{table}", g, table, cutoff)
    step_file.with_suffix(".tmp").write_text(str(step))
    step_file.with_suffix(".tmp").replace(step_file)
    deadline = time.monotonic() + 120  # until a whole read began after this step
    while int(seen_file.read_text() if seen_file.exists() else 0) < step:
        assert time.monotonic() < deadline, "the reader stopped reading"
        time.sleep(0.01)
print("done")
"""


def test_reader_beside_compaction_sees_every_row_once(tmp_path: Path, start) -> None:
    """Compactions merge more and more of each partition while a reader reads in a loop:
    every read returns exactly the rows written, none missing, none twice. The compactor
    waits after each of its 12 steps until a whole read began after it (its 12 states are
    all read, however fast or slow either side is)."""
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=300)
    expected = {t: read_raw(study, t) for t in ("epochs", "trials")}
    step_file, seen_file = tmp_path / "step", tmp_path / "seen"
    compactor = start(STEPWISE, study, str(step_file), str(seen_file))
    reads, states = 0, set()
    while compactor.poll() is None:
        step = _count(step_file)  # the steps finished before this read began
        states.add(len(part_files(study, "epochs")[2]))
        assert_same_rows(study, expected)
        reads += 1
        _set_count(seen_file, step)
    assert compactor.returncode == 0, compactor.stderr.read().decode()[-2000:]
    assert_same_rows(study, expected)
    assert reads >= 3 and len(states) >= 3, (reads, states)  # it did read mid-compaction
    assert len(part_files(study, "epochs")[2]) == len(GROUPS)


KILLABLE = """
import sys
from search.store.compact import compact_group
compact_group(sys.argv[1], "kd", ("epochs",))
"""


def test_compaction_killed_midway_loses_nothing_and_a_rerun_finishes(tmp_path: Path,
                                                                     start) -> None:
    """SIGKILL the compaction as soon as its compacted file appears, while it deletes the
    parts it replaced: readers still see every row once; the next run finishes the job."""
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=1500, groups=("kd",))
    expected = snapshot(study)
    folder = Path(study, "epochs", "group=kd")
    proc = start(KILLABLE, study)
    compacted: list[str] = []
    while proc.poll() is None and not compacted:
        compacted = [n for n in os.listdir(folder) if layout.COMPACTED.fullmatch(n)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and compacted
    left = [n for n in os.listdir(folder) if layout.PART.fullmatch(n)]
    assert left, "the kill came after every replaced part was deleted"
    assert len(left) < 1502  # some parts were deleted, others not yet
    assert_same_rows(study, expected)  # compacted file + covered parts: each row once
    rerun = compact_group(study, "kd", ("epochs",))
    assert rerun[0].removed == len(left) and rerun[0].merged == 0
    assert os.listdir(folder) == compacted
    assert_same_rows(study, expected)


def test_equal_or_nested_compacted_files_are_read_once(tmp_path: Path) -> None:
    """Two compactions that raced (same range) and a stale smaller one: one file wins."""
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=10)
    expected = snapshot(study)
    folder = Path(study, "epochs", "group=kd")
    names = sorted(os.listdir(folder))
    lo, hi = layout.entry(names[0]).lo, layout.entry(names[-1]).lo
    rows = pq.read_table(folder / names[0])
    for path in folder.iterdir():  # one whole copy under each of three compacted names
        path.unlink()
    whole = expected["epochs"][expected["epochs"]["group"] == "kd"].drop(columns="group")
    table = pa.Table.from_pandas(whole, preserve_index=False).cast(rows.schema)
    for a, b in ((lo, hi), (lo, hi), (lo + 1, hi)):
        pq.write_table(table, folder / layout.compacted_name(a, b))
    assert_same_rows(study, expected)
    compact_group(study, "kd", ("epochs",))
    assert len(os.listdir(folder)) == 1
    assert_same_rows(study, expected)


# ---------------------------------------------------------------- other readers


def expected_types(table: str, frame: pd.DataFrame) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in SCHEMAS[table] if f.name in frame}


@pytest.mark.parametrize("compacted", [False, True], ids=["parts", "compacted"])
def test_pandas_and_pyarrow_read_every_table_directly(tmp_path: Path, compacted: bool) -> None:
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=20)
    if compacted:
        compact_study(study, min_age_s=0)
    for table in SCHEMAS:
        ours = read_raw(study, table)
        path = f"{study}/{table}"
        frame = pd.read_parquet(path)
        assert len(frame) == len(ours) and set(frame.columns) == set(ours.columns), table
        assert sorted(frame["group"].astype(str)) == sorted(ours["group"])
        via_pq = pq.read_table(path)
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        arrow = dataset.to_table()
        assert via_pq.num_rows == arrow.num_rows == len(ours), table
        assert arrow.schema.field("group").type == pa.string()
        for name, dtype in expected_types(table, ours).items():
            assert arrow.schema.field(name).type == dtype, (table, name)
            assert via_pq.schema.field(name).type == dtype, (table, name)
        if table == "runs":
            assert arrow.column("extra_metric").to_pylist() == [1.5] * len(ours)
        # the rows are the same (order aside)
        keys = ["group", *[c for c in ours.columns if c not in ("group", "timestamp")]][:6]
        left = arrow.to_pandas().sort_values(keys).reset_index(drop=True)
        right = ours.sort_values(keys).reset_index(drop=True)[list(left.columns)]
        pd.testing.assert_frame_equal(left, right, check_dtype=False, obj=table)


def test_old_layout_with_group_in_files_is_read_and_compaction_converts_it(
        tmp_path: Path) -> None:
    """Studies written before (``group`` in every file and in the path) still load; other
    readers refuse them until ``compact`` rewrites them."""
    study = tmp_path / "s"
    for g in GROUPS:
        folder = study / "trials" / f"group={g}"
        folder.mkdir(parents=True)
        for i in range(3):
            row = {"study": "s", "group": g, "trial_id": f"{g}{i}", "status": "completed",
                   "epochs_run": 30}
            table = pa.table({k: [v] for k, v in row.items()})
            pq.write_table(table, folder / layout.part_name(time.time_ns()))
    trials = load_study(study).trials
    assert len(trials) == 6 and sorted(trials["group"].unique()) == ["at", "kd"]
    with pytest.raises((pa.ArrowException, ValueError)):
        pd.read_parquet(study / "trials")
    compact_study(str(study), min_age_s=0)
    frame = pd.read_parquet(study / "trials")
    assert len(frame) == 6 and "group" in frame
    pd.testing.assert_frame_equal(load_study(study).trials, trials)


# ---------------------------------------------------------------- commands


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess:
    """``kdsearch ARGS`` in a fresh interpreter; ``code`` runs after it (``rc`` is set)."""
    script = ("import sys\nfrom search.commands.cli import main\n"
              f"rc = main({list(args)!r})\n{code}\nsys.exit(rc)\n")
    return run([sys.executable, "-c", script], 300, env=env())


HEAVY = ("print('heavy:', sorted({m.split('.')[0] for m in sys.modules} "
         "& {'torch', 'ray', 'kdcore'} | ({'search.study'} & set(sys.modules))))")


def test_analyze_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=20)
    ok = run_cli("analyze", "--storage", str(tmp_path), "--study", "s", "--format", "csv",
                 code=HEAVY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "heavy: []" in ok.stdout and "group,n,mean" in ok.stdout
    bad = run_cli("analyze", "--storage", str(tmp_path), "--study", "nope", code=HEAVY)
    assert bad.returncode == 2 and "heavy: []" in bad.stdout
    assert bad.stderr.count("\n") == 1 and "no study.json" in bad.stderr


def test_analyze_versus_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    write_parts(str(tmp_path / "s"), epochs_per_group=2)
    for extra, message in ((("--versus", "nope"), "--versus: study: no study.json in"),
                           (("--versus", "s"), "--versus: a study compared with itself"),
                           (("--versus", "s2", "--format", "csv"), "--versus: only with")):
        bad = run_cli("analyze", "--storage", str(tmp_path), "--study", "s", *extra)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (extra, bad.stderr)
        assert message in bad.stderr, (extra, bad.stderr)
    assert not (tmp_path / "s" / "report").exists()


def test_compact_command(tmp_path: Path) -> None:
    study = str(tmp_path / "s")
    write_parts(study, epochs_per_group=20)
    before = snapshot(study)
    recent = run_cli("compact", "--storage", str(tmp_path), "--study", "s")  # 60 s margin
    assert recent.returncode == 0 and "0 files merged" in recent.stdout, recent.stderr
    assert len(part_files(study, "epochs")[2]) == 2 * 22
    done = run_cli("compact", "--storage", str(tmp_path), "--study", "s", "--min-age", "0",
                   code=HEAVY)
    assert done.returncode == 0, done.stderr
    assert "epochs/group=kd: 22 files -> 1 (22 rows)" in done.stdout
    assert "heavy: []" in done.stdout
    assert_same_rows(study, before)
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    for argv in (["--study", "../s"], ["--study", "s", "--min-age", "-1"]):
        bad = run_cli("compact", "--storage", str(tmp_path), *argv)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (argv, bad.stderr)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing
