"""kdcore: the pure-PyTorch distillation core (data, models, losses, masks, training, teacher)."""

from .config import GROUP_TERMS, GROUPS, TERMS, TrialConfig
from .data import DataError, Dataset, load_data
from .train import DivergedError, FitResult, fit

__all__ = [
    "GROUPS",
    "GROUP_TERMS",
    "TERMS",
    "TrialConfig",
    "DataError",
    "Dataset",
    "load_data",
    "DivergedError",
    "FitResult",
    "fit",
]
