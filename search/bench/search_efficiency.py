"""``kdsearch bench --search``: does a search strategy find good loss weights in fewer epochs
than random search? Replays (``search.bench.replay``) on the bank of real learning curves
(``search.bench.curves``), no data, no training, no Ray cluster.

For each group of the bank: the surrogate with the smallest cross-validated error is chosen
and its error printed; ``q`` is the 90th percentile of the surrogate's final validation
accuracy over the banked configurations; every strategy is replayed ``--seeds`` times at each
``--slots`` count; the speedup to ``q`` is the median epochs random search (no early
stopping) needs to reach ``q`` over the median the strategy needs. Output: one line (or
JSON object) per group × slots × strategy, ``search_efficiency.json`` (the summaries and the
surrogate errors) and ``search_efficiency.png`` (best-so-far expected accuracy against
epochs and against simulated time, median and interquartile range) under ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from search.bench.curves import Bank, Surrogate, choose_surrogate, load_bank
from search.bench.replay import (
    STRATEGIES,
    Trace,
    best_so_far,
    parse_strategy,
    replay,
    replay_config,
    summarize,
)

DEFAULT_BANK = "results/curves"
QUANTILE = 90  # q: this percentile of the bank's final validation accuracies
SAMPLES = 64  # trials per group of one replay unless --samples says otherwise

_WORKER: dict[str, Any] = {}  # the forked workers' banks, surrogates and settings


def _replay_job(job: tuple[str, str, int, int]) -> Trace:
    group, strategy, slots, seed = job
    bank, surrogate = _WORKER["banks"][group]
    config = replay_config(_WORKER["config"], strategy, seed, **_WORKER["settings"])
    return replay(bank, surrogate, config, slots, strategy)


def _init_worker(state: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)  # GPSampler fits in torch; one process per core
    _WORKER.update(state)


def run_replays(banks: dict[str, tuple[Bank, Surrogate]], config, settings: dict[str, Any],
                jobs: list[tuple[str, str, int, int]], processes: int,
                progress=None) -> list[Trace]:
    """Every replay of ``jobs`` (group, strategy, slots, seed), on ``processes`` processes."""
    state = {"banks": banks, "config": config, "settings": settings}
    if processes <= 1:
        _init_worker(state)
        out = []
        for job in jobs:
            out.append(_replay_job(job))
            if progress:
                progress(len(out), len(jobs))
        return out
    with ProcessPoolExecutor(processes, mp_context=get_context("fork"),
                             initializer=_init_worker, initargs=(state,)) as pool:
        out = []
        for trace in pool.map(_replay_job, jobs, chunksize=2):
            out.append(trace)
            if progress:
                progress(len(out), len(jobs))
        return out


def quality_target(bank: Bank, surrogate: Surrogate) -> float:
    """q: the ``QUANTILE``th percentile of the surrogate's final accuracy at the bank's
    configurations (the same noise-free scale as the quality the replays record)."""
    return float(np.percentile(surrogate.predict(bank.positions)[:, -1], QUANTILE))


def band(traces: list[Trace], grid: np.ndarray, axis: str) -> dict[str, list[float]]:
    """Median and interquartile range of best-so-far over replays at ``grid`` (NaN where
    fewer than half the replays had selected a configuration yet)."""
    values = np.stack([best_so_far(t, grid, axis) for t in traces])
    enough = np.isfinite(values).mean(axis=0) >= 0.5
    filled = np.where(np.isfinite(values), values, -np.inf)  # nothing selected: the worst
    q25, q50, q75 = (np.percentile(filled, p, axis=0, method="lower") for p in (25, 50, 75))
    q25, q50, q75 = (np.where(enough & np.isfinite(v), v, math.nan) for v in (q25, q50, q75))
    return {"grid": grid.tolist(), "q25": q25.tolist(), "median": q50.tolist(),
            "q75": q75.tolist()}


def plot(path: Path, curves: dict[tuple[str, int], dict[str, Any]], strategies: list[str],
         targets: dict[str, float]) -> None:
    """``search_efficiency.png``: a column per (group, slots), rows against epochs and
    against simulated hours; median lines with interquartile bands; q dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = sorted(curves, key=lambda k: (k[0], k[1]))
    fig = Figure(figsize=(3.6 * len(keys), 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(keys), squeeze=False)
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for col, key in enumerate(keys):
        group, slots = key
        for row, axis in enumerate(("epochs", "seconds")):
            ax = axes[row][col]
            for strategy in strategies:
                b = curves[key][strategy][axis]
                x = np.array(b["grid"]) / (3600.0 if axis == "seconds" else 1.0)
                style = {"ls": "--"} if "+" not in strategy else {}
                ax.plot(x, 100 * np.array(b["median"], float), color=colors[strategy], lw=1.2,
                        label=strategy, **style)
                ax.fill_between(x, 100 * np.array(b["q25"], float),
                                100 * np.array(b["q75"], float), color=colors[strategy],
                                alpha=0.08)
            ax.axhline(100 * targets[group], color="k", ls=":", lw=0.8)
            ax.set_xscale("log")
            # ticks at 1, 2 and 5 per decade as plain numbers (Matplotlib's minor labels overlap)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{group}, {slots} slots", fontsize=9)
            ax.set_xlabel("epochs consumed" if axis == "epochs" else "simulated hours")
            if col == 0:
                ax.set_ylabel("expected val acc of selection (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(strategies), fontsize=8)
    fig.savefig(path, dpi=120)


def cmd_bench_search(args) -> int:
    """Print each strategy's speedup to q per group and slot count (module docstring)."""
    t0 = time.monotonic()
    root = Path(args.bank or DEFAULT_BANK)
    strategies = [s.strip() for s in (args.strategies or ",".join(STRATEGIES)).split(",")
                  if s.strip()]
    for s in strategies:
        parse_strategy(s)
    if "random" not in strategies:
        strategies.insert(0, "random")  # the reference of every speedup
    slot_counts = [int(s) for s in str(args.slots).split(",") if s.strip()]
    if not slot_counts or min(slot_counts) <= 0 or args.seeds <= 0:
        raise ValueError("--slots and --seeds must be > 0")
    from search.study.stored import config_from_study_json

    banks: dict[str, tuple[Bank, Surrogate]] = {}
    config = None
    groups = None if args.group == "all" else [args.group]
    out_dir = Path(args.out)
    report: dict[str, Any] = {"bank": str(root), "groups": {}, "results": []}
    for group in groups or _bank_groups(root):
        bank = load_bank(root, group)
        surrogate, scores = choose_surrogate(bank)
        config = config or config_from_study_json(bank.config)
        banks[group] = (bank, surrogate)
        q = quality_target(bank, surrogate)
        noise = bank.noise_std
        info = {"configurations": len(bank.curves), "trainings": bank.trials,
                "seed_repeats": int((bank.seeds > 1).sum()), "q": q,
                "surrogate": surrogate.name, "cv": scores,
                "seed_std_final": float(noise[-1]),
                "epoch_seconds_median": float(np.median(bank.epoch_seconds))}
        report["groups"][group] = info
        chosen = next(s for s in scores if s["surrogate"] == surrogate.name)
        line = {"group": group, **{k: v for k, v in info.items() if k != "cv"},
                "cv_rmse_final": chosen["rmse_final"], "cv_spearman": chosen["spearman_final"]}
        if args.json:
            print(json.dumps(finite({"surrogate": line})), flush=True)
        else:
            print(f"{group}: {info['configurations']} configurations ({bank.trials} trainings), "
                  f"surrogate {surrogate.name}: leave-one-out RMSE of the final val acc "
                  f"{100 * chosen['rmse_final']:.2f} pts (seed std {100 * noise[-1]:.2f}), "
                  f"Spearman {chosen['spearman_final']:.2f}; q = {100 * q:.2f}%", flush=True)
    settings = {"samples": args.samples or SAMPLES, "grace_period": args.grace,
                "reduction_factor": args.reduction_factor, "n_startup": args.n_startup}
    if args.real:
        return check_real(args, banks, config, report, out_dir, t0)
    jobs = [(g, s, n, seed) for g in banks for n in slot_counts for s in strategies
            for seed in range(args.seeds)]

    def progress(done: int, total: int) -> None:
        if done % max(total // 20, 1) == 0 or done == total:
            print(f"  replays {done}/{total} ({time.monotonic() - t0:.0f}s)", file=sys.stderr,
                  flush=True)

    traces = run_replays(banks, config, settings, jobs, args.jobs or os.cpu_count() or 1,
                         progress)
    curves: dict[tuple[str, int], dict[str, Any]] = {}
    for group in banks:
        q = report["groups"][group]["q"]
        for slots in slot_counts:
            mine = [t for (g, _, n, _), t in zip(jobs, traces, strict=True)
                    if g == group and n == slots]
            random_traces = [t for t in mine if t.strategy == "random"]
            top_epochs = max(t.total_epochs for t in mine)
            top_seconds = max(t.total_seconds for t in mine)
            grids = {"epochs": np.unique(np.geomspace(1, top_epochs, 80).round()),
                     "seconds": np.geomspace(top_seconds / 500, top_seconds, 80)}
            curves[(group, slots)] = {}
            for strategy in strategies:
                theirs = [t for t in mine if t.strategy == strategy]
                row = {"group": group, **summarize(theirs, random_traces, q)}
                report["results"].append(row)
                curves[(group, slots)][strategy] = {a: band(theirs, grids[a], a) for a in grids}
                _print_row(row, args.json)
    report["settings"] = {**settings, "seeds": args.seeds, "slots": slot_counts,
                          "strategies": strategies, "wall_s": time.monotonic() - t0}
    report["curves"] = {f"{g}/{n}": v for (g, n), v in curves.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "search_efficiency.json", report)
    plot(out_dir / "search_efficiency.png", curves, strategies,
         {g: report["groups"][g]["q"] for g in banks})
    print(f"wrote {out_dir / 'search_efficiency.json'} and search_efficiency.png "
          f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return 0


def check_real(args, banks: dict[str, tuple[Bank, Surrogate]], config, report: dict[str, Any],
               out_dir: Path, t0: float) -> int:
    """``--real STUDY``: a real study's best-so-far beside the replays of the same strategy
    and settings (its sampler, trial scheduler, samples, grace, factor and startup) on
    ``--slots`` slots; prints where the real curve lies in the replays' band."""
    import dataclasses

    from analysis.tables import load_study
    from search.bench.replay import band_position, real_trace

    study = load_study(args.real)
    if not study.config:
        raise ValueError(f"--real: no study.json in {args.real}")
    real = study.config
    slots = int(str(args.slots).split(",")[0])
    strategy = f"{real.get('sampler', 'tpe')}+{real.get('scheduler', 'asha')}"
    settings = {"samples": int(real["samples"]), "grace_period": int(real["grace_period"]),
                "reduction_factor": float(real["reduction_factor"]),
                "n_startup": real.get("n_startup")}
    report["real"] = {"study": args.real, "strategy": strategy, "slots": slots, **settings}
    for group in [g for g in real.get("groups", []) if g in banks]:
        bank, surrogate = banks[group]
        trace = real_trace(study, bank, surrogate, slots)
        jobs = [(group, strategy, slots, seed) for seed in range(args.seeds)]
        traces = run_replays(banks, dataclasses.replace(config, seed=0), settings, jobs,
                             args.jobs or os.cpu_count() or 1)
        top = max(max(t.total_epochs for t in traces), trace.total_epochs)
        grid = np.unique(np.geomspace(1, top, 60).round())
        position = band_position(trace, traces, grid)
        q = report["groups"][group]["q"]
        row = {"group": group, "strategy": strategy, "slots": slots, "replays": len(traces),
               "real_final": float(trace.quality[-1]) if len(trace.quality) else None,
               "real_epochs_to_q": float(np.min(trace.epochs[trace.quality >= q]))
               if (trace.quality >= q).any() else None,
               "inside_iqr": position["inside_iqr"], "inside_90": position["inside_90"],
               "replay": summarize(traces, traces, q)}
        report.setdefault("real_groups", {})[group] = {**row, "band": position}
        if args.json:
            print(json.dumps(finite(row)), flush=True)
        else:
            print(f"{group}: real {strategy} ({len(trace.quality)} selections) inside the "
                  f"replays' interquartile range at {100 * row['inside_iqr']:.0f}% of the "
                  f"epoch grid, inside 5-95% at {100 * row['inside_90']:.0f}%; final "
                  f"expected {100 * (row['real_final'] or math.nan):.2f}% vs replay median "
                  f"{100 * row['replay']['final_median']:.2f}%", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "real_vs_replay.json", report)
    print(f"wrote {out_dir / 'real_vs_replay.json'} ({time.monotonic() - t0:.0f}s)",
          file=sys.stderr)
    return 0


def _bank_groups(root: Path) -> list[str]:
    from search.bench.curves import bank_studies

    return list(json.loads((bank_studies(root)[0] / "study.json").read_text())["groups"])


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` as JSON at ``path``, atomically (``analysis.files.atomic_write``)."""
    import pyarrow.fs as pafs

    from analysis.files import atomic_write

    atomic_write(pafs.LocalFileSystem(), str(path), json.dumps(finite(doc), indent=1).encode())


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _interval(row: dict[str, Any]) -> str:
    if row["speedup"] is None:
        return "undefined"
    low, high = row["speedup_low"], row["speedup_high"]
    ends = f"[{low:.2f}, {high:.2f}]" if low is not None else "[undefined]"
    return f"{row['speedup']:.2f}x {ends}"


def _print_row(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(finite(row)), flush=True)
        return
    print(f"{row['group']:<4} slots {row['slots']:<3} {row['strategy']:<17} speedup to q "
          f"{_interval(row):<22} reached {100 * row['reached']:3.0f}%  epochs to q "
          f"{row['epochs_to_q']:>6.0f}  final {100 * row['final_median']:.2f}% "
          f"[{100 * row['final_q25']:.2f}, {100 * row['final_q75']:.2f}]", flush=True)
