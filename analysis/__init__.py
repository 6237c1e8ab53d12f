"""Analysis of a kdsearch study: reads its Parquet tables only (never torch, ray or kdcore)."""

from analysis.constants import GROUPS, PAPER_ACC
from analysis.importance import param_importance
from analysis.plots import plot_asha, plot_learning_curves, plot_robustness, plot_test_accuracy
from analysis.report import export_comparison, write_report
from analysis.stats import (
    best_configs,
    compare_groups,
    group_outcomes,
    health_check,
    holm,
    paired_tests,
    range_positions,
    share_by_weight,
    teacher_gap,
)
from analysis.tables import Study, latest_attempt, load_study
from analysis.versus import compare_studies, replication

__all__ = [
    "GROUPS",
    "PAPER_ACC",
    "Study",
    "best_configs",
    "compare_groups",
    "compare_studies",
    "export_comparison",
    "group_outcomes",
    "health_check",
    "holm",
    "latest_attempt",
    "load_study",
    "paired_tests",
    "param_importance",
    "plot_asha",
    "plot_learning_curves",
    "plot_robustness",
    "plot_test_accuracy",
    "range_positions",
    "replication",
    "share_by_weight",
    "teacher_gap",
    "write_report",
]
