"""Builds cldro_jax/assets/fashion_mnist_subset.npz from the Debian Fashion-MNIST files.

A class-balanced random subset (default 500 train + 100 test images per class) that ships inside
the package, so that the quick start runs on a fresh machine with no download. Deterministic: the
same source files and seed give the same bytes of arrays. The npz records what it was made from:
``train_index``/``test_index`` (rows of the full train/test splits), ``seed``, and
``provenance`` (JSON: source file names and sha256s, per-class counts, this script).

    sudo apt-get install dataset-fashion-mnist
    python scripts/make_fashion_mnist_subset.py [--source_dir=/usr/share/datasets/fashion-mnist]

Examples are stored in a random order (not grouped by class), so that taking the first n of each
class (``config.data.train_per_class``) gives a random n.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

# Run as a file from a source checkout (`python scripts/...`), the package may not be installed:
# fall back to the checkout it belongs to.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from cldro_jax.data import images
except ModuleNotFoundError:
    sys.path.insert(0, _REPO_ROOT)
    from cldro_jax.data import images

DEFAULT_OUTPUT = os.path.join(_REPO_ROOT, "cldro_jax", "assets", images.FASHION_MNIST_SUBSET_ASSET)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def balanced_shuffled_index(labels: np.ndarray, per_class: int, rng: np.random.Generator):
    """``per_class`` random rows of each class, then all of them in one random order."""
    chosen = []
    for cls in range(10):
        rows = np.nonzero(labels == cls)[0]
        if rows.size < per_class:
            raise ValueError(f"class {cls} has only {rows.size} examples, need {per_class}")
        chosen.append(rng.choice(rows, size=per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source_dir", default=images.DEFAULT_FASHION_MNIST_DIR)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)

    full = images.load_fashion_mnist_arrays(args.source_dir)
    rng = np.random.default_rng(args.seed)
    train_index = balanced_shuffled_index(full["y_train"], args.train_per_class, rng)
    test_index = balanced_shuffled_index(full["y_test"], args.test_per_class, rng)

    files = {
        stem: images._fashion_mnist_file(args.source_dir, stem)  # noqa: SLF001 (same project)
        for stem in images.FASHION_MNIST_FILES.values()
    }
    provenance = {
        "dataset": "Fashion-MNIST (Zalando Research, MIT licence; see FASHION_MNIST_LICENSE.txt)",
        "source_files": {os.path.basename(p): sha256_of(p) for p in files.values()},
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "made_by": "scripts/make_fashion_mnist_subset.py",
        "train_index_into": "train-images-idx3-ubyte rows",
        "test_index_into": "t10k-images-idx3-ubyte rows",
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    np.savez_compressed(
        args.output,
        x_train=full["x_train"][train_index],
        y_train=full["y_train"][train_index].astype(np.uint8),
        x_test=full["x_test"][test_index],
        y_test=full["y_test"][test_index].astype(np.uint8),
        train_index=train_index.astype(np.int32),
        test_index=test_index.astype(np.int32),
        seed=np.int64(args.seed),
        provenance=np.str_(json.dumps(provenance, sort_keys=True)),
    )
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size_mb:.2f} MiB): {train_index.size} train, "
          f"{test_index.size} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
