"""Helpers shared by the tests that run real Ray searches (test_search, test_reliability).

Tiny study settings, a TOML writer, subprocess environments, process-tree inspection and
killing (by process id, never by name), commands run so that nothing they start outlives them
(``spawn``, ``run``), bounded waiting for a condition (``wait_for``), a local multi-node Ray
cluster on loopback addresses, and the table consistency check every search test applies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from search.store.sink import read_raw, read_table
from search.study import PARAMS, StudyConfig, group_params, load_study_config

REPO = Path(__file__).resolve().parents[1]

TINY = {  # seconds per epoch on one CPU core; learnable enough for val_acc to differ at epoch 1
    "data": "synthetic:40", "val_size": 100, "student_width": 0.125, "batch_size": 16,
    "lr": 0.05, "patience": 0, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2.0,
    "cpus_per_trial": 1.0, "max_concurrent": 2, "device": "cpu",
    "teacher": {"width": 0.125, "epochs": 1, "batch_size": 32},
}


def tiny(tmp_path: Path, **overrides) -> StudyConfig:
    return load_study_config(None, None, {**TINY, "storage": str(tmp_path / "store"), **overrides})


def write_toml(path: Path, settings: dict) -> Path:
    """A minimal TOML writer for flat values plus one level of tables ([teacher], [space.T])."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for table, body in settings.items():
        if not isinstance(body, dict):
            continue
        flat = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if flat or not body:
            lines += [f"[{table}]"] + [f"{k} = {value(v)}" for k, v in flat.items()]
        for sub, inner in body.items():
            if isinstance(inner, dict):
                lines += [f"[{table}.{sub}]"] + [f"{k} = {value(v)}" for k, v in inner.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def env(**extra: str | None) -> dict[str, str]:
    """The environment of a subprocess: this checkout importable, no inherited RAY_ADDRESS or
    Ray token (a private Ray instance of this test process leaves its token in
    ``os.environ``), token authentication off (loopback test clusters only), no usage
    statistics. An ``extra`` value of None removes that variable."""
    inherited = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    out = {k: v for k, v in os.environ.items() if k not in inherited}
    out.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def kdsearch(*args: str) -> list[str]:
    """The argv of ``kdsearch ARGS`` run from this checkout."""
    return [sys.executable, "-m", "search.commands.cli", *args]


# ---------------------------------------------------------------------------------------------
# Processes


def processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every live process, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                out.append((int(entry.name), int(fields[1]), int(fields[2])))
            except (OSError, IndexError, ValueError):
                continue
    return out


def cmdline(pid: int) -> str:
    """The command line of ``pid`` as one string ('' when it is gone). Ray workers rewrite
    theirs to a title such as ``ray::train_trial.train``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(roots: list[int], procs: list[tuple[int, int, int]] | None = None) -> set[int]:
    """Every process below ``roots`` (not the roots themselves)."""
    procs = processes() if procs is None else procs
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        parent = todo.pop()
        for pid, ppid, _ in procs:
            if ppid == parent and pid not in seen:
                seen.add(pid)
                todo.append(pid)
    return seen


def kill_tree(leaders: list[int]) -> None:
    """SIGKILL the process groups of ``leaders`` and every descendant of their members
    (Ray's workers call setsid, so a process group alone does not hold them)."""
    procs = processes()
    members = {pid for pid, _, pgid in procs if pgid in leaders or pid in leaders}
    doomed = members | descendants(list(members), procs)
    for pgid in leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None when it is gone or a zombie: with
    the pid it names one process, even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             period: float = 0.1):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds
    pass (AssertionError naming ``what``): instead of sleeping a fixed time and hoping."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)


class _Watch(threading.Thread):
    """Remembers every process of the group ``leader`` leads and every descendant of them
    (pid and start time) while they run, so that one whose parent exited or that called
    setsid (Ray's workers do) can still be found and killed."""

    def __init__(self, leader: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.leader, self.period = leader, period
        self.seen: dict[int, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.scan()
            self.halt.wait(self.period)

    def scan(self) -> None:
        procs = processes()
        roots = {self.leader} | {pid for pid, _, pgid in procs if pgid == self.leader}
        roots |= set(self.alive())
        for pid in roots | descendants(list(roots), procs):
            if pid not in self.seen and (started := start_time(pid)) is not None:
                self.seen[pid] = started

    def alive(self) -> list[int]:
        """The remembered processes that still run (same pid, same start time)."""
        return [pid for pid, t in list(self.seen.items()) if start_time(pid) == t]

    def reap(self, timeout: float = 15.0) -> None:
        """SIGKILL everything remembered that still runs, with its process group and its
        descendants (``kill_tree``), in rounds until nothing runs (or ``timeout``)."""
        def none_left() -> bool:
            self.scan()  # also what was forked since the last round
            alive = self.alive()
            kill_tree(alive)  # only processes seen alive: a reused pid is never a target
            return not alive

        with contextlib.suppress(AssertionError):
            wait_for(none_left, timeout, f"the processes started by {self.leader} to end")


@contextlib.contextmanager
def spawn(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | str = REPO,
          **popen) -> Iterator[subprocess.Popen]:
    """Start ``argv`` in its own session and process group and yield its ``Popen``; when the
    block ends — normally, on a timeout, on a failed assertion — the group and every process
    it ever started are SIGKILLed and waited for. ``proc.reap()`` does it earlier (a test
    that kills a driver on purpose); ``proc.watch.alive()`` lists what still runs."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, **popen)
    watch = _Watch(proc.pid)
    watch.start()
    proc.watch = watch
    proc.reap = watch.reap
    try:
        yield proc
    finally:
        watch.halt.set()
        watch.join()
        watch.reap()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)  # no zombie of the direct child either
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run(argv: list[str], timeout: float, *, env: dict[str, str] | None = None,
        cwd: Path | str = REPO, linger: float = 5.0) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=timeout)`` that leaves
    nothing behind: the command runs under ``spawn``, and on a timeout its whole tree is
    killed before ``subprocess.TimeoutExpired`` (with the output so far) is raised. A
    process that outlives the command and holds its output open (a Ray worker of a finished
    driver) is killed ``linger`` seconds after the command exited."""
    deadline = time.monotonic() + timeout
    exited = None
    with spawn(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
               text=True) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if proc.poll() is not None:
                    exited = exited or now
                timed_out = now >= deadline
                if timed_out or (exited and now - exited > linger):
                    proc.reap()
                    try:
                        out, err = proc.communicate(timeout=30)
                    except subprocess.TimeoutExpired:
                        out, err = "", ""
                    if timed_out:
                        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
                    break
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(workers: tuple[str, ...] = ("127.0.0.3",), head: str = "127.0.0.2",
                cpus: int = 1, extra_env: dict[str, str] | None = None,
                head_cpus: int | None = None) -> Iterator[dict]:
    """A local multi-node Ray cluster on loopback addresses, each node with ``cpus`` CPUs
    (the head with ``head_cpus`` when given: 0 makes a head that runs no trial).

    Yields ``{"address": "HEAD:PORT", "temp": TEMP_DIR, "leaders": [pid, ...]}``; on exit
    every process it started (each ``ray start`` runs under ``spawn``, in its own session,
    watched for the cluster's lifetime) is killed by id. ``extra_env`` goes to every node
    (``{"RAY_AUTH_MODE": "token", ...}`` makes a token-authenticated cluster).
    """
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port(head)
    temp = f"/tmp/kdr{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    common = ["--temp-dir", temp, "--disable-usage-stats"]
    head_cpus = cpus if head_cpus is None else head_cpus
    argvs = [[ray, "start", "--head", "--node-ip-address", head, "--port", str(port),
              "--include-dashboard=false", "--num-cpus", str(head_cpus), *common]]
    argvs += [[ray, "start", "--address", f"{head}:{port}", "--node-ip-address", ip,
               "--num-cpus", str(cpus), *common] for ip in workers]
    leaders: list[int] = []
    try:
        with contextlib.ExitStack() as nodes:  # on exit: every node's processes, reaped
            for argv in argvs:
                p = nodes.enter_context(spawn(argv, env=env(**(extra_env or {})),
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                leaders.append(p.pid)
                out, _ = p.communicate(timeout=120)
                assert p.returncode == 0, out.decode()[-2000:]
            yield {"address": f"{head}:{port}", "temp": temp, "leaders": leaders}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Tables


def check_search_tables(study_dir: str, config: StudyConfig, group: str) -> pd.DataFrame:
    """Rows account for each other: one per (trial, epoch), epochs 1..epochs_run, in range."""
    trials = read_table(study_dir, "trials")
    epochs = read_table(study_dir, "epochs")
    raw = read_raw(study_dir, "epochs")
    assert len(trials) == config.samples and trials.trial_id.is_unique
    assert len(raw.drop_duplicates(["trial_id", "attempt", "epoch"])) == len(epochs)
    latest = epochs.sort_values("attempt").drop_duplicates(["trial_id", "epoch"], keep="last")
    assert set(latest.trial_id) == set(trials.trial_id)
    assert trials.epochs_run.sum() == len(latest)
    for _, t in trials.iterrows():
        got = sorted(latest.loc[latest.trial_id == t.trial_id, "epoch"])
        assert got == list(range(1, t.epochs_run + 1)), (t.trial_id, got)
    for p in PARAMS:
        col = trials[f"cfg_{p}"]
        if p in group_params(group):
            r = config.space[p]
            assert col.between(r.low, r.high).all(), (p, col.tolist())
            if r.step:
                assert ((col - r.low) / r.step).round(9).mod(1).eq(0).all()
    assert (epochs.node.str.len() > 0).all() and epochs.val_acc.between(0, 1).all()
    return trials
