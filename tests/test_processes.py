"""The test helpers that run commands leave nothing behind (tests/helpers.py: spawn, run,
wait_for).

A command that times out, that exits while something it started lives on, or whose test
fails half-way must not leave a process running: Ray's workers call setsid, so neither the
command's process group nor ``subprocess.run(timeout=...)`` (which kills only the direct
child) reaches them. Each test here starts a child that starts a grandchild which calls
setsid and sleeps, and checks that the grandchild is gone — waiting with a bound, never a
fixed sleep.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import kill_tree, run, spawn, start_time, wait_for

# The child: starts a grandchild in a new session (as a Ray worker does), writes the
# grandchild's pid and start time to argv[1], then sleeps argv[2] seconds. The grandchild
# keeps the child's stdout and stderr open, as a Ray worker keeps its driver's.
CHILD = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(60)"])
stat = open(f"/proc/{g.pid}/stat").read().rsplit(")", 1)[1].split()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{g.pid} {stat[19]}")
import os
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print("child ready", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _grandchild(pidfile: Path) -> tuple[int, int]:
    """(pid, start time) of the grandchild, as the child recorded them."""
    wait_for(pidfile.exists, 30, "the child to record its grandchild")
    pid, started = map(int, pidfile.read_text().split())
    return pid, started


def _running(pid: int, started: int) -> bool:
    return start_time(pid) == started


def test_run_kills_the_whole_tree_on_timeout(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run([sys.executable, "-c", CHILD, str(pidfile), "120"], timeout=5)
    took = time.monotonic() - t0
    assert took < 40, f"run() took {took:.0f} s for a 5 s timeout"  # no wait on open pipes
    assert "child ready" in (info.value.stdout or "")  # the output so far comes with it
    pid, started = _grandchild(pidfile)
    wait_for(lambda: not _running(pid, started), 10, f"grandchild {pid} to be gone")


def test_plain_subprocess_run_leaves_the_grandchild(tmp_path):
    """The control: what the tests did before. ``subprocess.run(timeout=)`` kills the child
    only; the setsid grandchild lives on (here it is then killed by id)."""
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", CHILD, str(pidfile), "120"], timeout=5,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid, started = _grandchild(pidfile)
    try:
        assert _running(pid, started)
    finally:
        kill_tree([pid])
    wait_for(lambda: not _running(pid, started), 10, f"grandchild {pid} to be gone")


def test_run_kills_what_outlives_a_command_that_exited(tmp_path):
    """The child exits 0 after 2 s; its grandchild (setsid, holding the child's output open)
    would run on for a minute: ``run`` returns the child's result and the grandchild is
    killed."""
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    done = run([sys.executable, "-c", CHILD, str(pidfile), "2"], timeout=120, linger=3)
    took = time.monotonic() - t0
    assert done.returncode == 0 and "child ready" in done.stdout, done
    assert took < 40, f"run() took {took:.0f} s"
    pid, started = _grandchild(pidfile)
    wait_for(lambda: not _running(pid, started), 10, f"grandchild {pid} to be gone")


def test_spawn_reaps_when_the_test_fails_inside(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(AssertionError, match="the test failed"):
        with spawn([sys.executable, "-c", CHILD, str(pidfile), "120"],
                   stdout=subprocess.DEVNULL) as proc:
            pid, started = _grandchild(pidfile)
            assert proc.poll() is None and _running(pid, started)
            raise AssertionError("the test failed")
    assert proc.returncode is not None  # the child was killed and waited for
    wait_for(lambda: not _running(pid, started), 10, f"grandchild {pid} to be gone")


def test_wait_for_returns_the_value_or_fails_within_its_bound():
    t0 = time.monotonic()
    calls = []
    assert wait_for(lambda: calls.append(1) or (len(calls) >= 3 and "ok"), 10, "three calls",
                    period=0.01) == "ok"
    with pytest.raises(AssertionError, match="timed out after 0.3 s waiting for nothing"):
        wait_for(lambda: False, 0.3, "nothing", period=0.05)
    assert time.monotonic() - t0 < 5
