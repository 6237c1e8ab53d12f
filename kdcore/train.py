"""``fit``: the one training loop behind every trial, the teacher, ``kdsearch train`` and reproduce.

Per epoch it trains on device-resident batches, evaluates on the validation split, and hands
``report(metrics, state)`` the epoch's metrics and a resumable state (plain tensors and
Python values: ``torch.save`` writes it, ``torch.load(weights_only=True)`` reads it back).
Passing such a state as ``checkpoint`` continues exactly where it stopped.

Metrics accumulate on the device; the host reads them once per epoch, so a CUDA step never
waits for the host. A non-finite loss raises ``DivergedError``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TERMS, TrialConfig
from .data import Dataset, eval_batches, train_batches
from .memory import keep_freed_memory
from .models import build_model
from .objective import build_connectors, gradient_shares, loss_terms, weighted_total
from .precision import autocast as precision_autocast
from .precision import resolve_precision

Report = Callable[[dict, dict], None]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, detail: str):
        super().__init__(f"non-finite loss in epoch {epoch}: {detail}")
        self.epoch = epoch


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: how it ended, the best epoch and the student at that epoch."""

    status: str  # "completed" or "early_stopped"
    epochs_run: int
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict]
    student: nn.Module  # weights of the best epoch (``best_epoch_of``)
    connectors: nn.ModuleDict


def use_bf16(config: TrialConfig) -> bool:
    """Whether ``config`` trains under bf16 autocast (``precision.resolve_precision``)."""
    return resolve_precision(config.precision, config.device) == "bf16"


def autocast(config: TrialConfig):
    """bf16 autocast on ``config.device`` when ``use_bf16(config)``, else a no-op context."""
    return precision_autocast(config.precision, config.device)


def epoch_rank(metrics: dict) -> tuple[float, float, int]:
    """Sort key of an epoch: higher validation accuracy, then lower validation loss, then earlier.

    The one definition of the best epoch (``best_epoch_of``), used by ``fit`` for the student
    it keeps and by the search for ``best_val_acc``/``best_epoch``.
    """
    loss = metrics["val_loss"]
    return (metrics["val_acc"], -loss if math.isfinite(loss) else -math.inf, -metrics["epoch"])


def best_epoch_of(history: list[dict]) -> dict | None:
    """The best epoch's metrics in ``fit``'s history (see ``epoch_rank``); None when empty."""
    return max(history, key=epoch_rank) if history else None


def build_student(config: TrialConfig, num_classes: int) -> nn.Module:
    """The student of ``config``, initialized from ``config.seed``."""
    torch.manual_seed(config.seed)
    return build_model(
        config.student, num_classes, config.stem, config.student_width, config.student_cbam
    )


def prepare_teacher(teacher: nn.Module, config: TrialConfig) -> nn.Module:
    """Frozen teacher on the training device: eval mode, no parameter requires grad."""
    teacher = teacher.to(config.device).eval().requires_grad_(False)
    if config.device.startswith("cuda"):
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def lr_at(config: TrialConfig, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: constant (the paper's) or cosine to zero."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    return config.lr


@torch.no_grad()
def evaluate_split(
    model: nn.Module, x: Tensor, y: Tensor, config: TrialConfig, mean, std
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on uint8 images ``x`` without augmentation."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with autocast(config):
        for xb, yb in eval_batches(x, y, config.eval_batch_size, mean=mean, std=std):
            logits, _ = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(len(y), 1)
    return loss_sum.item() / n, correct.item() / n


def train_step(
    config: TrialConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    connectors: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    share_params: list[nn.Parameter] | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One optimizer step; returns the detached total, the detached terms and gradient shares.

    Shares are computed only when ``share_params`` is given (else an empty dict).
    """
    with autocast(config):
        _, terms = loss_terms(config, student, teacher, connectors, x, y)
    total = weighted_total(config, terms)
    shares = gradient_shares(config, terms, share_params) if share_params else {}
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total.detach(), {t: v.detach() for t, v in terms.items()}, shares


def _state(epoch, student, connectors, optimizer, best_student, plateau, history, config) -> dict:
    return {
        "epoch": epoch,
        "student": student.state_dict(),
        "connectors": connectors.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_student": best_student,
        "plateau": dict(plateau),
        "history": list(history),
        "torch_rng": torch.get_rng_state(),
        "config": config.to_dict(),
    }


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written with ``torch.save(state)``; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {exc.__class__.__name__}") from None


def fit(
    config: TrialConfig,
    data: Dataset,
    teacher: nn.Module | None = None,
    report: Report | None = None,
    checkpoint: dict | str | Path | None = None,
) -> FitResult:
    """Train the student of ``config`` on ``data`` (validation split for selection).

    ``report(metrics, state)`` is called after every epoch; ``checkpoint`` (a state from
    ``report`` or a path to one saved with ``torch.save``) resumes training exactly.
    The returned student is the one of the best epoch (``best_epoch_of``: highest validation
    accuracy). Early stopping: after ``patience`` epochs without a lower validation loss
    (0 disables).
    """
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        keep_freed_memory()  # steps stop page-faulting their buffers in (kdcore.memory)
    if config.needs_teacher and teacher is None:
        raise ValueError(f"teacher: group {config.group!r} needs a teacher")
    data = data.to(device)
    student = build_student(config, data.num_classes).to(device)
    teacher = prepare_teacher(teacher, config) if config.needs_teacher else None
    connectors = build_connectors(config, student, teacher).to(device)
    if cuda:
        student = student.to(memory_format=torch.channels_last)
        connectors = connectors.to(memory_format=torch.channels_last)
    params = list(student.parameters()) + list(connectors.parameters())
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    best_student = copy.deepcopy(student.state_dict())  # weights of the best epoch so far
    plateau = {"val_loss": math.inf, "bad_epochs": 0}  # early stopping's lowest loss so far
    history: list[dict] = []
    start = 1
    status = "completed"
    if checkpoint is not None:
        state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        student.load_state_dict(state["student"])
        connectors.load_state_dict(state["connectors"])
        optimizer.load_state_dict(state["optimizer"])
        best_student = state["best_student"]
        plateau = dict(state["plateau"])
        history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        start = state["epoch"] + 1
        if history and history[-1]["early_stopped"]:
            start = config.epochs + 1  # it had already stopped
            status = "early_stopped"
    forward = torch.compile(student) if config.compile else student
    student_params = list(student.parameters())

    for epoch in range(start, config.epochs + 1):
        if status == "early_stopped":
            break
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        student.train()
        connectors.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        term_sums = {t: torch.zeros((), device=device) for t in config.active_terms}
        shares: dict[str, Tensor] = {}
        n_images = 0
        n_steps = 0
        batches = train_batches(
            data.train_x,
            data.train_y,
            config.batch_size,
            seed=config.seed,
            epoch=epoch,
            mean=data.mean,
            std=data.std,
        )
        for xb, yb in batches:
            # gradient-share diagnostics on the epoch's first batch only (one backward per term)
            total, terms, step_shares = train_step(
                config,
                forward,
                teacher,
                connectors,
                optimizer,
                xb,
                yb,
                share_params=student_params if n_steps == 0 else None,
            )
            shares = step_shares or shares
            loss_sum += total
            for t, v in terms.items():
                term_sums[t] += v
            n_images += len(yb)
            n_steps += 1

        train_loss = loss_sum.item() / n_steps  # the epoch's one host synchronization
        if not math.isfinite(train_loss):
            bad = [t for t, v in term_sums.items() if not math.isfinite(v.item())]
            raise DivergedError(epoch, f"terms {bad or ['total']} are not finite")
        val_loss, val_acc = evaluate_split(
            student, data.val_x, data.val_y, config, data.mean, data.std
        )
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

        if val_loss < plateau["val_loss"]:
            plateau = {"val_loss": val_loss, "bad_epochs": 0}
        else:
            plateau["bad_epochs"] += 1
            stalled = config.patience and plateau["bad_epochs"] >= config.patience
            if stalled and epoch < config.epochs:
                status = "early_stopped"
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            **{
                f"loss_{t}": (term_sums[t].item() / n_steps if t in term_sums else math.nan)
                for t in TERMS
            },
            **{f"gshare_{t}": (shares[t].item() if t in shares else math.nan) for t in TERMS},
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "epoch_seconds": seconds,
            "images_per_s": n_images / seconds,
            "early_stopped": status == "early_stopped",
        }
        history.append(metrics)
        if best_epoch_of(history)["epoch"] == epoch:
            best_student = copy.deepcopy(student.state_dict())
        if report is not None:
            report(metrics, _state(epoch, student, connectors, optimizer, best_student, plateau,
                                   history, config))

    # A fresh module for the best epoch, so states already handed to ``report`` stay unchanged.
    kept = build_student(config, data.num_classes).to(device)
    kept.load_state_dict(best_student)
    best = best_epoch_of(history) or {"epoch": 0, "val_acc": math.nan, "val_loss": math.nan}
    return FitResult(
        status=status,
        epochs_run=len(history),
        best_epoch=int(best["epoch"]),
        best_val_acc=float(best["val_acc"]),
        best_val_loss=float(best["val_loss"]),
        history=history,
        student=kept,
        connectors=connectors,
    )
