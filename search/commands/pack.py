"""``kdsearch pack SOURCE --out FILE``: an ImageFolder tree as one JPEG pack file.

The pack (``kdcore.jpegpack``) holds the tree's encoded bytes, labels and split, so it
travels where a folder of 60,000 files cannot (the device machine gets only the checkout);
``--data jpegpack:FILE`` reads it with the fingerprint of ``--data imagefolder:SOURCE``.
Every file is decoded once while packing, so a tree that would not load is never packed.
"""

from __future__ import annotations

import time
from pathlib import Path


def cmd_pack(args) -> int:
    """Write the pack of ``args.source`` to ``args.out``; prints images, size and time."""
    from kdcore.jpegpack import pack_imagefolder

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give the pack's file name")
    t0 = time.perf_counter()
    images, size = pack_imagefolder(Path(args.source).expanduser().resolve(), out)
    print(f"pack: {images} images, {size / 2**20:.1f} MiB in {out} "
          f"({time.perf_counter() - t0:.1f}s); use --data jpegpack:{out}", flush=True)
    return 0
