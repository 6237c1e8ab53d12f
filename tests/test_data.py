"""Data: seeded batches, augmentation by hand, stratified split, subsets, ImageFolder loading."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdcore.data as kdata
from kdcore.data import (
    DataError,
    augment,
    eval_batches,
    load_data,
    normalize,
    stratified_split,
    train_batches,
)


def _batches(data, seed, epoch, batch_size=32):
    return list(train_batches(data.train_x, data.train_y, batch_size, seed=seed, epoch=epoch,
                              mean=data.mean, std=data.std))


# ---------------------------------------------------------------------------------------------
# Seeded batches


def test_train_batches_depend_only_on_seed_and_epoch(synthetic):
    torch.manual_seed(1)
    a = _batches(synthetic, seed=3, epoch=2)
    torch.manual_seed(999)  # the global RNG must not matter
    b = _batches(synthetic, seed=3, epoch=2)
    assert len(a) == len(b) == 160 // 32
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for other in (_batches(synthetic, seed=3, epoch=3), _batches(synthetic, seed=4, epoch=2)):
        assert not torch.equal(a[0][0], other[0][0])
        assert not all(torch.equal(ya, yo) for (_, ya), (_, yo) in zip(a, other, strict=True))


def test_train_batches_shapes_and_coverage(synthetic):
    batches = _batches(synthetic, seed=0, epoch=1, batch_size=48)
    assert len(batches) == 3  # 160 // 48, the incomplete last batch is dropped
    for xb, yb in batches:
        assert xb.shape == (48, 3, 32, 32) and xb.dtype == torch.float32
        assert yb.shape == (48,) and yb.dtype == torch.int64
    # A batch larger than the data still yields one (smaller) batch.
    only = _batches(synthetic, seed=0, epoch=1, batch_size=1000)
    assert len(only) == 1 and len(only[0][1]) == 160
    # That single batch is a permutation of the whole training set.
    assert torch.equal(only[0][1].sort().values, synthetic.train_y.sort().values)


def test_train_batches_equal_manual_pipeline(synthetic):
    """Order, crop offsets and flips come from epoch_generator(seed, epoch), in that order."""
    g = kdata.epoch_generator(5, 7)
    n = len(synthetic.train_y)
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    idx = order[:32]
    expected = normalize(augment(synthetic.train_x[idx], offsets[idx], flips[idx]),
                         synthetic.mean, synthetic.std)
    xb, yb = _batches(synthetic, seed=5, epoch=7)[0]
    assert torch.equal(yb, synthetic.train_y[idx])
    torch.testing.assert_close(xb, expected)


# ---------------------------------------------------------------------------------------------
# Augmentation and normalization on tiny tensors


def _grid(h=4, w=4, c=1):
    return (torch.arange(1, h * w * c + 1, dtype=torch.uint8).view(1, h, w, c))


def test_crop_offset_pad_is_identity():
    x = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    out = augment(x, torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(out, x)
    out2 = augment(x, torch.full((3, 2), 2), torch.zeros(3, dtype=torch.bool), pad=2)
    assert torch.equal(out2, x)


def test_flip_reverses_columns():
    x = _grid()
    out = augment(x, torch.tensor([[4, 4]]), torch.tensor([True]))
    expected = torch.tensor([[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]],
                            dtype=torch.uint8).view(1, 4, 4, 1)
    assert torch.equal(out, expected)


def test_zero_padding_at_edges_for_offset_zero():
    x = _grid()
    out = augment(x, torch.tensor([[0, 0]]), torch.tensor([False]), pad=2)
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 5, 6]],
                            dtype=torch.uint8).view(1, 4, 4, 1)
    assert torch.equal(out, expected)
    # Offset 2*pad shifts the other way: padding at the bottom and right.
    out = augment(x, torch.tensor([[4, 4]]), torch.tensor([False]), pad=2)
    expected = torch.tensor([[11, 12, 0, 0], [15, 16, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                            dtype=torch.uint8).view(1, 4, 4, 1)
    assert torch.equal(out, expected)
    # Default pad 4 on an 8x8 image with offset 0: the top 4 rows and left 4 columns are zero.
    big = torch.randint(1, 256, (1, 8, 8, 3), dtype=torch.uint8)
    out = augment(big, torch.tensor([[0, 0]]), torch.tensor([False]))
    assert torch.equal(out[0, :4], torch.zeros(4, 8, 3, dtype=torch.uint8))
    assert torch.equal(out[0, :, :4], torch.zeros(8, 4, 3, dtype=torch.uint8))
    assert torch.equal(out[0, 4:, 4:], big[0, :4, :4])


def test_crop_and_flip_per_sample_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 5, 6, 2), dtype=np.uint8)
    offsets = np.array([[0, 6], [3, 3], [6, 0], [1, 5]])
    flips = np.array([True, False, True, False])
    out = augment(torch.from_numpy(x), torch.from_numpy(offsets), torch.from_numpy(flips), pad=3)
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    for b in range(4):
        r, c = offsets[b]
        crop = padded[b, r:r + 5, c:c + 6]
        if flips[b]:
            crop = crop[:, ::-1]
        np.testing.assert_array_equal(out[b].numpy(), crop)


def test_normalize_values_and_layout():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = normalize(x, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 2.0, 0.0]))


def test_eval_batches_are_ordered_and_unaugmented(synthetic):
    xs, ys = zip(*eval_batches(synthetic.val_x, synthetic.val_y, 16, mean=synthetic.mean,
                               std=synthetic.std), strict=True)
    assert [len(y) for y in ys] == [16, 16, 8]
    assert torch.equal(torch.cat(ys), synthetic.val_y)
    torch.testing.assert_close(torch.cat(xs), normalize(synthetic.val_x, synthetic.mean,
                                                        synthetic.std))


# ---------------------------------------------------------------------------------------------
# Splits and subsets


def test_stratified_split_deterministic_stratified_disjoint():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), [10, 20, 30]))
    tr, va = stratified_split(labels, 12, seed=0)
    tr2, va2 = stratified_split(labels, 12, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 12 and len(tr) == 48
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(60))
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 4, 6]
    assert np.bincount(labels[tr], minlength=3).tolist() == [8, 16, 24]
    _, va3 = stratified_split(labels, 12, seed=1)
    assert not np.array_equal(va, va3)
    assert np.bincount(labels[va3], minlength=3).tolist() == [2, 4, 6]


def test_stratified_split_rounding_and_bounds():
    labels = np.repeat(np.arange(3), 5)
    _, va = stratified_split(labels, 4, seed=0)
    counts = np.bincount(labels[va], minlength=3)
    assert counts.sum() == 4 and set(counts.tolist()) <= {1, 2}
    tr, va = stratified_split(labels, 0)
    assert len(va) == 0 and len(tr) == 15
    for bad in (-1, 15):
        with pytest.raises(DataError, match="val_size"):
            stratified_split(labels, bad)


def test_synthetic_load_split_and_fingerprint(synthetic):
    d = synthetic
    assert d.classes == tuple(f"class{i}" for i in range(10)) and d.num_classes == 10
    assert d.train_x.shape == (160, 32, 32, 3) and d.train_x.dtype == torch.uint8
    assert d.val_x.shape == (40, 32, 32, 3) and d.test_x.shape == (40, 32, 32, 3)
    assert torch.bincount(d.val_y, minlength=10).tolist() == [4] * 10
    assert torch.bincount(d.train_y, minlength=10).tolist() == [16] * 10
    pixels = d.train_x.reshape(-1, 3).double() / 255
    np.testing.assert_allclose(d.mean, pixels.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(d.std, pixels.std(0, unbiased=False).numpy(), rtol=1e-6)
    again = load_data("synthetic:20", val_size=40)
    assert again.fingerprint == d.fingerprint
    assert torch.equal(again.train_x, d.train_x)
    assert load_data("synthetic:20", val_size=40, split_seed=1).fingerprint != d.fingerprint


def test_per_class_subsetting():
    d = load_data("synthetic:20", val_size=40, train_per_class=10, test_per_class=2)
    assert torch.bincount(d.train_y, minlength=10).tolist() == [6] * 10
    assert torch.bincount(d.val_y, minlength=10).tolist() == [4] * 10
    assert torch.bincount(d.test_y, minlength=10).tolist() == [2] * 10
    full = load_data("synthetic:20", val_size=40)
    # The subset's images are images of the full training pool (train + val).
    pool = torch.cat([full.train_x, full.val_x]).flatten(1)
    sub = torch.cat([d.train_x, d.val_x]).flatten(1)
    matches = (sub[:, None, :] == pool[None, :, :]).all(-1).sum(1)
    assert matches.tolist() == [1] * 100


def _raw(train_x: np.ndarray):
    """``_load_raw``'s answer for a constructed training split (labels 0, 1, 0, 1, ...)."""
    train_y = np.arange(len(train_x), dtype=np.int64) % 2
    test_x, test_y = train_x[:2].copy(), train_y[:2].copy()
    return lambda spec, image_size=None: (train_x, train_y, test_x, test_y, ("a", "b"))


def test_mean_and_std_of_a_hand_computed_split(monkeypatch):
    # 4 pixels (2 images of 1x2): channel 0 is 0, 255, 0, 255 -> mean 0.5, std 0.5;
    # channel 1 is 51 everywhere -> mean 0.2, std 0; channel 2 is 0, 0, 0, 255 -> mean
    # 0.25, std sqrt((3 * 0.25^2 + 0.75^2) / 4) = sqrt(0.1875) = sqrt(3) / 4.
    x = np.array([[[[0, 51, 0], [255, 51, 0]]], [[[0, 51, 0], [255, 51, 255]]]], np.uint8)
    monkeypatch.setattr(kdata, "_load_raw", _raw(x))
    d = load_data("constructed", val_size=0)
    assert d.mean == pytest.approx((0.5, 0.2, 0.25), abs=1e-12)
    assert d.std == pytest.approx((0.5, 0.0, 3 ** 0.5 / 4), abs=1e-12)
    # Accumulated over chunks of one pixel each, the same numbers.
    monkeypatch.setattr(kdata, "STATS_CHUNK_VALUES", 3)
    mean, std = kdata.channel_stats(x)
    assert mean == pytest.approx((0.5, 0.2, 0.25), abs=1e-12)
    assert std == pytest.approx((0.5, 0.0, 3 ** 0.5 / 4), abs=1e-12)


def test_mean_and_std_need_no_float_copy_of_the_training_split(monkeypatch):
    """The statistics of a 30 MB training split stay far below one float64 copy of it
    (240 MB; computing them on such a copy took twice that at its peak)."""
    import tracemalloc

    x = np.random.default_rng(0).integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(kdata, "_load_raw", _raw(x))
    float64_copy = x.size * 8
    tracemalloc.start()
    try:
        d = load_data("constructed", val_size=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < float64_copy / 2, f"peak {peak / 2**20:.0f} MiB"
    pixels = d.train_x.reshape(-1, 3).double() / 255  # a float64 reference, outside the bound
    np.testing.assert_allclose(d.mean, pixels.mean(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(d.std, pixels.std(0, unbiased=False).numpy(), rtol=1e-9)


@pytest.mark.parametrize("spec", ["nope", "synthetic:1", "synthetic:x", "imagefolder:"])
def test_bad_specs_raise_data_error(spec):
    with pytest.raises(DataError):
        load_data(spec, val_size=2)


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _pixels(seed: int, size=(6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _make_folder(root: Path, train_n=4, test_n=2, classes=("ant", "bee")) -> dict:
    """A tiny ImageFolder of lossless PNGs; returns the pixel arrays written, by split."""
    written = {"train": [], "test": []}
    seed = 0
    for split, n in (("train", train_n), ("test", test_n)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = _pixels(seed)
                seed += 1
                Image.fromarray(arr).save(root / split / cls / f"{i:03d}.png")
                written[split].append(arr)
    return written


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("KDSEARCH_CACHE", str(path))
    return path


def test_imagefolder_loads_pixels_labels_and_uses_cache(tmp_path, cache, count_calls):
    root = tmp_path / "data"
    written = _make_folder(root)
    calls = count_calls(kdata, "decode_image")
    d = load_data(f"imagefolder:{root}", val_size=2)
    assert calls["n"] == 12
    assert d.classes == ("ant", "bee")
    assert d.train_x.shape == (6, 6, 5, 3) and d.val_x.shape == (2, 6, 5, 3)
    assert torch.bincount(d.val_y).tolist() == [1, 1]
    np.testing.assert_array_equal(d.test_x.numpy(), np.stack(written["test"]))
    assert d.test_y.tolist() == [0, 0, 1, 1]
    # Train + val together are exactly the training files, each with its class label.
    got = {(arr.tobytes(), int(lbl)) for arr, lbl in
           zip(torch.cat([d.train_x, d.val_x]).numpy(), torch.cat([d.train_y, d.val_y]).tolist(),
               strict=True)}
    expected = {(arr.tobytes(), i // 4) for i, arr in enumerate(written["train"])}
    assert got == expected
    assert list(cache.glob("imagefolder-*/train_x.npy"))

    d2 = load_data(f"imagefolder:{root}", val_size=2)
    assert calls["n"] == 12  # second load reads the cache, decodes nothing
    assert d2.fingerprint == d.fingerprint and torch.equal(d2.train_x, d.train_x)

    # Changing a file invalidates the cache.
    Image.fromarray(_pixels(99)).save(root / "test" / "bee" / "001.png")
    os.utime(root / "test" / "bee" / "001.png", ns=(1, 1))
    d3 = load_data(f"imagefolder:{root}", val_size=2)
    assert calls["n"] == 24
    np.testing.assert_array_equal(d3.test_x[3].numpy(), _pixels(99))


def test_imagefolder_mismatched_class_folders(tmp_path, cache):
    root = tmp_path / "data"
    _make_folder(root)
    (root / "test" / "bee").rename(root / "test" / "wasp")
    with pytest.raises(DataError, match="class folders differ"):
        load_data(f"imagefolder:{root}", val_size=2)


def test_imagefolder_empty_class_folder(tmp_path, cache):
    root = tmp_path / "data"
    _make_folder(root)
    (root / "train" / "cat").mkdir()
    (root / "test" / "cat").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        load_data(f"imagefolder:{root}", val_size=2)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_imagefolder_corrupt_file_names_the_file(tmp_path, cache, content):
    root = tmp_path / "data"
    _make_folder(root)
    bad = root / "train" / "bee" / "bad.jpg"
    if content == "truncated":
        from io import BytesIO

        buf = BytesIO()
        Image.fromarray(_pixels(7, (32, 32))).save(buf, format="JPEG")
        content = buf.getvalue()[:200]
    bad.write_bytes(content)
    with pytest.raises(DataError, match="bad.jpg"):
        load_data(f"imagefolder:{root}", val_size=2)


def test_imagefolder_missing_paths(tmp_path, cache):
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}", val_size=2)
    root = tmp_path / "data"
    _make_folder(root)
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="missing folder"):
        load_data(f"imagefolder:{root}", val_size=2)


def test_imagefolder_size_mismatch(tmp_path, cache):
    root = tmp_path / "data"
    _make_folder(root)
    Image.fromarray(_pixels(3, (7, 5))).save(root / "train" / "ant" / "zzz.png")
    with pytest.raises(DataError, match="zzz.png"):
        load_data(f"imagefolder:{root}", val_size=2)


def test_dataset_to_moves_every_tensor(synthetic):
    moved = synthetic.to("cpu")
    assert moved.fingerprint == synthetic.fingerprint
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(moved, name), getattr(synthetic, name))


# ---------------------------------------------------------------------------------------------
# JPEG packs (kdsearch pack, --data jpegpack:FILE)


def _make_jpeg_folder(root: Path, train_n=5, test_n=2, classes=("ant", "bee", "cat")) -> None:
    """A tiny ImageFolder of JPEG files (lossy: only decoding the same bytes gives the same
    pixels, which is what the pack must preserve)."""
    seed = 0
    for split, n in (("train", train_n), ("test", test_n)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pixels(seed, (8, 8))).save(root / split / cls / f"{i}.jpg",
                                                            quality=75)
                seed += 1


def _same_dataset(a, b) -> None:
    assert a.fingerprint == b.fingerprint
    assert a.classes == b.classes and a.mean == b.mean and a.std == b.std
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_jpegpack_loads_the_trees_arrays_and_fingerprint(tmp_path, cache, capsys):
    from search.commands.cli import main

    root = tmp_path / "tree"
    _make_jpeg_folder(root)
    pack = tmp_path / "packs" / "tiny.jpegpack"
    assert main(["pack", str(root), "--out", str(pack)]) == 0
    assert "21 images" in capsys.readouterr().out
    tree = load_data(f"imagefolder:{root}", val_size=3)
    packed = load_data(f"jpegpack:{pack}", val_size=3)
    _same_dataset(tree, packed)
    assert packed.spec == f"jpegpack:{pack}" and packed.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # The file is a plain npz: the JPEG bytes are the files' bytes, in listing order.
    from kdcore.jpegpack import read_pack

    p = read_pack(pack)
    first_test = p.indices("test")[0]
    assert p.jpeg[p.offsets[first_test]:p.offsets[first_test + 1]].tobytes() == (
        root / "test" / "ant" / "0.jpg").read_bytes()
    assert p.classes == ("ant", "bee", "cat") and len(p) == 21
    with np.load(pack, allow_pickle=False) as npz:  # loads without pickle
        assert npz["split"].tolist() == [0] * 15 + [1] * 6


def test_jpegpack_parallel_decode_equals_serial(tmp_path, cache, monkeypatch):
    from kdcore import jpegpack

    root = tmp_path / "tree"
    _make_jpeg_folder(root, train_n=6, test_n=3)
    pack = tmp_path / "t.jpegpack"
    jpegpack.pack_imagefolder(root, pack)
    p = jpegpack.read_pack(pack)
    order = np.arange(len(p))[::-1]
    serial = jpegpack.decode(p, order, workers=1)
    monkeypatch.setattr(jpegpack, "POOL_MIN_IMAGES", 0)
    assert jpegpack._pool_context() is not None  # Linux, CUDA not started: the forked pool
    parallel = jpegpack.decode(p, order, workers=2)
    assert len(parallel) == len(order) == 27
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
    # A damaged image inside a pack is named by its index, in the pool as in one process.
    jpeg = p.jpeg.copy()
    jpeg[p.offsets[4]:p.offsets[5]] = 0
    bad = jpegpack.Pack(p.classes, jpeg, p.offsets, p.labels, p.split)
    for workers in (1, 2):
        with pytest.raises(DataError, match="#4 of"):
            jpegpack.decode(bad, np.arange(len(p)), workers=workers)


def test_jpegpack_of_real_cifar10_files_matches_tree(tmp_path, cache, shared_data_dir):
    """Real CIFAR-10 JPEG bytes (10 train, 4 test per class, linked) pack and load alike."""
    root = tmp_path / "tree"
    for split, n in (("train", 10), ("test", 4)):
        for cls_dir in sorted((shared_data_dir / split).iterdir()):
            (root / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (root / split / cls_dir.name / f.name).symlink_to(f)
    from kdcore.jpegpack import pack_imagefolder

    images, size = pack_imagefolder(root, tmp_path / "c.jpegpack")
    assert images == 140 and size > 140 * 500  # the JPEG bytes themselves, not pixels
    tree = load_data(f"imagefolder:{root}", val_size=20)
    packed = load_data(f"jpegpack:{tmp_path / 'c.jpegpack'}", val_size=20)
    _same_dataset(tree, packed)
    assert packed.train_x.shape[1:] == (32, 32, 3) and packed.classes == kdata.CIFAR10_CLASSES


def _rewrite_npz(src: Path, dst: Path, **changes) -> None:
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with dst.open("wb") as fh:
        np.savez(fh, **arrays)


def test_jpegpack_rejects_damaged_and_foreign_files(tmp_path, cache):
    root = tmp_path / "tree"
    _make_jpeg_folder(root)
    good = tmp_path / "good.jpegpack"
    from kdcore.jpegpack import pack_imagefolder

    pack_imagefolder(root, good)
    raw = good.read_bytes()
    cases = {}
    flipped = bytearray(raw)
    start = raw.find((root / "train" / "bee" / "0.jpg").read_bytes())
    assert start > 0
    flipped[start + 100] ^= 0xFF  # inside the JPEG bytes: zip's CRC-32 no longer matches
    cases["flipped"] = bytes(flipped)
    cases["truncated"] = raw[: len(raw) // 2]
    cases["text"] = b"hello"
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    _rewrite_npz(good, tmp_path / "nomagic", magic=None)
    _rewrite_npz(good, tmp_path / "pickled", classes=np.array([{"a": 1}], dtype=object))
    _rewrite_npz(good, tmp_path / "offsets", offsets=np.zeros(22, dtype=np.int64))
    _rewrite_npz(good, tmp_path / "version", version=np.array(2))
    for name in (*cases, "nomagic", "pickled", "offsets", "version", "missing"):
        with pytest.raises(DataError, match=name if name != "flipped" else "Bad CRC-32"):
            load_data(f"jpegpack:{tmp_path / name}", val_size=3)
    with pytest.raises(DataError, match="jpegpack:FILE"):
        load_data("jpegpack:", val_size=3)


@pytest.mark.parametrize("case", ["no-source", "corrupt-image", "size-mismatch", "out-is-dir"])
def test_pack_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    from search.commands.cli import main

    root = tmp_path / "tree"
    _make_jpeg_folder(root)
    out = tmp_path / "packs" / "x.jpegpack"
    if case == "no-source":
        root = tmp_path / "nowhere"
    elif case == "corrupt-image":
        (root / "test" / "bee" / "9.jpg").write_bytes(b"not a jpeg")
    elif case == "size-mismatch":
        Image.fromarray(_pixels(1, (9, 8))).save(root / "train" / "cat" / "z.jpg")
    else:
        out.mkdir(parents=True)
    assert main(["pack", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdsearch pack: error:")
    expected = {"no-source": "does not exist", "corrupt-image": "9.jpg",
                "size-mismatch": "z.jpg", "out-is-dir": "--out"}[case]
    assert expected in err[0]
    leftovers = [p for p in (tmp_path / "packs").rglob("*")] if out.parent.exists() else []
    assert leftovers == ([out] if case == "out-is-dir" else [])


# ---------------------------------------------------------------------------------------------
# Atomic writes (kdcore.atomic): the data cache, the JPEG pack and the teacher use one.


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path, umask_022):
    from kdcore.atomic import atomic_write, atomic_write_bytes

    path = tmp_path / "sub" / "a.npy"  # missing folders are made
    assert atomic_write(path, lambda fh: np.save(fh, np.arange(3))) == path
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    assert path.stat().st_mode & 0o777 == 0o644  # 0666 less the umask, not mkstemp's 0600
    os.umask(0o002)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o664

    def fails(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"new"  # untouched
    assert [p.name for p in path.parent.iterdir()] == ["a.npy"]  # no temporary left


def test_cache_and_pack_files_get_umask_permissions(tmp_path, cache, umask_022):
    from kdcore.jpegpack import pack_imagefolder

    root = tmp_path / "tree"
    _make_jpeg_folder(root)
    load_data(f"imagefolder:{root}", val_size=3)
    pack = tmp_path / "t.jpegpack"
    pack_imagefolder(root, pack)
    files = [*cache.glob("imagefolder-*/*"), pack]
    assert len(files) == 5
    assert {p.stat().st_mode & 0o777 for p in files} == {0o644}
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left


# ---------------------------------------------------------------------------------------------
# Issue 18: fingerprints, normalization, crop padding, image sizes, CIFAR-100, memory


# Fingerprints computed on the code before mean/std/image_size existed (commit 8bd32d0):
# existing caches and stored studies depend on them.
PINNED_FINGERPRINTS = {
    ("synthetic:10", 20, None, None, 0): "e2e1f1059f60fe6c",
    ("synthetic:20", 40, None, None, 0): "e4530fdefcaf2fcd",
    ("synthetic:10", 0, 5, 2, 3): "a3b1147faf697595",
}


@pytest.mark.parametrize(("key", "expected"), PINNED_FINGERPRINTS.items())
def test_fingerprint_without_given_stats_is_unchanged(key, expected):
    spec, val_size, train_n, test_n, seed = key
    d = load_data(spec, val_size=val_size, train_per_class=train_n, test_per_class=test_n,
                  split_seed=seed)
    assert d.fingerprint == expected
    if key[0] == "synthetic:10" and val_size == 20:  # image_size = the images' size: no resize
        assert load_data(spec, val_size=val_size, image_size=32).fingerprint == expected


def test_imagefolder_fingerprint_is_unchanged(tmp_path, cache):
    root = tmp_path / "data"
    _make_folder(root)
    assert load_data(f"imagefolder:{root}", val_size=2).fingerprint == "42da3d43c0ceb4fa"


def test_given_mean_and_std_are_used_and_enter_the_fingerprint():
    plain = load_data("synthetic:10", val_size=20)
    given = load_data("synthetic:10", val_size=20, mean=(0.5, 0.25, 0.125), std=[1, 0.5, 0.25])
    assert given.mean == (0.5, 0.25, 0.125) and given.std == (1.0, 0.5, 0.25)
    assert all(isinstance(v, float) for v in (*given.mean, *given.std))
    assert torch.equal(given.train_x, plain.train_x) and torch.equal(given.test_y, plain.test_y)
    assert given.fingerprint != plain.fingerprint == "e2e1f1059f60fe6c"
    again = load_data("synthetic:10", val_size=20, mean=(0.5, 0.25, 0.125), std=(1, 0.5, 0.25))
    assert again.fingerprint == given.fingerprint
    other = load_data("synthetic:10", val_size=20, mean=(0.5, 0.25, 0.125), std=(1, 0.5, 0.5))
    assert other.fingerprint != given.fingerprint
    # Given statistics equal to the split's own still mark other preprocessing settings.
    same = load_data("synthetic:10", val_size=20, mean=plain.mean, std=plain.std)
    assert same.mean == plain.mean and same.fingerprint != plain.fingerprint
    # The loader normalizes with the given numbers: pixel 0 -> -mean / std.
    (xb, _), = list(eval_batches(given.val_x[:1] * 0, given.val_y[:1], 1, mean=given.mean,
                                 std=given.std))
    assert xb[0, :, 0, 0].tolist() == [-0.5, -0.5, -0.5]


@pytest.mark.parametrize(("mean", "std", "message"), [
    ((0.5, 0.5, 0.5), None, "both or neither"),
    (None, (0.2, 0.2, 0.2), "both or neither"),
    ((0.5, 0.5), (0.2, 0.2, 0.2), "mean: needs 3 finite numbers in [0, 1]"),
    ((0.5, float("nan"), 0.5), (0.2, 0.2, 0.2), "mean: needs 3"),
    ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7), "mean: needs 3"),  # 0-255 scale
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), "std: needs 3 finite numbers in (0, 1]"),
    ((0.5, 0.5, 0.5), (0.2, -0.1, 0.2), "std: needs 3"),
    ((0.5, 0.5, 0.5), (0.2, 0.2, float("inf")), "std: needs 3"),
    ("abc", (0.2, 0.2, 0.2), "mean: needs 3"),
])
def test_bad_mean_or_std_is_a_one_line_data_error(mean, std, message):
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_data("synthetic:10", val_size=20, mean=mean, std=std)
    assert "\n" not in str(err.value)


def test_crop_padding_hand_values():
    # size / 8 rounded half up, at least 1
    expected = {32: 4, 64: 8, 40: 5, 20: 3, 12: 2, 96: 12, 224: 28, 8: 1, 4: 1, 1: 1}
    assert {size: kdata.crop_padding(size) for size in expected} == expected
    with pytest.raises(ValueError, match="crop_padding"):
        kdata.crop_padding(0)


def _manual_batch(x, y, mean, std, seed, epoch, pad, batch_size=16):
    """The first batch by hand: order, offsets in [0, 2 * pad], flips from one generator."""
    g = kdata.epoch_generator(seed, epoch)
    n = len(y)
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    idx = order[:batch_size]
    return normalize(augment(x[idx], offsets[idx], flips[idx], pad), mean, std), y[idx]


def test_train_batches_pad_follows_the_image_size(synthetic):
    d = synthetic  # 32x32: pad 4, the batches of before
    first = next(train_batches(d.train_x, d.train_y, 16, seed=2, epoch=3, mean=d.mean,
                               std=d.std))
    four = next(train_batches(d.train_x, d.train_y, 16, seed=2, epoch=3, mean=d.mean,
                              std=d.std, pad=4))
    assert torch.equal(first[0], four[0]) and torch.equal(first[1], four[1])
    xb, yb = _manual_batch(d.train_x, d.train_y, d.mean, d.std, 2, 3, pad=4)
    assert torch.equal(first[0], xb) and torch.equal(first[1], yb)
    big = load_data("synthetic:4", val_size=10, image_size=64)  # 64x64: pad 8
    got = next(train_batches(big.train_x, big.train_y, 16, seed=2, epoch=3, mean=big.mean,
                             std=big.std))
    xb, yb = _manual_batch(big.train_x, big.train_y, big.mean, big.std, 2, 3, pad=8)
    assert got[0].shape == (16, 3, 64, 64)
    assert torch.equal(got[0], xb) and torch.equal(got[1], yb)
    xb4, _ = _manual_batch(big.train_x, big.train_y, big.mean, big.std, 2, 3, pad=4)
    assert not torch.equal(got[0], xb4)


def test_resize_image_is_antialiased_bilinear():
    from kdcore.images import resize_image

    four = np.array([[[10] * 3, [20] * 3], [[30] * 3, [40] * 3]], dtype=np.uint8)
    assert resize_image(four, 1).tolist() == [[[25, 25, 25]]]  # the mean of the 4 pixels
    # 4x4 of two halves (0 | 200) to 2x2: output column 0 is centred on input x = 1, and the
    # triangle filter (radius 2 at scale 2) weights input centres 0.5, 1.5, 2.5 by 0.75, 0.75,
    # 0.25: 0.25 * 200 / 1.75 = 28.6 -> 29, (0.75 + 0.75) * 200 / 1.75 = 171.4 -> 171.
    # Plain bilinear sampling (no antialias) would give 0 and 200.
    halves = np.zeros((4, 4, 3), dtype=np.uint8)
    halves[:, 2:] = 200
    out = resize_image(halves, 2)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[29, 171], [29, 171]]
    assert resize_image(halves, 4) is halves  # already that size: untouched


def _colour(i: int) -> tuple[int, int, int]:
    return (7 * i + 3) % 256, 255 - (5 * i) % 256, (11 * i) % 256


def _make_constant_folder(root: Path, size=(40, 40), classes=("ant", "bee", "cat"),
                          train_n=4, test_n=2) -> dict:
    """An ImageFolder of constant-colour PNGs (image i has ``_colour(i)``); colours by split."""
    colours, i = {"train": [], "test": []}, 0
    for split, n in (("train", train_n), ("test", test_n)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(np.full((*size, 3), _colour(i), dtype=np.uint8)).save(
                    root / split / cls / f"{k:03d}.png")
                colours[split].append(_colour(i))
                i += 1
    return colours


def _colours_of(x: torch.Tensor) -> list[tuple[int, ...]]:
    """Each image's colour, checking that it is constant."""
    flat = x.reshape(len(x), -1, 3)
    assert torch.equal(flat, flat[:, :1].expand_as(flat))
    return [tuple(c) for c in flat[:, 0].tolist()]


def test_imagefolder_three_classes_at_40px(tmp_path, cache):
    root = tmp_path / "data"
    colours = _make_constant_folder(root)
    d = load_data(f"imagefolder:{root}", val_size=3)
    assert d.classes == ("ant", "bee", "cat") and d.num_classes == 3
    assert d.train_x.shape == (9, 40, 40, 3) and d.val_x.shape == (3, 40, 40, 3)
    assert d.test_x.shape == (6, 40, 40, 3) and d.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert _colours_of(d.test_x) == colours["test"]
    assert sorted(_colours_of(torch.cat([d.train_x, d.val_x]))) == sorted(colours["train"])


def test_imagefolder_mixed_sizes_need_image_size(tmp_path, cache):
    root = tmp_path / "data"
    _make_constant_folder(root)
    odd = root / "train" / "bee" / "001.png"
    Image.fromarray(np.full((30, 20, 3), 9, dtype=np.uint8)).save(odd)  # 20 wide, 30 high
    with pytest.raises(DataError) as err:
        load_data(f"imagefolder:{root}", val_size=3)
    message = str(err.value)
    assert "\n" not in message and str(odd) in message
    assert "is 20x30, expected 40x40" in message and "set image_size" in message


def test_imagefolder_image_size_resizes_mixed_sizes(tmp_path, cache):
    root = tmp_path / "data"
    colours = _make_constant_folder(root)
    for path, shape, value in ((root / "test" / "cat" / "001.png", (30, 20), 9),
                               (root / "train" / "ant" / "000.png", (8, 64), 77)):  # the first
        Image.fromarray(np.full((*shape, 3), value, dtype=np.uint8)).save(path)
    colours["test"][-1], colours["train"][0] = (9, 9, 9), (77, 77, 77)
    d = load_data(f"imagefolder:{root}", val_size=3, image_size=16)
    assert d.train_x.shape == (9, 16, 16, 3) and d.test_x.shape == (6, 16, 16, 3)
    assert d.train_x.dtype == torch.uint8
    assert _colours_of(d.test_x) == colours["test"]  # a constant colour stays exactly that
    assert sorted(_colours_of(torch.cat([d.train_x, d.val_x]))) == sorted(colours["train"])


def test_imagefolder_cache_keeps_resized_and_original_arrays_apart(tmp_path, cache, count_calls):
    root = tmp_path / "data"
    _make_constant_folder(root)
    calls = count_calls(kdata, "decode_image")
    plain = load_data(f"imagefolder:{root}", val_size=3)
    small = load_data(f"imagefolder:{root}", val_size=3, image_size=16)
    assert calls["n"] == 36  # 18 files, decoded once per size
    assert len(list(cache.glob("imagefolder-*/train_x.npy"))) == 2
    assert len(list(cache.glob("imagefolder-*-16px/train_x.npy"))) == 1
    again_plain = load_data(f"imagefolder:{root}", val_size=3)
    again_small = load_data(f"imagefolder:{root}", val_size=3, image_size=16)
    assert calls["n"] == 36  # both from their own cache
    assert plain.train_x.shape[1:] == again_plain.train_x.shape[1:] == (40, 40, 3)
    assert small.train_x.shape[1:] == again_small.train_x.shape[1:] == (16, 16, 3)
    assert again_plain.fingerprint == plain.fingerprint != small.fingerprint
    assert again_small.fingerprint == small.fingerprint


def test_image_size_for_synthetic_and_jpegpack(tmp_path, cache):
    d = load_data("synthetic:4", val_size=10, image_size=64)
    assert d.train_x.shape == (30, 64, 64, 3) and d.test_x.shape == (20, 64, 64, 3)
    plain = load_data("synthetic:4", val_size=10)
    # Upscaling by 2 keeps each image's mean colour (up to edge effects and rounding).
    np.testing.assert_allclose(d.test_x.double().mean((1, 2)), plain.test_x.double().mean((1, 2)),
                               atol=1.0)
    from kdcore.jpegpack import pack_imagefolder

    root = tmp_path / "tree"
    _make_jpeg_folder(root)  # 8x8 JPEGs
    pack_imagefolder(root, tmp_path / "t.jpegpack")
    tree = load_data(f"imagefolder:{root}", val_size=3, image_size=4)
    packed = load_data(f"jpegpack:{tmp_path / 't.jpegpack'}", val_size=3, image_size=4)
    assert packed.train_x.shape[1:] == (4, 4, 3)
    _same_dataset(tree, packed)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_bad_image_size_is_a_data_error(bad):
    with pytest.raises(DataError, match="image_size"):
        load_data("synthetic:4", val_size=10, image_size=bad)


def _make_cifar100(root: Path, train_n: int = 2, test_n: int = 1):
    """``ROOT/cifar-100-python/{train,test,meta}`` pickled as torchvision reads them (their md5
    sums are not the official ones). Returns (fine label names, {split: (images, labels)})."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine{99 - i:02d}" for i in range(100)]  # not sorted: the order is meta's
    rng = np.random.default_rng(5)
    written = {}
    for split, n in (("train", train_n), ("test", test_n)):
        labels = np.tile(np.arange(100), n)
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "filenames": [f"{i}.png" for i in range(len(labels))]}
        (folder / split).write_bytes(pickle.dumps(entry))
        written[split] = (images, labels)
    meta = {"fine_label_names": names, "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return names, written


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails at once (as without a network), whatever the machine."""
    from torchvision.datasets import CIFAR10

    def no_network(self):
        raise OSError("no network in this test")

    monkeypatch.setattr(CIFAR10, "download", no_network)  # CIFAR100 inherits it


def test_cifar100_reads_a_local_copy_offline(tmp_path, offline):
    names, written = _make_cifar100(tmp_path / "c100")
    d = load_data(f"cifar100:{tmp_path / 'c100'}", val_size=100)
    assert d.classes == tuple(names) and d.num_classes == 100 and d.spec.startswith("cifar100:")
    assert d.train_x.shape == (100, 32, 32, 3) and d.val_x.shape == (100, 32, 32, 3)
    test_images, test_labels = written["test"]
    np.testing.assert_array_equal(d.test_x.numpy(), test_images)  # HWC as written
    assert d.test_y.tolist() == test_labels.tolist()
    images, labels = written["train"]
    got = {(a.tobytes(), int(b)) for a, b in zip(torch.cat([d.train_x, d.val_x]).numpy(),
                                                 torch.cat([d.train_y, d.val_y]).tolist(),
                                                 strict=True)}
    assert got == {(a.tobytes(), int(b)) for a, b in zip(images, labels, strict=True)}
    assert torch.bincount(d.val_y, minlength=100).tolist() == [1] * 100
    resized = load_data(f"cifar100:{tmp_path / 'c100'}", val_size=100, image_size=48)
    assert resized.test_x.shape == (100, 48, 48, 3)


def test_cifar100_without_a_copy_or_network_is_one_line(tmp_path, offline):
    with pytest.raises(DataError) as err:
        load_data(f"cifar100:{tmp_path / 'none'}", val_size=100)
    assert str(err.value) == (
        f"cannot load CIFAR-100 from {tmp_path / 'none'} or download it (OSError: no network "
        "in this test); use --data imagefolder:PATH for a local copy")


def test_human_bytes_hand_values():
    assert kdata.human_bytes(1023) == "1023 B"
    assert kdata.human_bytes(1536) == "1.5 KiB"
    assert kdata.human_bytes(184_320_000) == "175.8 MiB"  # 184320000 / 2**20 = 175.78
    assert kdata.human_bytes(3 * 2**40) == "3.0 TiB"


def _limit(monkeypatch, n) -> None:
    monkeypatch.setenv(kdata.MEMORY_LIMIT_ENV, str(n))


def test_imagefolder_too_large_is_refused_before_decoding(tmp_path, cache, monkeypatch,
                                                          count_calls):
    root = tmp_path / "data"
    _make_constant_folder(root)  # 18 images of 40x40x3: 18 * 4800 = 86400 bytes
    calls = count_calls(kdata, "decode_image")
    _limit(monkeypatch, 86_399)
    with pytest.raises(DataError) as err:
        load_data(f"imagefolder:{root}", val_size=3)
    message = str(err.value)
    assert "\n" not in message and calls["n"] == 0 and not cache.exists()
    assert "needs 84.4 KiB (86400 bytes)" in message
    assert "84.4 KiB (86399 bytes) are available (KDSEARCH_MEMORY_LIMIT_BYTES)" in message
    _limit(monkeypatch, 86_400)  # exactly enough
    assert load_data(f"imagefolder:{root}", val_size=3).train_x.shape == (9, 40, 40, 3)
    _limit(monkeypatch, 18 * 16 * 16 * 3)  # resized while decoded: only the 16x16 arrays
    assert load_data(f"imagefolder:{root}", val_size=3, image_size=16).test_x.shape[1] == 16
    _limit(monkeypatch, 18 * 16 * 16 * 3 - 1)
    with pytest.raises(DataError, match=r"\(13824 bytes\)"):
        load_data(f"imagefolder:{root}", val_size=3, image_size=16)


def test_cifar_and_synthetic_sizes_are_checked_up_front(tmp_path, monkeypatch, offline):
    # CIFAR-10/100: 60000 images of 32x32x3 = 184320000 bytes, refused before reading ROOT.
    _limit(monkeypatch, 184_319_999)
    for spec, title in (("cifar100", "CIFAR-100"), ("cifar10", "CIFAR-10")):
        with pytest.raises(DataError, match=rf"^{title} needs 175.8 MiB \(184320000 bytes\)"):
            load_data(f"{spec}:{tmp_path / 'none'}", val_size=10)
    # with image_size 64 the resized copies count too: + 60000 * 64 * 64 * 3 = 921600000
    _limit(monkeypatch, 921_599_999)
    with pytest.raises(DataError, match=r"\(921600000 bytes\)"):
        load_data(f"cifar100:{tmp_path / 'none'}", val_size=10, image_size=64)
    # synthetic:4: (40 + 20) images: 184320 bytes at 32 px, + 737280 resized to 64 px
    _limit(monkeypatch, 184_320)
    assert load_data("synthetic:4", val_size=10).fingerprint
    with pytest.raises(DataError, match=r"needs 900.0 KiB \(921600 bytes\)"):
        load_data("synthetic:4", val_size=10, image_size=64)
    _limit(monkeypatch, "lots")
    with pytest.raises(DataError, match="KDSEARCH_MEMORY_LIMIT_BYTES must be a number of bytes"):
        load_data("synthetic:4", val_size=10)


def test_available_memory_reads_meminfo(monkeypatch):
    monkeypatch.delenv(kdata.MEMORY_LIMIT_ENV, raising=False)
    found = kdata.available_memory()
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo here")
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines()
                if x.startswith("MemAvailable:"))
    assert found is not None and found[1] == "MemAvailable in /proc/meminfo"
    assert abs(found[0] - int(line.split()[1]) * 1024) < 2**30  # read a moment apart
