"""Write a tensorflow-datasets dataset as the arrays source's `.npz` files (sslvit/data/arrays.py).

    python -m sslvit.data.materialize cifar10 data/cifar10                  # train.npz, test.npz (150 + 30 MB)
    python -m sslvit.data.materialize cifar10 /tmp/c10 --splits "train[:2048]=train" "test[:512]=test"
    python -m sslvit.data.materialize <name> <dir> --image-size 64          # images of varying size: centre crops

Then `data=cifar10_arrays data.path=data/cifar10` (or `data.source=arrays data.path=...`) trains from memory
without TensorFlow, e.g. on a GPU host that has only the JAX stack. Needs TensorFlow and tensorflow-datasets here
(the tfds source reads the dataset: `--data-dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets).
Each file holds `image` uint8 (N, H, W, 3), `label` int64 (N,) and `class_names`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from sslvit.errors import ConfigError


def materialize(
    name: str,
    out_dir: str | Path,
    splits=("train", "test"),
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    batch_size: int = 1024,
) -> dict[str, Path]:
    """Write each split (`spec` or `spec=file name`) of tfds dataset `name` to `<out_dir>/<file name>.npz`."""
    from sslvit.data._tf import no_autograph, tf  # noqa: PLC0415
    from sslvit.data.arrays import SUFFIX, parse_split  # noqa: PLC0415
    from sslvit.data.sources import create_source  # noqa: PLC0415
    from sslvit.data.transforms import center_crop_resize, decode  # noqa: PLC0415

    source = create_source({"name": name, "source": "tfds", "data_dir": data_dir})
    fixed = source.fixed_shape
    if fixed is None and image_size is None:
        raise ConfigError(f"{name} has images of varying size: pass --image-size S to store centre crops of S x S")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for item in splits:
        spec, _, file_name = item.partition("=")
        file_name = file_name or parse_split(spec, "--splits")[0]
        ds, _ = source.examples(spec, 0, 1, False, None)

        def prepare(ex):
            image = ex["image"]
            if fixed is None:
                image = decode(image) if image.dtype == tf.string else image
            if image_size is not None:
                image = tf.cast(tf.round(tf.clip_by_value(center_crop_resize(image, image_size), 0, 255)), tf.uint8)
            return {"image": image, "label": ex["label"]}

        t0 = time.perf_counter()
        images, labels = [], []
        for batch in ds.map(no_autograph(prepare)).batch(batch_size).as_numpy_iterator():
            images.append(batch["image"])
            labels.append(batch["label"])
        x, y = np.concatenate(images), np.concatenate(labels).astype(np.int64)
        path = out_dir / f"{file_name}{SUFFIX}"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:  # written aside, then renamed: a reader never sees half a file
            np.savez(f, image=x, label=y, class_names=np.asarray(source.info.class_names))
        tmp.replace(path)
        print(
            f"{name} {spec}: {len(y)} images {x.shape[1:]} -> {path} ({path.stat().st_size / 2**20:.1f} MiB, "
            f"{time.perf_counter() - t0:.1f} s)"
        )
        written[file_name] = path
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a tfds dataset name, e.g. cifar10")
    ap.add_argument("out_dir")
    ap.add_argument(
        "--splits",
        nargs="+",
        default=["train", "test"],
        metavar="SPEC[=FILE]",
        help="tfds split specs, each optionally named: 'train[:2048]=train' (default: train test)",
    )
    ap.add_argument("--data-dir", default=None, help="the tfds data dir (default $TFDS_DATA_DIR)")
    ap.add_argument("--image-size", type=int, default=None, help="store centre crops of S x S")
    args = ap.parse_args(argv)
    try:
        materialize(args.name, args.out_dir, args.splits, data_dir=args.data_dir, image_size=args.image_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
