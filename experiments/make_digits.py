#!/usr/bin/env python3
"""scikit-learn's bundled handwritten digits as arrays-source files: a labelled image set no CIFAR-10 encoder has
seen, for the transfer probe of experiments/cifar10_evidence.py.

    python experiments/make_digits.py <out_dir>     # -> train.npz (1,000 images), test.npz (797)

The set (UCI optdigits' test part, shipped inside scikit-learn, no download): 1,797 greyscale 8x8 images of the
digits 0-9, 17 grey levels (0-16, ink high). Stored as uint8 (N, 8, 8, 1) scaled to 0-255 (the arrays source reads
greyscale as RGB, and the probe resizes to the encoder's 32 px); split by a fixed permutation (seed 0). Only this
script needs scikit-learn; sslvit does not.
"""

import sys
from pathlib import Path

import numpy as np


def main(out: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = np.asarray([str(d) for d in range(10)])
    for name, rows in (("train", order[:1000]), ("test", order[1000:])):
        np.savez(out_dir / f"{name}.npz", image=images[rows], label=labels[rows], class_names=names)
        print(f"digits {name}: {len(rows)} images -> {out_dir / name}.npz")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits")
