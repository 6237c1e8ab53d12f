"""Image files: one decoder, one size check and one listing order for every image source.

``kdcore.data`` (the ``imagefolder:`` spec) and ``kdcore.jpegpack`` (the pack of a tree)
both read trees through ``list_tree`` and images through ``decode_image``, so a tree and its
pack give the same pixels in the same order; ``resize_image`` brings any image to one size.
No torch here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """The data spec or the files behind it cannot be used."""


def decode_image(source: Path | bytes | np.ndarray, name: str) -> np.ndarray:
    """One image file (a path or its encoded bytes) as uint8 (H, W, 3); errors name ``name``."""
    from PIL import Image, UnidentifiedImageError

    try:
        fp = source if isinstance(source, Path) else io.BytesIO(source)
        with Image.open(fp) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from None


def image_shape(path: Path, name: str) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from None


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) as (size, size, 3): PIL's bilinear filter, antialiased when shrinking
    (its support grows with the scale); an image already of that size is returned as is."""
    from PIL import Image

    if img.shape[:2] == (size, size):
        return img
    resized = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def check_size(img: np.ndarray, name: str, size: tuple[int, int] | None,
               hint: str = "") -> tuple[int, int]:
    """The common (H, W) of a dataset's images: ``size`` or, for the first image, its own.

    ``hint`` ends the error message (what to do about a mismatch).
    """
    size = size or img.shape[:2]
    if img.shape[:2] != size:
        raise DataError(
            f"image {name} is {img.shape[1]}x{img.shape[0]}, expected "
            f"{size[1]}x{size[0]} like the others" + (f"; {hint}" if hint else "")
        )
    return size


def _list_imagefolder(split_dir: Path) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        raise DataError(f"missing folder {split_dir}")
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise DataError(f"no class folders in {split_dir}")
    files = {}
    for cls in classes:
        # Hidden files (.DS_Store and the like) are skipped; any other file must be an image.
        paths = sorted(
            p for p in (split_dir / cls).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not paths:
            raise DataError(f"empty class folder {split_dir / cls}")
        files[cls] = paths
    return files


def list_tree(root: Path) -> tuple[tuple[str, ...], dict[str, dict[str, list[Path]]]]:
    """(classes, {"train"|"test": {class: sorted file paths}}) of an ImageFolder tree.

    The one listing order behind both ``imagefolder:`` and the JPEG pack of a tree.
    """
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist")
    files = {split: _list_imagefolder(root / split) for split in ("train", "test")}
    if list(files["train"]) != list(files["test"]):
        raise DataError(
            f"class folders differ between {root / 'train'} and {root / 'test'}: "
            f"{sorted(set(files['train']) ^ set(files['test']))}"
        )
    return tuple(files["train"]), files
