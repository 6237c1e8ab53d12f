"""Datasets as uint8 tensors, a stratified validation split, and a device-resident loader.

``load_data(spec)`` accepts:

- ``cifar10`` or ``cifar10:ROOT``, ``cifar100`` or ``cifar100:ROOT``: torchvision's
  ``CIFAR10``/``CIFAR100`` (downloaded where the network allows, otherwise read from an
  existing ROOT, also one whose files' md5 sums differ from the official ones); CIFAR-100's
  classes are its 100 fine labels;
- ``imagefolder:PATH``: ``PATH/train`` and ``PATH/test`` in ImageFolder layout, any number
  of classes, decoded once and cached as ``.npy`` files (never pickled);
- ``jpegpack:FILE``: a JPEG pack written by ``kdsearch pack`` (``kdcore.jpegpack``): the
  same images, labels and fingerprint as the ImageFolder tree it was made from;
- ``synthetic`` or ``synthetic:N``: N learnable 32x32 images per class, for mechanics tests.

A dataset's images share one size, any size; ``image_size=N`` resizes every image once at
load to NxN (bilinear, antialiased; ``kdcore.images.resize_image``), which also admits an
ImageFolder of mixed sizes. Normalization uses the training split's per-channel mean/std
unless ``mean`` and ``std`` are given; given ones enter the fingerprint.

Memory: before the image arrays are made (before any image is decoded; for CIFAR, before
its files are read), the bytes of the uint8 arrays (train + test, resized copies included)
are compared with the memory available (``MemAvailable`` in /proc/meminfo, else
``os.sysconf``); a dataset that does not fit is refused in one line with both numbers.
``KDSEARCH_MEMORY_LIMIT_BYTES`` replaces the available figure (for tests, or to keep room
for other work).

The loader keeps uint8 images on the training device and augments whole batches there
(random crop with ``crop_padding(height)`` zero padding, 4 pixels at 32x32; horizontal flip;
normalization). Batch order and augmentation are drawn from a generator seeded by (seed,
epoch) only, so runs with the same seed see identical batches whatever their group: the
comparison across groups is paired.
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
from .images import DataError, check_size, decode_image, image_shape, list_tree, resize_image
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
# Memory: the uint8 arrays of a dataset must fit before they are made.

MEMORY_LIMIT_ENV = "KDSEARCH_MEMORY_LIMIT_BYTES"
CIFAR_IMAGES = 60_000  # train + test images of CIFAR-10 and of CIFAR-100, all 32x32


def available_memory() -> tuple[int, str] | None:
    """(bytes of memory available, where that figure comes from), or None where unknown."""
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        try:
            return int(override), MEMORY_LIMIT_ENV
        except ValueError:
            raise DataError(
                f"{MEMORY_LIMIT_ENV} must be a number of bytes, got {override!r}"
            ) from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf"
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``175.8 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def array_bytes(images: int, size: tuple[int, int], image_size: int | None = None) -> int:
    """Bytes of ``images`` uint8 RGB images of ``size`` (H, W), plus their NxN copies when
    ``image_size`` N resizes them."""
    raw = images * size[0] * size[1] * 3
    if image_size is None or tuple(size) == (image_size, image_size):
        return raw
    return raw + images * image_size * image_size * 3


def check_memory(needed: int, what: str) -> None:
    """Refuse ``what`` when its ``needed`` bytes exceed the memory available."""
    found = available_memory()
    if found is None or needed <= found[0]:
        return
    available, source = found
    raise DataError(
        f"{what} needs {human_bytes(needed)} ({needed} bytes) of memory for its uint8 images "
        f"(train + test) but {human_bytes(available)} ({available} bytes) are available "
        f"({source}); use a smaller image_size or a machine with more memory"
    )


# ---------------------------------------------------------------------------------------------
# Raw sources: each returns (train_x, train_y, test_x, test_y, classes) as numpy arrays,
# images resized to ``image_size`` where it is given.

SIZE_HINT = "set image_size to resize every image to one size at load"


def _cache_dir() -> Path:
    root = os.environ.get("KDSEARCH_CACHE") or Path.home() / ".cache" / "kdsearch"
    return Path(root)


def _resize_all(x: np.ndarray, image_size: int | None) -> np.ndarray:
    """uint8 (N, H, W, 3) images as (N, image_size, image_size, 3); as they are for None."""
    if image_size is None or x.shape[1:3] == (image_size, image_size):
        return x
    out = np.empty((len(x), image_size, image_size, x.shape[3]), dtype=np.uint8)
    for i, img in enumerate(x):
        out[i] = resize_image(img, image_size)
    return out


def _decode_split(files: dict[str, list[Path]], size: tuple[int, int], image_size: int | None):
    """Decode (and resize) every file into one preallocated (N, H, W, 3) array."""
    pairs = [(label, path) for label, paths in enumerate(files.values()) for path in paths]
    images = np.empty((len(pairs), *size, 3), dtype=np.uint8)
    for i, (_, path) in enumerate(pairs):
        img = decode_image(path, str(path))
        if image_size is not None:
            img = resize_image(img, image_size)
        check_size(img, str(path), size, SIZE_HINT)
        images[i] = img
    return images, np.asarray([label for label, _ in pairs], dtype=np.int64)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def _imagefolder_key(root: Path, files: dict[str, dict[str, list[Path]]]) -> str:
    """Every file's path, size and mtime, so any change re-decodes."""
    digest = hashlib.sha256(str(root).encode())
    for split in ("train", "test"):
        for paths in files[split].values():
            for p in paths:
                st = p.stat()
                digest.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _imagefolder(root: Path, image_size: int | None = None):
    root = root.expanduser().resolve()
    classes, files = list_tree(root)
    count = sum(len(paths) for split in files.values() for paths in split.values())
    first = next(iter(files["train"].values()))[0]
    size = (image_size, image_size) if image_size else image_shape(first, str(first))
    check_memory(array_bytes(count, size), f"imagefolder:{root}")
    # Resized arrays are cached apart from the files' own pixels (never mixed).
    suffix = f"-{image_size}px" if image_size else ""
    cache = _cache_dir() / f"imagefolder-{_imagefolder_key(root, files)}{suffix}"
    names = ("train_x", "train_y", "test_x", "test_y")
    if all((cache / f"{n}.npy").exists() for n in names):
        try:
            arrays = [np.load(cache / f"{n}.npy", allow_pickle=False) for n in names]
            return (*arrays, classes)
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt below
    train_x, train_y = _decode_split(files["train"], size, image_size)
    test_x, test_y = _decode_split(files["test"], size, image_size)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name, arr in zip(names, (train_x, train_y, test_x, test_y), strict=True):
            _save_npy(cache / f"{name}.npy", arr)
    except OSError:
        pass  # caching is an optimisation only
    return train_x, train_y, test_x, test_y, classes


def _jpegpack(path: Path, image_size: int | None = None):
    """A JPEG pack (``kdcore.jpegpack``): decoded on every load, in parallel (no cache)."""
    pack = read_pack(path)
    if len(pack):
        first = decode_image(pack.jpeg[pack.offsets[0]:pack.offsets[1]], f"#0 of {path}")
        check_memory(array_bytes(len(pack), first.shape[:2], image_size), f"jpegpack:{path}")
    out, size = [], None
    for split in ("train", "test"):
        order = pack.indices(split)
        images = decode(pack, order, name=str(path))
        if image_size is not None:
            images = [resize_image(img, image_size) for img in images]
        for i, img in zip(order, images, strict=True):
            size = check_size(img, f"#{i} of {path}", size, SIZE_HINT)
        out += [np.stack(images), pack.labels[order].astype(np.int64)]
    return (*out, pack.classes)


def _unverified(cls: type) -> type:
    """``cls`` (torchvision's CIFAR10 or CIFAR100) reading the files in ROOT as they are."""

    # torchvision checks every file's md5 against the official archive's and would download
    # the archive again; where no download is possible, a local copy with other bytes (a
    # re-pickled or a test copy) is read as it is: check_integrity(path, md5=None) only
    # checks that the file exists.
    class Unverified(cls):
        train_list = [[name, None] for name, _ in cls.train_list]
        test_list = [[name, None] for name, _ in cls.test_list]
        meta = {**cls.meta, "md5": None}

    return Unverified


def _torchvision_splits(cls: type, root: str, title: str):
    """(train, test) of ``cls`` in ``root``: verified or downloaded, else the local copy."""
    try:
        return cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as exc:  # network or file errors, raised by torchvision in many types
        error = f"{exc.__class__.__name__}: {exc}"
    local = _unverified(cls)
    try:
        return local(root, train=True), local(root, train=False)
    except Exception:  # no usable local copy either: the download's error says why
        raise DataError(
            f"cannot load {title} from {root} or download it ({error}); "
            "use --data imagefolder:PATH for a local copy"
        ) from None


def _cifar(kind: str, root: str | None, image_size: int | None = None):
    """``cifar10`` or ``cifar100`` (its fine labels) through torchvision."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, title = {"cifar10": (CIFAR10, "CIFAR-10"), "cifar100": (CIFAR100, "CIFAR-100")}[kind]
    check_memory(array_bytes(CIFAR_IMAGES, (32, 32), image_size), title)
    root = root or str(_cache_dir() / kind)
    train, test = _torchvision_splits(cls, root, title)
    return (
        _resize_all(np.asarray(train.data, dtype=np.uint8), image_size),
        np.asarray(train.targets, dtype=np.int64),
        _resize_all(np.asarray(test.data, dtype=np.uint8), image_size),
        np.asarray(test.targets, dtype=np.int64),
        tuple(train.classes),
    )


def _synthetic(per_class: int, num_classes: int = 10, image_size: int | None = None):
    """Learnable noise images: each class has its own mean colour and a bright quadrant."""
    tests = max(per_class // 5, 2)
    check_memory(array_bytes((per_class + tests) * num_classes, (32, 32), image_size),
                 f"synthetic:{per_class}")
    rng = np.random.default_rng(1234)
    colours = rng.uniform(-60, 60, size=(num_classes, 3))

    def make(n: int):
        y = np.repeat(np.arange(num_classes), n)
        x = rng.normal(110, 40, size=(len(y), 32, 32, 3)) + colours[y][:, None, None, :]
        for i, label in enumerate(y):
            r, c = divmod(label % 4, 2)
            x[i, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += 50
        return _resize_all(np.clip(x, 0, 255).astype(np.uint8), image_size), y.astype(np.int64)

    train_x, train_y = make(per_class)
    test_x, test_y = make(tests)
    return train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(num_classes))


def _load_raw(spec: str, image_size: int | None = None):
    kind, _, arg = spec.partition(":")
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, arg or None, image_size)
    if kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder spec needs a path: imagefolder:PATH")
        return _imagefolder(Path(arg), image_size)
    if kind == "jpegpack":
        if not arg:
            raise DataError("jpegpack spec needs a file: jpegpack:FILE (see `kdsearch pack`)")
        return _jpegpack(Path(arg), image_size)
    if kind == "synthetic":
        try:
            per_class = int(arg) if arg else 100
        except ValueError:
            raise DataError(f"synthetic spec takes a count: synthetic:N, got {spec!r}") from None
        if per_class < 2:
            raise DataError(f"synthetic spec needs at least 2 images per class, got {per_class}")
        return _synthetic(per_class, image_size=image_size)
    raise DataError(f"unknown data spec {spec!r}: expected cifar10, cifar100, imagefolder:PATH, "
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


Stats = tuple[float, float, float]


def _check_image_size(image_size: object) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size: must be a positive number of pixels, got {image_size!r}")
    return image_size


def _check_stat(name: str, values: object, positive: bool) -> Stats:
    """3 finite numbers in [0, 1] (in (0, 1] where ``positive``), as floats."""
    try:
        floats = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(
        math.isfinite(v) and v <= 1 and (v > 0 if positive else v >= 0) for v in floats
    ):
        bound = "(0, 1]" if positive else "[0, 1]"
        raise DataError(f"{name}: needs 3 finite numbers in {bound} (per channel, images "
                        f"scaled to [0, 1] as by channel_stats), got {values!r}")
    return floats  # type: ignore[return-value]


def _check_stats(mean: object, std: object) -> tuple[Stats, Stats] | None:
    """Given normalization statistics as float triples, or None where neither is given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise DataError("mean/std: give both or neither (neither: the training split's own)")
    return _check_stat("mean", mean, False), _check_stat("std", std, True)


def load_data(
    spec: str,
    *,
    val_size: int = 5000,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    split_seed: int = 0,
    image_size: int | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
) -> Dataset:
    """Load a dataset spec, carve a stratified validation split out of train, subset per class.

    ``val_size`` images are held out of the (optionally subset) training set; with
    ``train_per_class`` the subset is taken first and ``val_size`` comes out of it.
    ``image_size`` N resizes every image to NxN at load; ``mean``/``std`` (both or neither,
    per channel, [0, 1] scale) replace the training split's statistics and enter the
    fingerprint.
    """
    image_size = _check_image_size(image_size)
    stats = _check_stats(mean, std)
    train_x, train_y, test_x, test_y, classes = _load_raw(spec, image_size)
    if train_per_class is not None:
        keep = _take_per_class(train_y, train_per_class, split_seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if test_per_class is not None:
        keep = _take_per_class(test_y, test_per_class, split_seed + 1)
        test_x, test_y = test_x[keep], test_y[keep]
    tr, va = stratified_split(train_y, val_size, split_seed)
    fit_x, fit_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    mean_std = stats or channel_stats(fit_x)
    return Dataset(
        train_x=torch.from_numpy(fit_x),
        train_y=torch.from_numpy(fit_y),
        val_x=torch.from_numpy(val_x),
        val_y=torch.from_numpy(val_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(test_y),
        classes=tuple(classes),
        mean=mean_std[0],
        std=mean_std[1],
        fingerprint=fingerprint((fit_x, fit_y, val_x, val_y, test_x, test_y), stats),
        spec=spec,
    )


def fingerprint(arrays: tuple[np.ndarray, ...], stats: tuple[Stats, Stats] | None = None) -> str:
    """16 hex digits of the SHA-256 of the arrays' bytes, then of given mean/std (none:
    the arrays only, as before normalization could be set)."""
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(np.ascontiguousarray(arr).tobytes())
    if stats is not None:
        digest.update(f"mean={stats[0]!r};std={stats[1]!r}".encode())
    return digest.hexdigest()[:16]


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


def crop_padding(size: int) -> int:
    """Zero padding of the random crop for images ``size`` pixels high: size / 8 rounded half
    up, at least 1 (4 at 32 px as in the paper's protocol, 8 at 64, 28 at 224)."""
    if size < 1:
        raise ValueError(f"crop_padding: size must be at least 1 pixel, got {size}")
    return max(1, (size + 4) // 8)


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
    x: Tensor, y: Tensor, batch_size: int, *, seed: int, epoch: int, mean, std,
    pad: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled, augmented, normalized training batches on the tensors' device.

    ``pad`` is the random crop's zero padding, ``crop_padding(height)`` when None. Drops the
    last incomplete batch (unless it would be the only one), so every step has the same shape.
    """
    pad = crop_padding(x.shape[1]) if pad is None else pad
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
