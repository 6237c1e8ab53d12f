"""The ``kdsearch`` argument parser: one function per command, its flags and their help.

Every command takes ``--data`` (default ``$KDSEARCH_DATA`` or ``cifar10``); commands that
write results take ``--storage`` (``$KDSEARCH_STORAGE`` or ``./kdsearch-results``) and
``--study``. A usage error is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os

from analysis.constants import GROUPS

GROUP_CHOICES = GROUPS  # analysis.constants: imports no torch, so --help stays fast


class Default(str):
    """The value of a flag that was not given: ``$ENV`` when set, else the built-in default.

    Study commands tell it apart from a given flag, so that a config file beats the
    environment variable (flag > config file > environment variable > preset).
    """

    is_default = True


def _default(variable: str, fallback: str) -> Default:
    return Default(os.environ.get(variable) or fallback)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, storage: bool = True) -> None:
    p.add_argument(
        "--data",
        default=_default("KDSEARCH_DATA", "cifar10"),
        help="data spec: cifar10[:ROOT], cifar100[:ROOT], imagefolder:PATH, jpegpack:FILE or "
        "synthetic[:N] "
        "(default: $KDSEARCH_DATA or cifar10)",
    )
    if storage:
        p.add_argument(
            "--storage",
            default=_default("KDSEARCH_STORAGE", "./kdsearch-results"),
            help="results root: a local path or a pyarrow filesystem URI "
            "(default: $KDSEARCH_STORAGE or ./kdsearch-results)",
        )
        p.add_argument("--study", default=None, help="study name (a directory under --storage)")


def _study_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run a study (tune, reproduce, run)."""
    p.add_argument(
        "--preset",
        choices=("smoke", "laptop", "paper"),
        default=None,
        help="start from a preset study config (see README)",
    )
    p.add_argument("--config", default=None, help="study config file (TOML or YAML)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs per trial")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="address of a running Ray cluster (default: start Ray locally)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial; fractions share one GPU between trials")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: every slot of the cluster)")
    p.add_argument("--device", default=None, help="training device in each trial (cpu, cuda)")


LOG_CHOICES = ("tensorboard", "mlflow")  # search.engine.tracking.LOGS (no Ray import here)


def _log_kinds(text: str) -> list[str]:
    """``--log`` value: one tracker or several, comma-separated."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in LOG_CHOICES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown tracker {(bad or [text])[0]!r} (choose from {', '.join(LOG_CHOICES)})")
    return kinds


def _tracking_args(p: argparse.ArgumentParser) -> None:
    """Experiment tracking of the search (tune, run): runtime options, not study settings."""
    p.add_argument("--log", type=_log_kinds, action="extend", default=None,
                   metavar="{tensorboard,mlflow}",
                   help="log every trial's epochs to TensorBoard (event files in each trial's "
                   "directory under <study>/ray) and/or MLflow (one run per trial); "
                   "repeatable or comma-separated")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (implies --log mlflow; default: SQLite "
                   "<storage>/<study>/mlflow/mlflow.db, a local cache folder for URI storage)")


def _search_args(p: argparse.ArgumentParser) -> None:
    """Study settings of the search itself (tune, run): sampler, trial scheduler, budget,
    warm start (docs/SEARCH.md, "Samplers and trial schedulers")."""
    p.add_argument("--sampler", default=None,
                   help="Optuna sampler per group: tpe (default), random, qmc (scrambled "
                   "Sobol), cmaes or gp")
    p.add_argument("--n-startup", type=int, default=None, metavar="N",
                   help="random startup trials per group of tpe, gp and cmaes (default: "
                   "min(10, max(2, samples // 4)))")
    p.add_argument("--trial-scheduler", default=None,
                   help="early stopping per group: asha (default), hyperband (asynchronous, "
                   "several brackets), median (median stopping rule) or none")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="no trial starts after this much search time, e.g. 2h, 90m, 45s or "
                   "seconds (running trials finish; a --resume does not count the downtime)")
    p.add_argument("--warm-start", default=None, metavar="STUDY",
                   help="first propose each group's best configurations of an earlier study")
    p.add_argument("--warm-start-storage", default=None, metavar="PATH",
                   help="storage of the --warm-start study (default: --storage)")


def _train(sub) -> None:
    p = sub.add_parser("train", help="train one trial from a config (no Ray)")
    _common(p)
    p.add_argument("--group", choices=GROUP_CHOICES, default="kd")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrialConfig field, e.g. --set T=4 --set w_kl=0.9 "
                   "(repeatable)")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs to train the teacher if it is not cached yet")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")


def _teacher(sub) -> None:
    p = sub.add_parser("teacher", help="train (or load from cache) the teacher of a study")
    _common(p)
    _study_args(p)


def _tune(sub) -> None:
    p = sub.add_parser("tune", help="search loss weights with Ray Tune + Optuna + ASHA")
    _common(p)
    _study_args(p)
    p.add_argument("--group", choices=(*GROUP_CHOICES, "all"), default=None)
    p.add_argument("--samples", type=int, default=None, help="trials per group")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="Optuna RDB storage URL, e.g. postgresql://... (default: SQLite "
                   "<storage>/<study>/optuna.db)")
    _search_args(p)
    _tracking_args(p)


def _reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="train each group's best config with N seeds, test it")
    _common(p)
    _study_args(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds per group (same for every group)")
    p.add_argument("--group", choices=(*GROUP_CHOICES, "all"), default=None)


def _analyze(sub) -> None:
    p = sub.add_parser("analyze", help="write the study's report (Markdown + PNG figures)")
    _common(p)
    p.add_argument("--out", default=None, help="report directory (default: <study>/report)")
    p.add_argument(
        "--format",
        choices=("md", "csv", "json"),
        default="md",
        help="md writes the report; csv/json print the comparison table",
    )
    p.add_argument("--versus", default=None, metavar="STUDY",
                   help="add a section comparing the study with STUDY (another study under "
                        "--storage): test accuracy, paired tests and tuned settings (md only)")


def _run(sub) -> None:
    p = sub.add_parser("run", help="teacher, tune, reproduce and analyze in sequence (resumable)")
    _common(p)
    _study_args(p)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="Optuna RDB storage URL (default: SQLite <storage>/<study>/optuna.db)")
    _search_args(p)
    _tracking_args(p)


def _bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="images/s of one training step per group, device vs DataLoader feed"
    )
    _common(p, storage=False)
    p.add_argument("--group", choices=(*GROUP_CHOICES, "all"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of both models")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--feeds", default="device,dataloader", help="comma-separated feeds to time")
    p.add_argument(
        "--concurrent",
        type=int,
        default=1,
        help="K trials sharing the device (CUDA): total images/s of K processes",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--precision", default="auto,fp32",
                   help="comma-separated autocast precisions of the timed step, each auto, "
                        "fp32 or bf16 (auto: bf16 where supported); the default times bf16 "
                        "against fp32 in one run where the CPU has bf16")
    # --scheduler: the search path of `tune` with sleeping trials (search/bench/scheduler.py)
    p.add_argument("--scheduler", action="store_true",
                   help="benchmark the scheduling of `tune` with sleeping trials")
    p.add_argument("--slots", default="8",
                   help="--scheduler: logical CPU slots; --search: simulated slots, "
                   "comma-separated (8)")
    p.add_argument("--epoch-seconds", type=float, default=1.0,
                   help="--scheduler: seconds each trial sleeps per epoch")
    p.add_argument("--samples", type=int, default=None,
                   help="trials per group (--scheduler: 16; --search: 64)")
    p.add_argument("--epochs", type=int, default=12, help="--scheduler: max epochs per trial")
    p.add_argument("--grace", type=int, default=None,
                   help="ASHA grace period (--scheduler: 2; --search: the bank's study)")
    p.add_argument("--reduction-factor", type=float, default=None,
                   help="ASHA reduction factor (--scheduler: 2; --search: the bank's study)")
    p.add_argument("--simulate", action="store_true",
                   help="--scheduler: a discrete-event simulation instead of Ray (any --slots)")
    p.add_argument("--storage", default=None,
                   help="--scheduler/--tables: where the benchmark study is written "
                   "(default: a temporary folder)")
    # --search: replay search strategies on the bank of learning curves (search/bench/replay.py)
    p.add_argument("--search", action="store_true",
                   help="replay search strategies on the bank of real learning curves: "
                   "speedup to quality q over random search")
    p.add_argument("--bank", default=None,
                   help="--search: the bank of learning curves (results/curves)")
    p.add_argument("--strategies", default=None,
                   help="--search: comma-separated SAMPLER[+SCHEDULER] (default: random, "
                   "random+asha, tpe, tpe+asha, qmc, cmaes, gp, tpe+hyperband, tpe+median, "
                   "random+hyperband)")
    p.add_argument("--seeds", type=int, default=30, help="--search: replays per strategy (30)")
    p.add_argument("--n-startup", type=int, default=None,
                   help="--search: random startup trials of tpe, gp and cmaes "
                   "(default: tune's rule for --samples)")
    p.add_argument("--out", default="bench-search",
                   help="--search: folder for search_efficiency.json and .png (bench-search)")
    p.add_argument("--jobs", type=int, default=None,
                   help="--search: replay processes (default: every core)")
    p.add_argument("--real", default=None, metavar="STUDY_DIR",
                   help="--search: a real study's best-so-far beside the replays of its own "
                   "strategy and settings on the first --slots")
    # --tables: synthetic trial tables at scale (search/bench_tables.py)
    p.add_argument("--tables", type=int, default=None, metavar="N",
                   help="benchmark loading/analysing a synthetic study of N trials per group")


def _compact(sub) -> None:
    p = sub.add_parser("compact",
                       help="merge a study's part files into one file per table and group")
    _common(p)
    p.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                   help="merge only part files older than this (default 60: a search may "
                   "still be writing)")


def _pack(sub) -> None:
    p = sub.add_parser("pack", help="pack an ImageFolder tree into one file (--data jpegpack:FILE)")
    p.add_argument("source", help="ImageFolder root with train/ and test/")
    p.add_argument("--out", required=True, help="the pack file to write")


def _models(sub) -> None:
    p = sub.add_parser("models", help="a model's candidate stages: node names, output shapes")
    p.add_argument("spec", help="resnet18|resnet34|resnet50, torchvision:NAME, timm:NAME or "
                   "MODULE:CALLABLE (importable here)")
    p.add_argument("--image-size", type=int, default=32, help="input side in pixels (32)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (10)")
    p.add_argument("--count", type=int, default=3,
                   help="stages of the automatic choice (3; as many as the other model has)")
    p.add_argument("--all", action="store_true",
                   help="every node, not only those with a (C, H, W) output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdsearch", description="The ``kdsearch`` command line: train, "
                     "teacher, tune, reproduce, analyze, run, bench.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train(sub)
    _teacher(sub)
    _tune(sub)
    _reproduce(sub)
    _analyze(sub)
    _run(sub)
    _bench(sub)
    _compact(sub)
    _pack(sub)
    _models(sub)
    return parser
