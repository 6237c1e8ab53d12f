"""``fit``: the one training loop behind every trial, the teacher, ``kdsearch train`` and reproduce.

Per epoch it trains on device-resident batches, evaluates on the validation split, and hands
``report(metrics, state)`` the epoch's metrics and a resumable state (plain tensors and
Python values: ``torch.save`` writes it, ``torch.load(weights_only=True)`` reads it back).
Passing such a state as ``checkpoint`` continues exactly where it stopped.

Metrics accumulate on the device; the host reads them once per epoch, so a CUDA step never
waits for the host. A non-finite loss raises ``DivergedError``.

The file reads top to bottom: what ``fit`` returns, the building blocks (student, teacher,
learning rate, ``evaluate_split``, ``train_step``), then ``fit`` itself and its phases in
the order they run, each a function of explicit inputs and outputs: ``set_up``,
``initial_progress`` (fresh or from a checkpoint), and per epoch ``train_epoch``,
``mean_train_loss``, ``evaluate_split``, ``early_stopping``, ``epoch_metrics``,
``next_progress`` and ``checkpoint_state``; ``fit_result`` at the end.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import TERMS, TrialConfig
from .data import Dataset, eval_batches, train_batches
from .evaluate import cross_entropy_and_accuracy, synchronizer
from .features import Size, distillable
from .memory import keep_freed_memory
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


def needs_features(config: TrialConfig) -> bool:
    """Whether a term of ``config`` compares features (AT or FA; the masks serve them)."""
    return config.w_at > 0 or config.w_fa > 0


def build_student(config: TrialConfig, num_classes: int, image_size: Size = 32) -> nn.Module:
    """The student of ``config``, initialized from ``config.seed``.

    ``image_size`` (the data's) serves to choose and check the distilled features of a model
    other than the built-in ResNets (``kdcore.features.distillable``).
    """
    torch.manual_seed(config.seed)
    return distillable(
        config.student, num_classes,
        config.given_stages("student") if needs_features(config) else None,
        image_size=image_size, count=config.auto_count("student"), stem=config.stem,
        width=config.student_width, cbam=config.student_cbam, field="student_stages",
    )


def image_shape(data: Dataset) -> tuple[int, int]:
    """(height, width) of the data's images."""
    return int(data.train_x.shape[1]), int(data.train_x.shape[2])


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
    batches = eval_batches(x, y, config.eval_batch_size, mean=mean, std=std)
    result = cross_entropy_and_accuracy(model, batches, x.device, config.precision)
    model.train(was_training)
    return result


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


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written with ``torch.save(state)``; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {exc.__class__.__name__}") from None


# ---------------------------------------------------------------------------------------------
# fit, then its phases in the order they run.


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
    data, modules = set_up(config, data, teacher)
    progress = initial_progress(modules, checkpoint)
    forward = torch.compile(modules.student) if config.compile else modules.student
    for epoch in epochs_to_run(config, progress):
        t0 = time.perf_counter()
        lr = lr_at(config, epoch)
        sums = train_epoch(config, data, modules, forward, epoch, lr)
        train_loss = mean_train_loss(sums, epoch)
        val_loss, val_acc = evaluate_split(
            modules.student, data.val_x, data.val_y, config, data.mean, data.std
        )
        seconds = seconds_since(t0, config.device)
        plateau, stopped = early_stopping(config, progress.plateau, val_loss, epoch)
        metrics = epoch_metrics(epoch, lr, sums, train_loss, (val_loss, val_acc), seconds, stopped)
        progress = next_progress(progress, metrics, plateau, modules.student)
        if report is not None:
            report(metrics, checkpoint_state(config, modules, progress))
        if stopped:
            break
    return fit_result(config, data, modules, progress)


@dataclass(frozen=True)
class Modules:
    """What ``fit`` trains with (``set_up``): the modules on the training device, the optimizer."""

    student: nn.Module
    teacher: nn.Module | None  # frozen; None when no active term needs it
    connectors: nn.ModuleDict  # the FA connectors, trained with the student
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class Progress:
    """What the epochs so far hand on to the next one; every checkpoint holds it."""

    epoch: int  # epochs done
    history: list[dict]  # the metrics of each epoch done
    plateau: dict  # early stopping: {"val_loss": the lowest so far, "bad_epochs": since then}
    best_student: dict  # the student's state dict at the best epoch so far (``best_epoch_of``)

    @property
    def stopped(self) -> bool:
        """Whether early stopping ended training after the last epoch done."""
        return bool(self.history) and self.history[-1]["early_stopped"]


@dataclass(frozen=True)
class EpochSums:
    """One epoch of training steps, summed on the device (``train_epoch``)."""

    loss: Tensor  # the steps' weighted totals
    terms: dict[str, Tensor]  # each active term's unweighted values
    shares: dict[str, Tensor]  # the gradient shares of the epoch's first step
    images: int
    steps: int


def trainable_modules(
    config: TrialConfig, num_classes: int, teacher: nn.Module | None, image_size: Size = 32
) -> tuple[nn.Module, nn.ModuleDict]:
    """The student (initialized from ``config.seed``) and its connectors on ``config.device``.

    ``teacher`` is the prepared teacher (``prepare_teacher``) the connectors map to, or None.
    On CUDA both use channels_last memory, like the loader's batches.
    """
    student = build_student(config, num_classes, image_size).to(config.device)
    connectors = build_connectors(config, student, teacher).to(config.device)
    if torch.device(config.device).type == "cuda":
        student = student.to(memory_format=torch.channels_last)
        connectors = connectors.to(memory_format=torch.channels_last)
    return student, connectors


def set_up(
    config: TrialConfig, data: Dataset, teacher: nn.Module | None
) -> tuple[Dataset, Modules]:
    """The data on the training device, and the modules and optimizer of a fresh start."""
    device = torch.device(config.device)
    if device.type == "cpu":
        keep_freed_memory()  # steps stop page-faulting their buffers in (kdcore.memory)
    if config.needs_teacher and teacher is None:
        raise ValueError(f"teacher: group {config.group!r} needs a teacher")
    data = data.to(device)
    teacher = prepare_teacher(teacher, config) if config.needs_teacher else None
    student, connectors = trainable_modules(config, data.num_classes, teacher, image_shape(data))
    params = list(student.parameters()) + list(connectors.parameters())
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return data, Modules(student, teacher, connectors, optimizer)


def initial_progress(modules: Modules, checkpoint: dict | str | Path | None) -> Progress:
    """No epochs done, or the progress of ``checkpoint`` (a state or a path to one).

    Resuming loads the student, connectors and optimizer states into ``modules`` and restores
    the global torch RNG state saved with them.
    """
    if checkpoint is None:
        best = copy.deepcopy(modules.student.state_dict())
        return Progress(0, [], {"val_loss": math.inf, "bad_epochs": 0}, best)
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    modules.student.load_state_dict(state["student"])
    modules.connectors.load_state_dict(state["connectors"])
    modules.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(
        state["epoch"], list(state["history"]), dict(state["plateau"]), state["best_student"]
    )


def epochs_to_run(config: TrialConfig, progress: Progress) -> range:
    """The 1-based epochs still to train: none once early stopping has ended training."""
    if progress.stopped:
        return range(0)
    return range(progress.epoch + 1, config.epochs + 1)


def train_epoch(
    config: TrialConfig, data: Dataset, modules: Modules, forward: nn.Module, epoch: int,
    lr: float,
) -> EpochSums:
    """One epoch of ``train_step`` at learning rate ``lr``; ``forward`` runs the student.

    Gradient shares are measured on the epoch's first batch only (one backward per term).
    """
    for group in modules.optimizer.param_groups:
        group["lr"] = lr
    modules.student.train()
    modules.connectors.train()
    device = torch.device(config.device)
    loss = torch.zeros((), device=device)
    terms = {t: torch.zeros((), device=device) for t in config.active_terms}
    shares: dict[str, Tensor] = {}
    images = steps = 0
    student_params = list(modules.student.parameters())
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
        total, step_terms, step_shares = train_step(
            config,
            forward,
            modules.teacher,
            modules.connectors,
            modules.optimizer,
            xb,
            yb,
            share_params=student_params if steps == 0 else None,
        )
        shares = step_shares or shares
        loss += total
        for t, v in step_terms.items():
            terms[t] += v
        images += len(yb)
        steps += 1
    return EpochSums(loss, terms, shares, images, steps)


def mean_train_loss(sums: EpochSums, epoch: int) -> float:
    """The epoch's mean training loss, read once (its one host synchronization).

    Raises ``DivergedError`` naming the non-finite terms when it is NaN or infinite.
    """
    train_loss = sums.loss.item() / sums.steps
    if not math.isfinite(train_loss):
        bad = [t for t, v in sums.terms.items() if not math.isfinite(v.item())]
        raise DivergedError(epoch, f"terms {bad or ['total']} are not finite")
    return train_loss


def seconds_since(t0: float, device: str) -> float:
    """Wall seconds since ``t0`` (``time.perf_counter``), after the device's queued work."""
    synchronizer(device)()
    return time.perf_counter() - t0


def early_stopping(
    config: TrialConfig, plateau: dict, val_loss: float, epoch: int
) -> tuple[dict, bool]:
    """The plateau after ``epoch``'s validation loss, and whether training stops after it.

    Training stops after ``config.patience`` epochs in a row without a lower validation loss
    (patience 0: never), unless ``epoch`` is the last one anyway.
    """
    if val_loss < plateau["val_loss"]:
        return {"val_loss": val_loss, "bad_epochs": 0}, False
    plateau = {**plateau, "bad_epochs": plateau["bad_epochs"] + 1}
    stalled = config.patience > 0 and plateau["bad_epochs"] >= config.patience
    return plateau, stalled and epoch < config.epochs


def epoch_metrics(
    epoch: int, lr: float, sums: EpochSums, train_loss: float, val: tuple[float, float],
    seconds: float, stopped: bool,
) -> dict:
    """The metrics ``fit`` reports for one epoch; ``val`` is (validation loss, accuracy).

    Every term has a ``loss_*`` and a ``gshare_*`` entry: NaN for the inactive ones.
    """
    val_loss, val_acc = val
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        **{
            f"loss_{t}": (sums.terms[t].item() / sums.steps if t in sums.terms else math.nan)
            for t in TERMS
        },
        **{f"gshare_{t}": (sums.shares[t].item() if t in sums.shares else math.nan) for t in TERMS},
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": lr,
        "epoch_seconds": seconds,
        "images_per_s": sums.images / seconds,
        "early_stopped": stopped,
    }


def next_progress(
    progress: Progress, metrics: dict, plateau: dict, student: nn.Module
) -> Progress:
    """The progress after the epoch of ``metrics``: the student's weights kept if it is best."""
    history = [*progress.history, metrics]
    best = progress.best_student
    if best_epoch_of(history)["epoch"] == metrics["epoch"]:
        best = copy.deepcopy(student.state_dict())
    return Progress(metrics["epoch"], history, plateau, best)


def checkpoint_state(config: TrialConfig, modules: Modules, progress: Progress) -> dict:
    """Everything needed to resume exactly after ``progress`` (``initial_progress``).

    Plain tensors and Python values: ``torch.save`` writes it, ``load_checkpoint`` reads it.
    """
    return {
        "epoch": progress.epoch,
        "student": modules.student.state_dict(),
        "connectors": modules.connectors.state_dict(),
        "optimizer": modules.optimizer.state_dict(),
        "best_student": progress.best_student,
        "plateau": dict(progress.plateau),
        "history": list(progress.history),
        "torch_rng": torch.get_rng_state(),
        "config": config.to_dict(),
    }


def fit_result(
    config: TrialConfig, data: Dataset, modules: Modules, progress: Progress
) -> FitResult:
    """How training ended, with a fresh student holding the best epoch's weights.

    A fresh module, so the states already handed to ``report`` stay unchanged.
    """
    kept = build_student(config, data.num_classes, image_shape(data)).to(config.device)
    kept.load_state_dict(progress.best_student)
    history = progress.history
    best = best_epoch_of(history) or {"epoch": 0, "val_acc": math.nan, "val_loss": math.nan}
    return FitResult(
        status="early_stopped" if progress.stopped else "completed",
        epochs_run=len(history),
        best_epoch=int(best["epoch"]),
        best_val_acc=float(best["val_acc"]),
        best_val_loss=float(best["val_loss"]),
        history=history,
        student=kept,
        connectors=modules.connectors,
    )
