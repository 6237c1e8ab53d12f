"""The Markdown report of a study (tables plus PNG figures) and the comparison export."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.constants import (
    CFG_COLUMNS,
    SPEED_FILE,
    TRAINING_PARAMS,
    USABLE_STATUSES,
    describe_arch,
    ordered_groups,
    paper_numbers,
)
from analysis.files import write_text
from analysis.importance import MIN_TRIALS, param_importance
from analysis.plots import plot_asha, plot_learning_curves, plot_robustness, plot_test_accuracy
from analysis.stats import (
    FULL,
    LONGEST,
    NONE,
    ZERO_VARIANCE,
    best_configs,
    compare_groups,
    group_outcomes,
    health_check,
    paired_tests,
    proposal_counts,
    proposal_words,
    range_positions,
    share_by_weight,
    teacher_gap,
)
from analysis.tables import Study, load_study, read_config, resolve
from analysis.versus import ALPHA, compare_studies, replication, tuned_settings

Formatter = Callable[[object], str]
STATUSES: tuple[str, ...] = (*USABLE_STATUSES, "failed", "diverged")
HEALTH_THRESHOLD = 0.01


def fmt_float(spec: str) -> Formatter:
    """Formatter for numbers with a format spec; NaN/None become an em dash."""
    def format_cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return format(float(value), spec)  # type: ignore[arg-type]
    return format_cell


def fmt_default(value: object) -> str:
    """Plain cell text: NaN as an em dash, floats with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


ACC = fmt_float(".2f")
PVALUE = fmt_float("#.3g")


def markdown_table(frame: pd.DataFrame, formats: Mapping[str, Formatter] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` with per-column formatters."""
    formats = formats or {}
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        pairs = zip(frame.columns, row, strict=True)
        cells = [formats.get(col, fmt_default)(value) for col, value in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_section(comparison: pd.DataFrame, data: object,
                       tests: pd.DataFrame | None = None) -> list[str]:
    """Test accuracy over seeds per group, paired tests, the paper's numbers (CIFAR-10 only:
    where ``comparison`` has a ``paper`` column).

    ``tests`` (:func:`analysis.stats.paired_tests`) gives the size of the Holm family and
    the tests without a p-value, which a note names with the reason.
    """
    dataset = f"`{data}`" if data else "an unrecorded dataset (study.json has no `data` key)"
    lines = ["## Test accuracy over seeds", ""]
    if comparison.empty:
        return [*lines, "No reproduced runs: there is nothing to compare yet.", ""]
    tests = tests if tests is not None else pd.DataFrame(columns=["p", "no_p"])
    m = int(tests["p"].notna().sum())
    formats: dict[str, Formatter] = {c: ACC for c in comparison.columns}
    formats |= {c: PVALUE for c in comparison.columns if c.startswith("p_")}
    formats |= {"group": str, "n": fmt_float(".0f"), "params": fmt_float(".0f")}
    lines += [
        f"Accuracies are test accuracies in percent on the dataset {dataset}, over seeds; "
        "`ci_low`/`ci_high` bound the 95% t confidence interval of the mean. `diff_vs_*` is "
        "the mean paired difference (percentage points) over seeds shared with the reference "
        "group, `p_vs_*` a paired t-test across those seeds, and `*_holm` the Holm-adjusted "
        f"p-value over the {m} distinct paired test{'' if m == 1 else 's'} of this table "
        "that have a p-value (each test once: `baseline` against `kd` is one test, shown in "
        "both rows with the same p). `params` is the student's parameter count: every group "
        "trains the same architecture (its speed: \"Size and speed (per architecture)\")."
        + (" `paper` is the paper's reported best validation accuracy, shown for "
           "reference only." if "paper" in comparison else ""),
        "",
        markdown_table(comparison, formats),
        "",
    ]
    return [*lines, *undefined_p_note(tests)]


def undefined_p_note(tests: pd.DataFrame) -> list[str]:
    """A note naming each paired test without a p-value and why (empty when there is none)."""
    missing = tests[tests["no_p"].fillna("") != ""] if "no_p" in tests else tests.iloc[0:0]
    if missing.empty:
        return []
    lines = ["No p-value (`—`, and not in the Holm family) for:"]
    for t in missing.itertuples(index=False):
        pair = f"`{t.group}` against `{t.reference}`"
        if t.no_p == ZERO_VARIANCE:
            lines.append(f"- {pair} ({t.pairs} pairs): the paired differences have zero "
                         f"variance (every shared seed gives {t.diff:+.2f} points), so the "
                         "t statistic divides by zero and has no distribution; these seeds "
                         "cannot say how uncertain the difference is.")
        else:
            lines.append(f"- {pair} ({t.pairs} shared seed{'' if t.pairs == 1 else 's'}): "
                         "fewer than 2 pairs.")
    lines.append("A paired t-test needs at least 2 pairs whose differences vary: with fewer "
                 "than 2 pairs, or with paired differences of zero variance (equal up to "
                 "rounding), it gives no p-value.")
    return [*lines, ""]


def teacher_section(teacher: Mapping[str, Any], comparison: pd.DataFrame) -> list[str]:
    """The teacher's test accuracy next to each group's mean, and the gap each group closed."""
    if not teacher or "test_acc" not in teacher or comparison.empty:
        return []
    acc = float(teacher["test_acc"])
    gaps = teacher_gap(comparison, acc)
    cbam = "with" if teacher.get("cbam") else "without"
    where = (f"from the checkpoint `{teacher['checkpoint']}` (not trained by kdsearch)"
             if teacher.get("checkpoint") else f"{teacher.get('epochs')} epochs")
    if teacher.get("val_acc") is not None:
        where += f", {float(teacher['val_acc']) * 100:.2f}% validation accuracy"
    model = (teacher.get("arch") if ":" in str(teacher.get("arch"))
             else f"{teacher.get('arch')} width {teacher.get('width')} {cbam} CBAM")
    lines = [
        "## Teacher and students", "",
        f"Teacher: {model}, {where}: **{acc * 100:.2f}%** test accuracy on the same test "
        f"set ({fmt_count(teacher.get('params'))} parameters; its speed: \"Size and speed "
        "(per architecture)\").",
    ]
    base = gaps[gaps["group"] == "baseline"]
    if len(base):
        lines.append(f"Baseline student: {base['mean'].iloc[0]:.2f}% "
                     f"(95% CI {base['ci_low'].iloc[0]:.2f} to {base['ci_high'].iloc[0]:.2f}); "
                     f"teacher - baseline = **{acc * 100 - base['mean'].iloc[0]:.2f} points**.")
    lines += ["`gap_to_teacher`: teacher minus the group's mean (points); `gap_closed`: the "
              "group's paired gain over the baseline as a fraction of the teacher-baseline gap "
              "(a point estimate; its uncertainty is that of `diff_vs_baseline`).", "",
              markdown_table(gaps, {c: ACC for c in ("mean", "ci_low", "ci_high",
                                                     "diff_vs_baseline", "gap_to_teacher")}
                             | {"n": fmt_float(".0f"), "gap_closed": fmt_float(".2f"),
                                "group": str}),
              ""]
    return lines


def read_speed(study_dir: str | Path) -> dict[str, Any]:
    """The study's ``speed.json``, or ``{}`` where it has none (studies measured before it)."""
    fs, root = resolve(study_dir)
    return read_config(fs, f"{root}/{SPEED_FILE}")


def fmt_spread(stats: Mapping[str, Any], spec: str) -> tuple[str, str]:
    """(median, "q1–q3") of a :func:`kdcore.evaluate.spread` entry."""
    cell = fmt_float(spec)
    return cell(stats.get("median")), f"{cell(stats.get('q1'))}–{cell(stats.get('q3'))}"


def speed_section(speed: Mapping[str, Any], config: Mapping[str, Any],
                  teacher: Mapping[str, Any], runs: pd.DataFrame) -> list[str]:
    """Size and speed of the study's architectures: from ``speed.json`` (measured once per
    architecture, interleaved), never a per-group mean of per-run measurements."""
    lines = ["## Size and speed (per architecture)", ""]
    models = speed.get("models") or {}
    if models:
        batch = speed.get("large_batch")
        rows = []
        for role, entry in models.items():
            latency, latency_iqr = fmt_spread(entry.get("latency_ms_bs1") or {}, ".3f")
            rate, rate_iqr = fmt_spread(entry.get("images_per_s") or {}, ".0f")
            rows.append({"role": role, "architecture": entry.get("arch"),
                         "params": fmt_count(entry.get("params")),
                         "latency_ms_bs1": latency, "latency_iqr": latency_iqr,
                         f"images_per_s_bs{batch}": rate, "images_per_s_iqr": rate_iqr})
        groups = (models.get("student") or {}).get("groups") or []
        who = f" ({', '.join(f'`{g}`' for g in groups)})" if groups else ""
        lines += [
            f"Measured once per architecture (`{SPEED_FILE}`, `search.engine.speed`) on "
            f"`{speed.get('device')}` ({speed.get('device_name') or 'unnamed device'}), "
            f"precision {speed.get('precision')}, {speed.get('torch_threads')} torch threads, "
            "when no run competed: "
            f"{speed.get('warmup')} warm-up forwards per model and batch size, then "
            f"{speed.get('rounds')} rounds; in each round every model in turn timed "
            f"{speed.get('repeats_bs1')} forwards at batch 1 as one block, then "
            f"{speed.get('repeats_large')} at batch {batch} (the order rotating by one model "
            "per round), so a load that comes and goes falls on every model in the same "
            "rounds. Median over the rounds, with the interquartile range as the spread "
            "(`*_iqr`: q1–q3); latency in ms per image at batch 1. Every group"
            f"{who} trains this student: its size and speed do not differ between groups.",
            "", markdown_table(pd.DataFrame(rows), {"role": str, "architecture": str}), ""]
        return lines
    rows = []
    if config.get("student"):
        params = pd.to_numeric(runs.get("params", pd.Series(dtype=float)), errors="coerce")
        params = params.dropna().astype(int).unique()
        counts = ("—" if len(params) == 0 else str(params[0]) if len(params) == 1
                  else f"{params.min()}–{params.max()}")
        rows.append({"role": "student",
                     "architecture": describe_arch(config["student"],
                                                   config.get("student_width", 1.0),
                                                   config.get("student_cbam", False),
                                                   config.get("stem", "cifar")),
                     "params": counts})
    spec = config.get("teacher") or {}
    if spec.get("arch") or teacher.get("arch"):
        rows.append({"role": "teacher",
                     "architecture": describe_arch(
                         spec.get("arch", teacher.get("arch")),
                         spec.get("width", teacher.get("width")),
                         spec.get("cbam", teacher.get("cbam")), config.get("stem", "cifar")),
                     "params": fmt_count(teacher.get("params"))})
    latency = pd.to_numeric(runs.get("latency_ms_bs1", pd.Series(dtype=float)),
                            errors="coerce").dropna()
    measured = (f"; {len(latency)} runs: {latency.min():.3f} to {latency.max():.3f} ms per "
                "image at batch 1") if len(latency) else ""
    lines += [
        f"This study has no `{SPEED_FILE}` (size and speed measured once per architecture, "
        "interleaved, after the runs). Its latency was measured per run under concurrent "
        "load: each reproduce run timed its own student while other runs competed for the "
        f"same cores (`latency_ms_bs1`, `images_per_s_bs256` in the `runs` table{measured}), "
        "and the teacher once on its own (`teacher.json`). Those numbers differ by load, not "
        "by architecture or group: they are not comparable between groups and are not "
        "compared here. Every group trains the same student.", ""]
    if rows:
        lines += [markdown_table(pd.DataFrame(rows), {"role": str, "architecture": str,
                                                      "params": str}), ""]
    return lines


def fmt_text(value: object) -> str:
    """A free-text cell: one line, no table-breaking pipes, at most 80 characters."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "—"
    text = " ".join(str(value).split()).replace("|", "/")
    return text if len(text) <= 80 else text[:79] + "…"


def budget_words(max_epochs: object) -> str:
    if max_epochs is None:
        return "the longest budget in the table (study.json has no `max_epochs`)"
    return f"the study's full budget of {max_epochs} epochs (`max_epochs`)"


def shown_picks(picks: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``picks`` (selected trials) as a report shows them: validation accuracy in percent,
    without the ``cfg_`` columns no pick has, nor a training setting that no trial of
    ``trials`` varied (the study's own setting)."""
    constant = [f"cfg_{p}" for p in TRAINING_PARAMS
                if f"cfg_{p}" not in trials or trials[f"cfg_{p}"].nunique() <= 1]
    shown = picks.drop(columns=[c for c in CFG_COLUMNS if c in picks
                                and (picks[c].isna().all() or c in constant)])
    return shown.assign(best_val_acc=pd.to_numeric(shown["best_val_acc"]) * 100)


def best_section(outcomes: pd.DataFrame, max_epochs: object,
                 trials: pd.DataFrame | None = None) -> list[str]:
    """Best trial per group, selected on validation accuracy; every group has a row."""
    lines = ["## Best configuration per group", ""]
    if outcomes.empty:
        return [*lines, "No trials recorded.", ""]
    shown = shown_picks(outcomes, outcomes if trials is None or trials.empty else trials)
    lines += [
        f"Selected on validation accuracy (percent) among each group's full-budget trials: "
        f"those that ran {budget_words(max_epochs)} or stopped on their own validation-loss "
        "patience (`early_stopped`). Early stopping is part of the training protocol, so an "
        "early-stopped trial's best validation accuracy is the outcome of the full protocol "
        "for its configuration, exactly what `kdsearch reproduce` runs; a trial cut short by "
        "the trial scheduler (`asha_stopped`) never counts, and no test metric is used. "
        "`basis` says where a row comes from: "
        f"`{FULL}`; `{LONGEST}`: the group has no full-budget trial, so the best of its "
        "longest-running trials is shown for information only — not a tuned result, and "
        f"`kdsearch reproduce` does not use it; `{NONE}`: every trial failed or diverged "
        "(or none ran).",
        "",
        markdown_table(shown, {"best_val_acc": ACC, "first_error": fmt_text,
                               "best_epoch": fmt_count, "epochs_run": fmt_count,
                               "seed": fmt_count}),
        "",
    ]
    for row in outcomes.itertuples(index=False):
        if row.basis == LONGEST:
            lines.append(f"- `{row.group}`: no trial ran {budget_words(max_epochs)} or "
                         "stopped on its own validation-loss patience; the row shows the best "
                         f"of its longest trials ({fmt_count(row.epochs_run)} epochs).")
        elif row.basis == NONE:
            lines.append(f"- `{row.group}`: no usable trial ({row.trials} trials, "
                         f"{row.failed} failed, {row.diverged} diverged); first error: "
                         f"{fmt_text(row.first_error)}")
    return [*lines, ""]


def proposals_lines(trials: pd.DataFrame, config: Mapping[str, Any]) -> list[str]:
    """Who proposed each group's trials (the ``proposer`` column), under the best
    configurations; a group whose every proposal was a startup draw is called a random
    search."""
    counts = proposal_counts(trials)
    if not counts:
        return []
    sampler, n_startup = config.get("sampler", "tpe"), config.get("n_startup", 10)
    lines = ["Proposals per group (`proposer` in the `trials` table): `random` is a random "
             "draw (a startup trial of `tpe`, `gp` or `cmaes`, or the `random` sampler), "
             "`warm start` an earlier study's best configuration, any other name the "
             f"sampler's own proposal. This study's sampler: `{sampler}`.", ""]
    for group, made in counts.items():
        line = f"- `{group}`: {proposal_words(made)}"
        if set(made) == {"random"} and sampler in ("tpe", "gp", "cmaes"):
            line += (f"; every proposal was one of the {n_startup} random startup draws "
                     f"(`n_startup`), so this group's search was a random search")
        lines.append(line)
    return [*lines, ""]


def fmt_count(value: object) -> str:
    """An integer count that may be missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return str(int(value))  # type: ignore[call-overload]


def importance_section(trials: pd.DataFrame, space: Mapping[str, object],
                       groups: list[str],
                       group_spaces: Mapping[str, Mapping[str, object]] | None = None,
                       ) -> list[str]:
    """fANOVA importance per group; groups without one are named."""
    lines = ["## Hyperparameter importance", ""]
    found = param_importance(trials, space, group_spaces=group_spaces)
    missing = [g for g in groups if g not in set(found["group"])]
    if missing:
        note = (f"Not computed for {', '.join(f'`{g}`' for g in missing)}: fewer than "
                f"{MIN_TRIALS} usable trials or no varying parameter.")
    if found.empty:
        return [*lines, note if missing else "Not computed.", ""]
    lines += ["fANOVA importance of each varying parameter for validation accuracy (sums to "
              "1 per group).", "", markdown_table(found, {"importance": fmt_float(".3f")}), ""]
    return [*lines, note, ""] if missing else lines


def health_section(epochs: pd.DataFrame, groups: list[str]) -> list[str]:
    """Mean gradient share of each active loss term; terms that never reach are FLAGGED."""
    lines = ["## Loss-term health check", ""]
    health = health_check(epochs, HEALTH_THRESHOLD)
    if health.empty:
        return [*lines, "No epochs recorded.", ""]
    shown = health.assign(flagged=health["flagged"].map({True: "FLAGGED", False: "ok"}))
    lines += [f"Mean share of the student's gradient norm per active term (weight > 0); below "
              f"{HEALTH_THRESHOLD} the term does not reach the student.", "",
              markdown_table(shown, {"mean_share": fmt_float(".4f")}), ""]
    silent = [g for g in groups if g not in set(health["group"])]
    if silent:
        lines += [f"No epoch rows for {', '.join(f'`{g}`' for g in silent)}.", ""]
    flagged = health[health["flagged"]]
    if flagged.empty:
        return [*lines, "No term flagged.", ""]
    for row in flagged.itertuples(index=False):
        lines.append(f"- FLAGGED: term `{row.term}` in group `{row.group}` "
                     f"(mean gradient share {fmt_float('.4f')(row.mean_share)})")
    return [*lines, ""]


def ranges_section(study: Study) -> list[str]:
    """Gradient share against weight, and where the best values sit in their ranges."""
    shares = share_by_weight(study.epochs)
    space = study.config.get("space") or {}
    positions = range_positions(best_configs(study.trials, study.config.get("max_epochs")),
                                study.trials, space, study.config.get("group_spaces"))
    if shares.empty and positions.empty:
        return []
    lines = ["## Search ranges", ""]
    if not shares.empty:
        share = fmt_float(".4f")
        lines += ["Each distillation term's gradient share (a trial's mean over its epochs) "
                  "at the group's trial with the lowest and the highest weight, the median "
                  "over trials, and the Spearman correlation of weight and share. A share "
                  "near 0 over the whole range means the term never reaches the student; "
                  "near 1, that it drowns the others.", "",
                  markdown_table(shares, {"weight_min": fmt_float(".4g"),
                                          "weight_max": fmt_float(".4g"),
                                          "share_at_min": share, "share_at_max": share,
                                          "share_median": share,
                                          "spearman": fmt_float(".2f"), "trials": fmt_count}),
                  ""]
    if not positions.empty:
        lines += ["Where each group's best full-budget value lies in its search range "
                  "(0: low edge, 1: high edge; log ranges in log space). `edge` marks values "
                  "within 5% of an edge: the optimum may lie outside the range.", "",
                  markdown_table(positions, {c: fmt_float(".4g") for c in
                                             ("value", "low", "high")}
                                 | {"position": fmt_float(".2f")}),
                  ""]
    return lines


def status_section(trials: pd.DataFrame, outcomes: pd.DataFrame) -> list[str]:
    """How many trials of each group ended in each status (ASHA stops included), and the
    group's first error; every group has a row."""
    lines = ["## Trial status (ASHA)", ""]
    if trials.empty or not {"group", "status"} <= set(trials.columns):
        return [*lines, "No trials recorded.", ""]
    counts = pd.crosstab(trials["group"], trials["status"])
    statuses = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
    counts = counts.reindex(index=list(outcomes["group"]), columns=statuses, fill_value=0)
    counts = counts.assign(total=counts.sum(axis=1),
                           first_error=outcomes.set_index("group")["first_error"])
    return [*lines, markdown_table(counts.reset_index(), {"first_error": fmt_text}), ""]


def robustness_section(robustness: pd.DataFrame, groups: list[str]) -> list[str]:
    """Mean accuracy (percent) per group and severity, over corruptions and seeds."""
    if robustness.empty or not {"group", "severity", "acc"} <= set(robustness.columns):
        return []
    table = robustness.pivot_table(index="group", columns="severity", values="acc") * 100
    table = table.reindex(ordered_groups([*groups, *table.index]))
    table.columns = [f"severity {c}" for c in table.columns]
    table = table.reset_index()
    formats = {c: ACC for c in table.columns if c != "group"}
    return ["## Robustness", "", "Mean accuracy (%) over corruptions and seeds.", "",
            markdown_table(table, formats), ""]


def versus_section(reference: Study, study: Study) -> list[str]:
    """This study against a reference study of the same groups (``kdsearch analyze --versus``):
    test accuracy, the paired tests of each, and each group's tuned settings in both."""
    ref_name, name = reference.name or "reference", study.name or "this study"
    lines = [f"## Against study `{ref_name}`", ""]
    groups = ordered_groups([*reference.config.get("groups", []), *study.config.get("groups", [])])
    accuracy = compare_studies(reference.runs, study.runs, groups)
    if accuracy.empty:
        return [*lines, f"No group has reproduced runs in both `{ref_name}` and `{name}`.", ""]
    formats: dict[str, Formatter] = {c: ACC for c in accuracy.columns}
    formats |= {"group": str, "n_ref": fmt_count, "n": fmt_count, "p_welch": PVALUE,
                "p_welch_holm": PVALUE}
    m = int(accuracy["p_welch"].notna().sum())
    lines += [
        f"Test accuracy (percent) of each group's reproduce runs in `{ref_name}` (`*_ref`) "
        f"and in `{name}`, with 95% t intervals. `diff` is `{name}` minus `{ref_name}`: the "
        "two studies' runs are independent samples (their own searches, teachers and "
        "configurations), so the interval and `p_welch` come from Welch's unequal-variance "
        f"t-test, not a pairing by seed; `p_welch_holm` adjusts over the {m} groups with a "
        "p-value.",
        "",
        markdown_table(accuracy, formats),
        "",
    ]
    tests = replication(reference.runs, study.runs, groups)
    if not tests.empty:
        lines += [
            "Each study's paired tests (\"Test accuracy over seeds\": `diff` = `group` − "
            f"`reference`, Holm-adjusted p), side by side. `verdict` at {ALPHA:g} on the Holm "
            "p-values: `replicated` (significant in both, same sign), `reversed`, `not "
            f"replicated` (only in `{ref_name}`), `new` (only in `{name}`), `neither`, or "
            "`undefined` (no p-value).",
            "",
            markdown_table(tests, {"diff_ref": ACC, "diff": ACC, "p_holm_ref": PVALUE,
                                   "p_holm": PVALUE}),
            "",
        ]
    settings = tuned_settings(reference.trials, reference.config.get("max_epochs"),
                              study.trials, study.config.get("max_epochs"), (ref_name, name))
    if not settings.empty:
        settings = shown_picks(settings, pd.concat([reference.trials, study.trials]))
        lines += [
            "Each group's selected configuration in both studies (\"Best configuration per "
            "group\": best validation accuracy, percent, among full-budget trials), the "
            "settings `kdsearch reproduce` trained.",
            "",
            markdown_table(settings, {"best_val_acc": ACC, "best_epoch": fmt_count,
                                      "epochs_run": fmt_count, "seed": fmt_count}),
            "",
        ]
    return lines


def figures_section(figures: Mapping[str, Path | None]) -> list[str]:
    """Image links to every figure that was drawn."""
    drawn = [(title, path) for title, path in figures.items() if path is not None]
    if not drawn:
        return []
    lines = ["## Figures", ""]
    for title, path in drawn:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return lines


def draw_figures(study: Study, comparison: pd.DataFrame, out: Path) -> dict[str, Path | None]:
    """Write every figure into ``out``; skipped ones map to None."""
    return {
        "Test accuracy": plot_test_accuracy(comparison, out / "test_accuracy.png"),
        "Learning curves": plot_learning_curves(study.epochs, out / "learning_curves.png"),
        "ASHA stopping pattern": plot_asha(study.epochs, study.trials, out / "asha.png"),
        "Robustness": plot_robustness(study.robustness, out / "robustness.png"),
    }


def study_groups(study: Study) -> list[str]:
    """The study's groups (``study.json``) and every group found in its tables, in order."""
    found = [*study.config.get("groups", [])]
    for table in (study.trials, study.epochs, study.runs, study.robustness):
        found += list(table["group"].unique()) if "group" in table else []
    return ordered_groups(found)


def default_out_dir(study_dir: str | Path) -> Path:
    """``<study_dir>/report`` on the local disk; remote studies need an explicit out_dir."""
    text = str(study_dir)
    if "://" not in text:
        return Path(text) / "report"
    if text.startswith("file://"):
        return Path(resolve(text)[1]) / "report"
    raise ValueError(f"{text} is not local: give out_dir for the report")


def write_report(study_dir: str | Path, out_dir: str | Path | None = None,
                 fmt: str = "md", versus: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNG figures; returns the report's path.

    ``versus``, another study's directory, adds a section comparing this study with it
    (:func:`versus_section`)."""
    if fmt != "md":
        raise ValueError(f"unsupported report format {fmt!r} (only 'md')")
    out = Path(out_dir) if out_dir is not None else default_out_dir(study_dir)
    study = load_study(study_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = study.config
    groups = study_groups(study)
    comparison = compare_groups(study.runs, paper_numbers(config), groups)
    tests = paired_tests(study.runs, groups)
    outcomes = group_outcomes(study.trials, config.get("max_epochs"), groups)
    title = f"# kdsearch report: {study.name or Path(str(study_dir)).name}"
    lines = [title, ""]
    if "max_epochs" in config:
        lines += [f"Epoch budget per trial: {config['max_epochs']}.", ""]
    lines += comparison_section(comparison, config.get("data"), tests)
    lines += teacher_section(study.teacher, comparison)
    speed = read_speed(study_dir)
    if speed or study.teacher or not study.runs.empty:
        lines += speed_section(speed, config, study.teacher, study.runs)
    lines += best_section(outcomes, config.get("max_epochs"), study.trials)
    lines += proposals_lines(study.trials, config)
    lines += importance_section(study.trials, config.get("space") or {}, groups,
                                config.get("group_spaces"))
    lines += health_section(study.epochs, groups)
    lines += ranges_section(study)
    lines += status_section(study.trials, outcomes)
    lines += robustness_section(study.robustness, groups)
    if versus is not None:
        lines += versus_section(load_study(versus), study)
    lines += figures_section(draw_figures(study, comparison, out))
    return Path(write_text(out / "report.md", "\n".join(lines).rstrip() + "\n"))


def export_comparison(study_dir: str | Path, fmt: str) -> str:
    """The comparison table as CSV or JSON (records), for ``kdsearch analyze --format``."""
    study = load_study(study_dir)
    comparison = compare_groups(study.runs, paper_numbers(study.config), study_groups(study))
    if fmt == "csv":
        return comparison.to_csv(index=False)
    if fmt == "json":
        return comparison.to_json(orient="records", double_precision=15)
    raise ValueError(f"unsupported export format {fmt!r} (csv or json)")
