"""A JPEG pack: an ImageFolder tree's encoded images, labels and split in one ``.npz`` file.

The pack keeps the JPEG bytes as they are (no re-encoding), so decoding it gives exactly the
pixels of decoding the tree's files, in the same order (``kdcore.images.list_tree`` lists a
tree for both): ``load_data("jpegpack:FILE")`` has the fingerprint of
``load_data("imagefolder:ROOT")``. It is a plain uncompressed ``np.savez`` archive read with
``allow_pickle=False``; zip's CRC-32 of every member catches damaged bytes. Members:

- ``magic``: the string ``kdsearch-jpegpack``; ``version``: 1;
- ``classes``: class names (a unicode array) in label order;
- ``jpeg``: every file's bytes concatenated (uint8); ``offsets``: int64, N + 1 entries,
  image i is ``jpeg[offsets[i]:offsets[i + 1]]``;
- ``labels``: int64 class index per image; ``split``: uint8, 0 = train, 1 = test.

Images are stored train first, then test, each in the tree's listing order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .images import DataError, check_size, decode_image, list_tree

MAGIC = "kdsearch-jpegpack"
VERSION = 1
MEMBERS = ("magic", "version", "classes", "jpeg", "offsets", "labels", "split")
SPLITS = ("train", "test")
# Below this many images a process pool costs more than it saves (about 50 us per image).
POOL_MIN_IMAGES = 8192


class PackError(DataError):
    """The pack file is missing, damaged or not a JPEG pack."""


@dataclass(frozen=True)
class Pack:
    """The arrays of a pack, still encoded."""

    classes: tuple[str, ...]
    jpeg: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))


def pack_imagefolder(root: str | Path, out: str | Path) -> tuple[int, int]:
    """Pack the ImageFolder tree ``root`` (``train/`` and ``test/``) into ``out``, atomically.

    Every file must decode as an image (checked before anything is written). Returns
    (images, bytes written); a reader of ``out`` sees the old file or the whole new one.
    """
    classes, files = list_tree(Path(root))
    blobs, labels, split, size = [], [], [], None
    for s, name in enumerate(SPLITS):
        for label, paths in enumerate(files[name].values()):
            for path in paths:
                blob = path.read_bytes()
                size = check_size(decode_image(blob, str(path)), str(path), size)
                blobs.append(blob)
                labels.append(label)
                split.append(s)
    sizes = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    arrays = {
        "magic": np.array(MAGIC),
        "version": np.array(VERSION, dtype=np.int64),
        "classes": np.array(classes, dtype=str),
        "jpeg": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "offsets": offsets,
        "labels": np.asarray(labels, dtype=np.int64),
        "split": np.asarray(split, dtype=np.uint8),
    }
    # A file object: numpy appends no ".npz" to the name.
    out = atomic_write(out, lambda fh: np.savez(fh, **arrays))
    return len(blobs), out.stat().st_size


def read_pack(path: str | Path) -> Pack:
    """Read and check a pack; anything wrong raises ``PackError`` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PackError(f"pack file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [m for m in MEMBERS if m not in npz.files]
            if missing:
                raise PackError(f"{path} is not a kdsearch JPEG pack (no {missing[0]!r})")
            arrays = {m: npz[m] for m in MEMBERS}
    except PackError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise PackError(f"cannot read pack {path}: {exc}") from None
    if str(arrays["magic"]) != MAGIC or int(arrays["version"]) != VERSION:
        raise PackError(f"{path}: not a version-{VERSION} kdsearch JPEG pack")
    jpeg, offsets, labels, split = (arrays[m] for m in ("jpeg", "offsets", "labels", "split"))
    n = len(labels)
    ok = (jpeg.dtype == np.uint8 and offsets.shape == (n + 1,) and split.shape == (n,)
          and offsets[0] == 0 and offsets[-1] == len(jpeg) and np.all(np.diff(offsets) > 0)
          and np.isin(split, (0, 1)).all() and n > 0 and labels.min() >= 0
          and labels.max() < len(arrays["classes"]))
    if not ok:
        raise PackError(f"{path}: inconsistent pack arrays (offsets, labels or split)")
    return Pack(tuple(str(c) for c in arrays["classes"]), jpeg, offsets, labels, split)


# The pack a forked pool decodes from (set before the fork, so children share it for free).
_SHARED: dict[str, np.ndarray] = {}


def _decode_range(start: int, stop: int) -> np.ndarray | list[np.ndarray]:
    """Images ``order[start:stop]`` of the shared pack: one stacked array when their sizes
    agree (one buffer to send back from a pool worker), else the list (the caller names
    the odd one)."""
    jpeg, offsets = _SHARED["jpeg"], _SHARED["offsets"]
    images = [decode_image(jpeg[offsets[i]:offsets[i + 1]], f"#{i} of {_SHARED['name']}")
              for i in _SHARED["order"][start:stop]]
    uniform = images and all(img.shape == images[0].shape for img in images)
    return np.stack(images) if uniform else images


def _pool_context():
    """A fork context where forking is safe (Linux, CUDA not started), else None."""
    if "fork" not in mp.get_all_start_methods() or (os.cpu_count() or 1) < 2:
        return None
    import torch

    if torch.cuda.is_initialized():
        return None
    return mp.get_context("fork")


def decode(pack: Pack, order: np.ndarray, name: str = "the pack",
           workers: int | None = None) -> list[np.ndarray]:
    """Decode the images ``order`` of ``pack`` (in that order), in parallel when it pays."""
    workers = workers or min(os.cpu_count() or 1, 16)
    ctx = _pool_context() if workers > 1 and len(order) >= POOL_MIN_IMAGES else None
    _SHARED.update(jpeg=pack.jpeg, offsets=pack.offsets, order=order, name=name)
    try:
        if ctx is None:
            return list(_decode_range(0, len(order)))
        chunks = np.linspace(0, len(order), 4 * workers + 1).astype(int)
        with ctx.Pool(workers) as pool:
            parts = pool.starmap(_decode_range, zip(chunks[:-1], chunks[1:], strict=True))
        return [img for part in parts for img in part]
    finally:
        _SHARED.clear()
