"""Data sets: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (the bundled real default)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("METAPOOL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MISSING_HINT = ("install Debian's package with `apt-get install -y dataset-fashion-mnist`, "
                "or point METAPOOL_FASHION_MNIST at a folder holding the four .gz files")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | str | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    images_name, labels_name = FASHION_MNIST_FILES[split]
    missing = [n for n in (images_name, labels_name) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found: {', '.join(str(root / n) for n in missing)} missing; {MISSING_HINT}")
    images = torch.from_numpy(read_idx(root / images_name).copy())
    labels = torch.from_numpy(read_idx(root / labels_name).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
