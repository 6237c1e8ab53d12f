"""The one-call GPU check for a lent device machine (no Ray, no Optuna, no install).

Run from the repository root with the image's ``python3`` (``bench/device_check.sh`` does):
stages run one after another as subprocesses, each with a deadline from ``PLAN`` (seconds
from the start, planned for an H100), and each writes its results under ``$OUT`` as soon
as it ends; a stage past its deadline is killed with its whole process group and the
next stage starts, so the call always ends by the plan's last deadline with what it has.

Stages: ``device`` (card, driver, versions), ``cuda-tests`` (``pytest -m cuda`` over the
test files that hold ``cuda``-marked tests, ``cuda_test_files``: the image has no Ray, and the
other files, which need it, are not collected),
``bench`` (all five groups, device feed vs DataLoader, K = 1, plus the ResNet-50 rate
the teacher plan needs), ``bench-k`` (K = 2 and 4 processes sharing the GPU),
``bench-compile`` (``torch.compile`` on), ``ministudy`` (``search.bench.ministudy``: the paper's
models on the full split, epochs planned from the bench rows) and ``report`` (the analyze
report and the tables). Files under ``$OUT`` (8 at most come back from the device):

- ``device_check.log``: this script's log (device, plan, every stage's command, status,
  seconds and the tail of its errors); ``summary.json``: the same, machine-readable;
- ``cuda-tests.txt``: pytest's output; ``bench.jsonl``: every bench row, tagged with its
  stage; ``ministudy.log``: the study's plan and one line per teacher epoch and per run;
- ``ministudy-runs.csv``, ``ministudy-report.md``, ``ministudy.tar.gz`` (the study folder:
  ``study.json``, the Parquet ``runs``/``robustness`` tables, the report and its figures).

``--dry-run`` runs every stage on the CPU at tiny sizes (synthetic data, width 1/8,
1 epoch, K <= 2; ``torch.compile`` is switched off with ``TORCH_COMPILE_DISABLE=1``), so the
test suite can run the whole script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Seconds from the start by which each stage must have ended, on an H100 (DEVICE) and on a
# CPU at tiny sizes (DRY). A stage that ends early leaves its time to the next ones.
PLAN = {
    "device": (15, 60),
    "cuda-tests": (60, 150),
    "bench": (120, 240),
    "bench-k": (155, 300),
    "bench-compile": (205, 330),
    "ministudy": (322, 480),
    "report": (340, 540),
}
REAL, DRY = 0, 1

# A ``cuda`` mark on a test (``@pytest.mark.cuda``) or on a whole module (``pytestmark``).
CUDA_MARK = re.compile(r"^\s*(@pytest\.mark\.cuda\b|pytestmark\b.*\bcuda\b)", re.MULTILINE)


def cuda_test_files(tests: Path = REPO / "tests") -> list[str]:
    """The test files (relative to the repository) that hold ``cuda``-marked tests.

    Found by reading the files, not by importing them: pytest imports every module it
    collects before ``-m cuda`` deselects anything, and the modules that need Ray or Optuna
    (absent on the device image) would fail the stage. The CUDA tests themselves need
    neither; ``tests/test_device_check.py`` checks that this list is the files of pytest's own
    ``-m cuda`` selection (where Ray is installed, as in CI).
    """
    return sorted(str(f.relative_to(REPO)) for f in tests.glob("test_*.py")
                  if CUDA_MARK.search(f.read_text()))


class Check:
    """The state of one call: where files go, the clock, the stages' records."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.py = args.py
        self.t0 = time.monotonic()
        self.stages: list[dict] = []
        self.column = DRY if args.dry_run else REAL
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out / "device_check.log"
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
                    "MPLBACKEND": "Agg", "KDSEARCH_CACHE": str(self.work / "cache")}
        self.env.pop("KDSEARCH_DATA", None)
        self.env.pop("KDSEARCH_STORAGE", None)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, msg: str) -> None:
        line = f"[t+{self.elapsed():5.0f}s] {msg}"
        print(line, flush=True)
        with self.log_file.open("a") as fh:
            fh.write(line + "\n")

    def ks(self) -> tuple[int, ...]:
        """The numbers of processes sharing the device that the bench measures."""
        return (1, 2) if self.args.dry_run else (1, 2, 4)

    def deadline(self, stage: str) -> float:
        return PLAN[stage][self.column]

    def run(self, stage: str, argv: list[str], stdout: Path, env: dict | None = None,
            append: bool = False) -> int:
        """Run ``argv`` until the stage's deadline; its stdout goes to ``stdout``."""
        left = self.deadline(stage) - self.elapsed()
        shown = " ".join(a if "\n" not in a else "<script>" for a in argv)
        self.log(f"{stage}: {shown}  (deadline t+{self.deadline(stage)}s)")
        if left <= 1:
            self.log(f"{stage}: SKIPPED, no time left")
            self.stages.append({"stage": stage, "argv": argv, "rc": None, "skipped": True})
            return -1
        err = self.work / f"{stage}.err"
        t0 = time.monotonic()
        with stdout.open("a" if append else "w") as fo, err.open("w") as fe:
            proc = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=fo, stderr=fe,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own session, workers included
                rc = proc.wait()
                timed_out = True
        seconds = time.monotonic() - t0
        self.stages.append({"stage": stage, "argv": argv, "rc": rc, "timed_out": timed_out,
                            "seconds": round(seconds, 1)})
        status = "TIMED OUT (killed)" if timed_out else ("ok" if rc == 0 else f"FAILED rc={rc}")
        self.log(f"{stage}: {status} in {seconds:.1f}s")
        if rc != 0 or timed_out:
            for name, path in (("stdout", stdout), ("stderr", err)):
                tail = path.read_text(errors="replace").strip().splitlines()[-12:]
                if tail:
                    self.log(f"{stage} {name} (last lines):\n    " + "\n    ".join(tail))
        return rc


def stage_device(c: Check) -> None:
    info = c.work / "device.txt"
    probe = ("import os, platform, torch, numpy, pandas, pyarrow, PIL\n"
             "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda',"
             " torch.version.cuda, 'numpy', numpy.__version__, 'pandas', pandas.__version__,"
             " 'pyarrow', pyarrow.__version__, 'pillow', PIL.__version__, 'cpus', os.cpu_count())\n"
             "for m in ('ray', 'optuna'):\n"
             "    try:\n        __import__(m); print(m, 'importable')\n"
             "    except ImportError: print(m, 'absent')\n"
             "if torch.cuda.is_available():\n"
             "    p = torch.cuda.get_device_properties(0)\n"
             "    print('gpu', p.name, round(p.total_memory / 2**30, 1), 'GiB,',"
             " p.multi_processor_count, 'SMs')\n"
             "else:\n    print('gpu none')\n")
    c.run("device", [c.py, "-c", probe], info)
    if shutil.which("nvidia-smi"):
        c.run("device", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                         "--format=csv"], info, append=True)
    data = c.args.data
    if data.startswith("jpegpack:"):
        pack = REPO / data.partition(":")[2]
        size = f"{pack.stat().st_size / 2**20:.1f} MiB" if pack.is_file() else "MISSING"
        with info.open("a") as fh:
            fh.write(f"pack {pack}: {size}\n")
    c.log("device:\n    " + "\n    ".join(info.read_text().strip().splitlines()))


def stage_tests(c: Check) -> None:
    out = c.out / "cuda-tests.txt"
    files = cuda_test_files()
    if not files:  # pytest without files would collect the whole suite
        out.write_text("no test file holds cuda-marked tests\n")
        c.log("cuda-tests: FAILED, no test file holds cuda-marked tests")
        c.stages.append({"stage": "cuda-tests", "argv": [], "rc": 5, "timed_out": False})
        return
    # Only the files with CUDA tests (see cuda_test_files); one that fails to import fails
    # the stage but does not stop the CUDA tests of the others from running.
    c.run("cuda-tests", [c.py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                         "--continue-on-collection-errors", *files], out)


def _bench(c: Check, stage: str, extra: list[str], tags: dict, env: dict | None = None) -> None:
    """One ``kdsearch bench --json`` call; its rows, tagged, are appended to bench.jsonl."""
    if c.args.dry_run:
        sizes = ["--device", "cpu", "--width", "0.125", "--batch", "8", "--steps", "1",
                 "--warmup", "1", "--workers", "0", "--precision", "fp32", "--threads", "1"]
    else:
        sizes = ["--device", "cuda", "--batch", "64", "--steps", "30", "--warmup", "5",
                 "--workers", "8", "--precision", "bf16"]
    raw = c.work / f"{stage}.jsonl"
    c.run(stage, [c.py, "-m", "search", "bench", "--json", *sizes, *extra], raw, env=env)
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.startswith("{")]
    with (c.out / "bench.jsonl").open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**row, **tags, "stage": stage}) + "\n")


def stage_bench(c: Check) -> None:
    _bench(c, "bench", ["--group", "all", "--feeds", "device,dataloader"], {})
    _bench(c, "bench", ["--group", "baseline", "--student", "resnet50", "--feeds", "device"],
           {"role": "teacher-rate"})
    for k in c.ks()[1:]:
        _bench(c, "bench-k", ["--group", "kd", "--feeds", "device", "--concurrent", str(k)], {})
    env = {**c.env, "TORCH_COMPILE_DISABLE": "1"} if c.args.dry_run else None
    tags = {"compile": True, **({"compile_disabled": True} if c.args.dry_run else {})}
    warm = ["--warmup", "1"] if c.args.dry_run else ["--warmup", "10"]
    _bench(c, "bench-compile", ["--group", "kd", "--feeds", "device", "--compile", *warm],
           tags, env=env)


def stage_ministudy(c: Check) -> None:
    budget = c.deadline("ministudy") - c.elapsed() - 5  # it stops itself before the kill
    argv = [c.py, "-m", "search.bench.ministudy", "run", "--data", c.args.data,
            "--storage", str(c.work / "store"), "--bench", str(c.out / "bench.jsonl"),
            "--budget-s", f"{budget:.0f}", "--k-choices", ",".join(map(str, c.ks()))]
    if c.args.dry_run:
        argv += ["--device", "cpu", "--width", "0.125", "--batch", "16", "--max-epochs", "1",
                 "--val-size", "20", "--sizes", "80", "20", "20", "--startup-s", "5"]
    c.run("ministudy", argv, c.out / "ministudy.log")


def stage_report(c: Check) -> None:
    c.run("report", [c.py, "-m", "search.bench.ministudy", "report", "--storage",
                     str(c.work / "store"), "--out", str(c.out)], c.out / "ministudy.log",
          append=True)


def summarize(c: Check) -> int:
    failed = [s["stage"] for s in c.stages if s.get("rc") != 0]
    summary = {"dry_run": c.args.dry_run, "data": c.args.data, "seconds": round(c.elapsed(), 1),
               "plan": {k: v[c.column] for k, v in PLAN.items()}, "stages": c.stages,
               "failed": sorted(set(failed))}
    (c.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    c.log(f"done in {c.elapsed():.0f}s; " + (f"FAILED stages: {summary['failed']}" if failed
                                              else "every stage ok"))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="one-call GPU check (see the module docstring)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny")
    parser.add_argument("--out", default=os.environ.get("OUT", "device-out"),
                        help="result folder (default: $OUT or ./device-out)")
    parser.add_argument("--work", default=None,
                        help="scratch folder: study, caches (default: a new temporary one)")
    parser.add_argument("--data", default=None,
                        help="data spec of the mini-study (default: jpegpack:packs/"
                        "cifar10.jpegpack; synthetic:10 with --dry-run)")
    parser.add_argument("--py", default=os.environ.get("PY", sys.executable),
                        help="the Python of every stage (default: $PY or this one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data or ("synthetic:10" if args.dry_run else "jpegpack:packs/cifar10.jpegpack")
    args.work = args.work or tempfile.mkdtemp(prefix="kdsearch-device-")
    c = Check(args)
    c.log(f"device check{' (dry run)' if args.dry_run else ''}: out {c.out}, work {c.work}, "
          f"python {c.py}; plan (stage: must end by t+s) "
          + ", ".join(f"{k}: {v[c.column]}" for k, v in PLAN.items()))
    for stage in (stage_device, stage_tests, stage_bench, stage_ministudy, stage_report):
        stage(c)
    return summarize(c)


if __name__ == "__main__":
    sys.exit(main())
