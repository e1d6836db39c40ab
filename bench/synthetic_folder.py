"""Synthetic image folders for the data benchmarks (written outside the repository, once; they take disk and minutes).

    python bench/synthetic_folder.py /tmp/sslvit_folder200k --classes 1000 --train 200 --test 10 --size 40 80
    python bench/synthetic_folder.py /tmp/sslvit_jpeg224 --classes 10 --train 200 --test 0 --size 375 500 --photo

Layout: `<root>/train/c0000/000000.jpg ...` and `<root>/test/...`, what `data=folder` reads. Images are JPEGs of
random size within `--size` (min max, pixels per side). Plain images are smooth colour ramps with a little noise:
small, cheap files for the start-up benchmark (listing and verification count files, not bytes). `--photo` images
are built to cost what a photograph costs to decode: a smooth random field at the image size plus texture noise,
quality 90, about 0.5 bytes per pixel (ImageNet's JPEGs average ~110 kB at ~400 x 350 px).

An existing folder with a `.complete` marker is left as it is; an interrupted one is finished (files already written
are kept). Generation runs on all cores (`--workers`).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np


def _image(rng: np.random.Generator, lo: int, hi: int, photo: bool) -> bytes:
    from PIL import Image

    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    if photo:
        # Low-frequency structure (a coarse random grid, bicubic upsampled) + mid-frequency texture + grain.
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        mid = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)).resize(
            (w, h), Image.BILINEAR
        )
        img = 0.5 * np.asarray(coarse, np.float32) + 0.5 * np.asarray(mid, np.float32)
        img += rng.normal(0, 10, (h, w, 3))
        quality = 90
    else:
        y, x = np.mgrid[0:h, 0:w]
        c = rng.integers(0, 256, (3,))
        img = (
            c[None, None]
            + (x[..., None] * rng.integers(-3, 4, 3) + y[..., None] * rng.integers(-3, 4, 3))
            + rng.normal(0, 4, (h, w, 3))
        )
        quality = 85
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_class(args) -> int:
    root, split, cls, count, lo, hi, photo, seed = args
    d = Path(root) / split / f"c{cls:04d}"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, cls, 0 if split == "train" else 1])
    written = 0
    for i in range(count):
        path = d / f"{i:06d}.jpg"
        data = _image(rng, lo, hi, photo)  # drawn even when the file exists: the same images whatever was resumed
        if not path.exists():
            path.write_bytes(data)
            written += 1
    return written


def make_folder(
    root: str | os.PathLike,
    *,
    classes: int,
    train: int,
    test: int,
    size: tuple[int, int],
    photo: bool = False,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    jobs = [
        (str(root), split, c, n, size[0], size[1], photo, seed)
        for split, n in (("train", train), ("test", test))
        if n
        for c in range(classes)
    ]
    t0 = time.perf_counter()
    with mp.Pool(workers or os.cpu_count()) as pool:
        written = sum(pool.imap_unordered(_write_class, jobs, chunksize=4))
    marker.write_text(f"classes={classes} train={train} test={test} size={size} photo={photo} seed={seed}\n")
    print(f"{root}: wrote {written} JPEGs in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train", type=int, default=200, help="images per class in train/")
    ap.add_argument("--test", type=int, default=10, help="images per class in test/ (0: no test split)")
    ap.add_argument("--size", type=int, nargs=2, default=(40, 80), metavar=("MIN", "MAX"))
    ap.add_argument("--photo", action="store_true", help="photo-like content (decode cost of real JPEGs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    make_folder(
        a.root,
        classes=a.classes,
        train=a.train,
        test=a.test,
        size=tuple(a.size),
        photo=a.photo,
        seed=a.seed,
        workers=a.workers,
    )


if __name__ == "__main__":
    main()
