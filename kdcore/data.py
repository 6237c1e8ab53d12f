"""Datasets as uint8 tensors, a stratified validation split, and a device-resident loader.

``load_data(spec)`` accepts:

- ``cifar10`` or ``cifar10:ROOT``: torchvision's ``CIFAR10`` (downloaded where the network
  allows, otherwise read from an existing ROOT);
- ``imagefolder:PATH``: ``PATH/train`` and ``PATH/test`` in ImageFolder layout, decoded once
  and cached as ``.npy`` files (never pickled);
- ``jpegpack:FILE``: a JPEG pack written by ``kdsearch pack`` (``kdcore.jpegpack``): the
  same images, labels and fingerprint as the ImageFolder tree it was made from;
- ``synthetic`` or ``synthetic:N``: N learnable 32x32 images per class, for mechanics tests.

The loader keeps uint8 images on the training device and augments whole batches there
(random crop with 4-pixel zero padding, horizontal flip, normalization). Batch order and
augmentation are drawn from a generator seeded by (seed, epoch) only, so runs with the same
seed see identical batches whatever their group: the comparison across groups is paired.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write
from .images import DataError, check_size, decode_image, list_tree
from .jpegpack import decode, read_pack

# DataError, check_size, decode_image and list_tree live in ``kdcore.images`` (shared with
# ``kdcore.jpegpack``); importing them from here keeps working.

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test images as uint8 (N, H, W, C) tensors with int64 labels."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    spec: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: str | torch.device) -> Dataset:
        """The same dataset with every tensor on ``device``."""
        moved = {
            k: getattr(self, k).to(device)
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        }
        return replace(self, **moved)


# ---------------------------------------------------------------------------------------------
# Raw sources: each returns (train_x, train_y, test_x, test_y, classes) as numpy arrays.


def _cache_dir() -> Path:
    root = os.environ.get("KDSEARCH_CACHE") or Path.home() / ".cache" / "kdsearch"
    return Path(root)


def _decode_split(files: dict[str, list[Path]], size: tuple[int, int] | None):
    images, labels = [], []
    for label, paths in enumerate(files.values()):
        for path in paths:
            img = decode_image(path, str(path))
            size = check_size(img, str(path), size)
            images.append(img)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), size


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def _imagefolder(root: Path):
    root = root.expanduser().resolve()
    classes, files = list_tree(root)
    train_files, test_files = files["train"], files["test"]
    # Cache key: every file's path, size and mtime, so any change re-decodes.
    digest = hashlib.sha256(str(root).encode())
    for split_files in (train_files, test_files):
        for paths in split_files.values():
            for p in paths:
                st = p.stat()
                digest.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    key = digest.hexdigest()[:20]
    cache = _cache_dir() / f"imagefolder-{key}"
    names = ("train_x", "train_y", "test_x", "test_y")
    if all((cache / f"{n}.npy").exists() for n in names):
        try:
            arrays = [np.load(cache / f"{n}.npy", allow_pickle=False) for n in names]
            return (*arrays, classes)
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt below
    train_x, train_y, size = _decode_split(train_files, None)
    test_x, test_y, _ = _decode_split(test_files, size)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name, arr in zip(names, (train_x, train_y, test_x, test_y), strict=True):
            _save_npy(cache / f"{name}.npy", arr)
    except OSError:
        pass  # caching is an optimisation only
    return train_x, train_y, test_x, test_y, classes


def _jpegpack(path: Path):
    """A JPEG pack (``kdcore.jpegpack``): decoded on every load, in parallel (no cache)."""
    pack = read_pack(path)
    out, size = [], None
    for split in ("train", "test"):
        order = pack.indices(split)
        images = decode(pack, order, name=str(path))
        for i, img in zip(order, images, strict=True):
            size = check_size(img, f"#{i} of {path}", size)
        out += [np.stack(images), pack.labels[order].astype(np.int64)]
    return (*out, pack.classes)


def _cifar10(root: str | None):
    from torchvision.datasets import CIFAR10

    root = root or str(_cache_dir() / "cifar10")
    try:
        train = CIFAR10(root, train=True, download=True)
        test = CIFAR10(root, train=False, download=True)
    except Exception as exc:  # network or file errors, raised by torchvision in many types
        raise DataError(
            f"cannot load CIFAR-10 from {root} or download it ({exc.__class__.__name__}: {exc}); "
            "use --data imagefolder:PATH for a local copy"
        ) from None
    return (
        np.asarray(train.data, dtype=np.uint8),
        np.asarray(train.targets, dtype=np.int64),
        np.asarray(test.data, dtype=np.uint8),
        np.asarray(test.targets, dtype=np.int64),
        tuple(train.classes),
    )


def _synthetic(per_class: int, num_classes: int = 10):
    """Learnable noise images: each class has its own mean colour and a bright quadrant."""
    rng = np.random.default_rng(1234)
    colours = rng.uniform(-60, 60, size=(num_classes, 3))

    def make(n: int):
        y = np.repeat(np.arange(num_classes), n)
        x = rng.normal(110, 40, size=(len(y), 32, 32, 3)) + colours[y][:, None, None, :]
        for i, label in enumerate(y):
            r, c = divmod(label % 4, 2)
            x[i, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += 50
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = make(per_class)
    test_x, test_y = make(max(per_class // 5, 2))
    return train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(num_classes))


def _load_raw(spec: str):
    kind, _, arg = spec.partition(":")
    if kind == "cifar10":
        return _cifar10(arg or None)
    if kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder spec needs a path: imagefolder:PATH")
        return _imagefolder(Path(arg))
    if kind == "jpegpack":
        if not arg:
            raise DataError("jpegpack spec needs a file: jpegpack:FILE (see `kdsearch pack`)")
        return _jpegpack(Path(arg))
    if kind == "synthetic":
        try:
            per_class = int(arg) if arg else 100
        except ValueError:
            raise DataError(f"synthetic spec takes a count: synthetic:N, got {spec!r}") from None
        if per_class < 2:
            raise DataError(f"synthetic spec needs at least 2 images per class, got {per_class}")
        return _synthetic(per_class)
    raise DataError(f"unknown data spec {spec!r}: expected cifar10, imagefolder:PATH, "
                    "jpegpack:FILE or synthetic")


# ---------------------------------------------------------------------------------------------
# Splits and subsets.


def _per_class_indices(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _take_per_class(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of the first ``n`` images of each class after a seeded shuffle (all if None)."""
    rng = np.random.default_rng(seed)
    parts = [idx[:n] if n is not None else idx for idx in _per_class_indices(labels, rng)]
    return np.sort(np.concatenate(parts))


def stratified_split(labels: np.ndarray, val_size: int, seed: int = 0):
    """Deterministic split of ``labels`` into (train_idx, val_idx) with classes in proportion."""
    if not 0 <= val_size < len(labels):
        raise DataError(f"val_size: must be in [0, {len(labels)}), got {val_size}")
    rng = np.random.default_rng(seed)
    groups = _per_class_indices(labels, rng)
    shares = np.array([len(g) for g in groups]) * val_size / len(labels)
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts))[: val_size - counts.sum()]:
        counts[i] += 1
    val = np.concatenate([g[:k] for g, k in zip(groups, counts, strict=True)])
    train = np.concatenate([g[k:] for g, k in zip(groups, counts, strict=True)])
    return np.sort(train), np.sort(val)


STATS_CHUNK_VALUES = 1 << 21  # uint8 values per chunk of ``channel_stats`` (16 MiB as int64)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 ``x`` (..., C), in [0, 1].

    The sums of the values and of their squares are exact integers, accumulated over chunks
    of about ``STATS_CHUNK_VALUES`` values: no float copy of the whole array (a float64 copy
    of 45,000 64x64 images would be 4.4 GB), and no rounding before the last division, so
    the result is the float64 mean/std of ``x / 255`` up to its last bits.
    """
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)
    n = len(flat)
    if n == 0:
        raise DataError("the training split is empty: no images to compute mean/std from")
    step = max(1, STATS_CHUNK_VALUES // channels)
    total = np.zeros(channels, dtype=np.int64)
    squares = np.zeros(channels, dtype=np.int64)
    for i in range(0, n, step):
        chunk = flat[i : i + step].astype(np.int64)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    # Python integers from here (no overflow): n * sum(x^2) - sum(x)^2 = n^2 * variance.
    s1, s2 = [int(v) for v in total], [int(v) for v in squares]
    mean = tuple(a / (n * 255) for a in s1)
    std = tuple(math.sqrt(n * b - a * a) / (n * 255) for a, b in zip(s1, s2, strict=True))
    return mean, std


def load_data(
    spec: str,
    *,
    val_size: int = 5000,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    split_seed: int = 0,
) -> Dataset:
    """Load a dataset spec, carve a stratified validation split out of train, subset per class.

    ``val_size`` images are held out of the (optionally subset) training set; with
    ``train_per_class`` the subset is taken first and ``val_size`` comes out of it.
    """
    train_x, train_y, test_x, test_y, classes = _load_raw(spec)
    if train_per_class is not None:
        keep = _take_per_class(train_y, train_per_class, split_seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if test_per_class is not None:
        keep = _take_per_class(test_y, test_per_class, split_seed + 1)
        test_x, test_y = test_x[keep], test_y[keep]
    tr, va = stratified_split(train_y, val_size, split_seed)
    fit_x, fit_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    mean, std = channel_stats(fit_x)

    digest = hashlib.sha256()
    for arr in (fit_x, fit_y, val_x, val_y, test_x, test_y):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return Dataset(
        train_x=torch.from_numpy(fit_x),
        train_y=torch.from_numpy(fit_y),
        val_x=torch.from_numpy(val_x),
        val_y=torch.from_numpy(val_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(test_y),
        classes=tuple(classes),
        mean=mean,
        std=std,
        fingerprint=digest.hexdigest()[:16],
        spec=spec,
    )


# ---------------------------------------------------------------------------------------------
# The device-resident loader.


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that decides one epoch's batch order and augmentation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def normalize(x_uint8_nhwc: Tensor, mean, std) -> Tensor:
    """uint8 (B, H, W, C) -> normalized float (B, C, H, W) in channels_last memory order.

    ``mean``/``std`` may be tuples or (C,) tensors already on the device (the loaders pass
    tensors: building them from tuples is a host-to-device copy, which would sync a CUDA
    stream at every batch).
    """
    x = x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _stats_on(device: torch.device, mean, std) -> tuple[Tensor, Tensor]:
    return (torch.as_tensor(mean, dtype=torch.float32).to(device),
            torch.as_tensor(std, dtype=torch.float32).to(device))


def augment(x: Tensor, crop_offsets: Tensor, flips: Tensor, pad: int = 4) -> Tensor:
    """Random crop with ``pad`` zero padding and horizontal flip of a uint8 (B, H, W, C) batch.

    ``crop_offsets`` is (B, 2) in [0, 2*pad], ``flips`` a (B,) bool tensor.
    """
    b, h, w, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    rows = crop_offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = crop_offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def train_batches(
    x: Tensor, y: Tensor, batch_size: int, *, seed: int, epoch: int, mean, std, pad: int = 4
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled, augmented, normalized training batches on the tensors' device.

    Drops the last incomplete batch (unless it would be the only one), so every step has the
    same shape.
    """
    n = len(y)
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    device = x.device
    order, offsets, flips = order.to(device), offsets.to(device), flips.to(device)
    mean, std = _stats_on(device, mean, std)
    n_batches = max(n // batch_size, 1)
    for i in range(n_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        xb = augment(x[idx], offsets[idx], flips[idx], pad)
        yield normalize(xb, mean, std), y[idx]


def eval_batches(
    x: Tensor, y: Tensor, batch_size: int, *, mean, std
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalized batches in order, without augmentation."""
    mean, std = _stats_on(x.device, mean, std)
    for i in range(0, len(y), batch_size):
        yield normalize(x[i : i + batch_size], mean, std), y[i : i + batch_size]
