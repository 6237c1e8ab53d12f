"""Markdown tables of the search-efficiency comparison (docs/PERFORMANCE.md, "Search
efficiency") from the JSON lines that results/curves/compare.sh writes.

    python results/curves/efficiency_table.py [DIR]   (default results/curves/efficiency)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    """The result rows of one ``bench --search --json`` output (surrogate lines skipped)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if "strategy" in r]


def speedup(r: dict) -> str:
    if r["speedup"] is None:
        return "undefined"
    ends = (f" [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}]"
            if r["speedup_low"] is not None else " [undefined]")
    return f"{r['speedup']:.2f}{ends}"


def final(r: dict) -> str:
    return (f"{100 * r['final_median']:.1f} [{100 * r['final_q25']:.1f}, "
            f"{100 * r['final_q75']:.1f}]")


def epochs(r: dict) -> str:
    return "not reached" if r["epochs_to_q"] is None else f"{r['epochs_to_q']:.0f}"


def strategy_table(all_rows: list[dict], group: str) -> list[str]:
    """Strategy x slots: speedup to q [95% CI], reached fraction, epochs to q; and the final
    selection's expected accuracy (median [IQR])."""
    mine = [r for r in all_rows if r["group"] == group]
    slots = sorted({r["slots"] for r in mine})
    strategies = list(dict.fromkeys(r["strategy"] for r in mine))
    by = {(r["strategy"], r["slots"]): r for r in mine}
    head = " | ".join(f"S={s}: speedup [95% CI], reached, epochs to q" for s in slots)
    out = [f"| {group} strategy | {head} |", "|---" * (len(slots) + 1) + "|"]
    for s in strategies:
        cells = [f"{speedup(by[s, n])}, {100 * by[s, n]['reached']:.0f}%, {epochs(by[s, n])}"
                 for n in slots]
        out.append(f"| {s} | {' | '.join(cells)} |")
    head = " | ".join(f"S={s}" for s in slots)
    out += ["", f"| {group}: final selection's expected val acc %, median [IQR] | {head} | "
            "epochs spent at S=" + str(slots[0]) + " |", "|---" * (len(slots) + 2) + "|"]
    for s in strategies:
        cells = [final(by[s, n]) for n in slots]
        out.append(f"| {s} | {' | '.join(cells)} | {by[s, slots[0]]['total_epochs']:.0f} |")
    return out


def sweep_table(folder: Path, pattern: str, label: str) -> list[str]:
    """One row per sweep file and strategy: speedup, reached, epochs to q, final."""
    out = [f"| {label} | group | strategy | speedup [95% CI] | reached | epochs to q | "
           "final %, median [IQR] |", "|---|---|---|---|---|---|---|"]
    def natural(path: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]

    for path in sorted(folder.glob(pattern), key=natural):
        for r in rows(path):
            if r["strategy"] == "random":
                continue
            out.append(f"| {path.stem} | {r['group']} | {r['strategy']} | {speedup(r)} | "
                       f"{100 * r['reached']:.0f}% | {epochs(r)} | {final(r)} |")
    return out


def main(folder: Path) -> None:
    everything = rows(folder / "all.jsonl")
    for group in dict.fromkeys(r["group"] for r in everything):
        print("\n".join(strategy_table(everything, group)), end="\n\n")
    print("\n".join(sweep_table(folder, "startup-*.jsonl", "TPE startup")), end="\n\n")
    print("\n".join(sweep_table(folder, "asha-*.jsonl", "ASHA")), end="\n\n")
    print("\n".join(sweep_table(folder, "samples-*.jsonl", "trials per group")))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "efficiency"))
