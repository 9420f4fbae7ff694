"""Data for PMPL: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (the bundled real
default, held in memory and augmented with batched tensor ops) and any torchvision ImageFolder tree
(worker processes). Both split the training set into the train part D_tr and the meta part D_mt of
the paper's Eq. 3 and shard every epoch across DistributedDataParallel processes.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

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
REINSTALL_HINT = "reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or replace the file"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not; ValueError naming the file if it is
    truncated or corrupt."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e or type(e).__name__}); {REINSTALL_HINT}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file; {REINSTALL_HINT}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the IDX header is cut short; {REINSTALL_HINT}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes; {REINSTALL_HINT}")
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
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{root / images_name} holds images of shape {tuple(images.shape[1:])}, not 28x28")
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images in {images_name} but labels of shape "
                         f"{tuple(labels.shape)} in {labels_name}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{root / labels_name} holds labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


# ---------------------------------------------------------------------------------------------
# Splits. The meta set D_mt of Eq. 3 is carved out of the training set (paper §2.2), as DARTS does.
# ---------------------------------------------------------------------------------------------
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def subset_indices(n: int, subset: Optional[int], seed: int) -> torch.Tensor:
    """``subset`` indices of ``range(n)`` drawn without replacement (all of them when None)."""
    if subset is None or subset >= n:
        return torch.arange(n)
    if subset < 1:
        raise ValueError(f"subset must be a positive number of samples, got {subset}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:subset].sort().values


def split_indices(indices: torch.Tensor, meta_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, meta) split of ``indices``; ``meta_fraction`` of them go to meta."""
    if not 0.0 < meta_fraction < 1.0:
        raise ValueError(f"meta_fraction must lie strictly between 0 and 1, got {meta_fraction}")
    n = len(indices)
    n_meta = int(round(n * meta_fraction))
    if n_meta < 1 or n_meta >= n:
        raise ValueError(f"cannot split {n} samples into train and meta parts with meta_fraction={meta_fraction}")
    g = torch.Generator().manual_seed(seed + 1)  # independent of the subset draw
    perm = indices[torch.randperm(n, generator=g)]
    return perm[n_meta:].sort().values, perm[:n_meta].sort().values


def _epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    # Every epoch's shuffling and augmentation derive from (seed, epoch) alone, so a run resumed at
    # an epoch boundary draws exactly the batches the uninterrupted run would have drawn.
    return (seed * 1_000_003 + epoch * 7_919 + salt) % (2 ** 63)


def shard_order(indices: torch.Tensor, *, shuffle: bool, seed: int, epoch: int, rank: int,
                world_size: int) -> torch.Tensor:
    """This rank's share of ``indices`` for one epoch.

    Shuffled: the DistributedSampler recipe (one permutation shared by every rank, padded to a
    multiple of the world size, every world_size-th element). Unshuffled (evaluation): no padding,
    so each sample is counted exactly once across ranks.
    """
    if not shuffle:
        return indices[rank::world_size]
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = indices[torch.randperm(len(indices), generator=g)]
    total = -(-len(order) // world_size) * world_size
    if total > len(order):
        order = torch.cat([order, order[: total - len(order)]])
    return order[rank::world_size]


# ---------------------------------------------------------------------------------------------
# In-memory loader: Fashion-MNIST fits in 47 MB, so batches are sliced from one uint8 tensor and
# augmented with batched tensor ops, on the training device, with no worker processes.
# ---------------------------------------------------------------------------------------------
def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad) + RandomHorizontalFlip on (B, C, H, W), zero padding."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    return torch.where(flips[:, None, None, None], out.flip(3), out).contiguous()


class TensorLoader:
    """Batches of (normalised float images, labels) from uint8 tensors held in memory.

    ``set_epoch(e)`` fixes the epoch's order and augmentation (see :func:`shard_order`);
    ``batch_size`` is this process's batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch_size: int, *,
                 train: bool, mean: Sequence[float], std: Sequence[float], pad: int = 4, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W) or (N, H, W), got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.batch_size = batch_size
        self.train = train
        self.pad = pad
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255.0
        self.drop_last = train and self._shard_len() >= batch_size

    def _shard_len(self) -> int:
        n = len(self.indices)
        return -(-n // self.world_size) if self.train else len(range(self.rank, n, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def __len__(self) -> int:
        n = self._shard_len()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = shard_order(self.indices, shuffle=self.train, seed=self.seed, epoch=self.epoch,
                            rank=self.rank, world_size=self.world_size).to(self.device)
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch, salt=1 + self.rank))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float()
            if self.train and self.pad > 0:
                x = random_crop_flip(x, self.pad, gen)
            yield (x - self.mean) / self.std, self.labels[idx]


# ---------------------------------------------------------------------------------------------
# ImageFolder: the general path (ImageNet, CIFAR exported to folders), with worker processes.
# ---------------------------------------------------------------------------------------------
class FolderLoader:
    """A DataLoader over a subset of an ImageFolder, reseeded per epoch like :class:`TensorLoader`."""

    def __init__(self, dataset, indices: torch.Tensor, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 4, device: torch.device | str = "cpu"):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        self.device = torch.device(device)
        self.seed, self.epoch, self.train = seed, 0, train
        subset = Subset(dataset, indices.tolist())
        if train:
            # DistributedSampler also serves a single process (num_replicas=1): one shuffling recipe.
            self.sampler = DistributedSampler(subset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        else:
            self.sampler = list(range(rank, len(subset), world_size))
        n = len(self.sampler)
        self.generator = torch.Generator()
        # persistent_workers stays off: fresh workers each epoch take their seeds from the reseeded
        # generator, which keeps augmentation reproducible across a resume.
        self.loader = DataLoader(subset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", drop_last=train and n >= batch_size,
                                 generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.train:
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(_epoch_seed(self.seed, epoch, salt=2))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "generator": self.generator.get_state()}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        non_blocking = self.device.type == "cuda"
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


def folder_transforms(image_size: int, train: bool, mean, std):
    """MobileNetV2's ImageNet recipe for large images; pad-and-crop (as for CIFAR) for small ones."""
    from torchvision import transforms as T

    if image_size <= 64:
        aug = [T.Resize(image_size), T.CenterCrop(image_size)]
        if train:
            aug += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    elif train:
        aug = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        aug = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])


class UnreadableImage(ValueError):
    """An image file PIL cannot read.

    It is raised in a loader worker, and DataLoader raises it again in the main process with the
    worker's traceback as its message; only the last line, the message itself, is kept.
    """

    def __init__(self, message: str):
        last = message.rstrip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def load_image(path: str):
    """ImageFolder's loader, with an unreadable file named in a one-line error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken files
        raise UnreadableImage(f"{path} is not a readable image ({e})") from e


def _find_split_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} has no {' or '.join(repr(n) for n in names)} folder; an ImageFolder data set "
                            f"needs {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/)")


# ---------------------------------------------------------------------------------------------
# What the trainer asks for.
# ---------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    """Loaders and what a model needs to know about the data."""
    train: object
    meta: Optional[object]
    test: object
    num_classes: int
    in_chans: int
    image_size: int
    name: str
    classes: Tuple[str, ...] = ()

    def describe(self) -> str:
        train = f"train {len(self.train)} batches, " if self.train is not None else ""
        meta = f"meta {len(self.meta)} batches, " if self.meta is not None else ""
        return (f"{self.name}: {self.num_classes} classes, {self.in_chans}x{self.image_size}x{self.image_size}; "
                f"{train}{meta}test {len(self.test)} batches (per process)")


def build_data(*, data_dir: Optional[str] = None, batch_size: int = 128, meta_fraction: Optional[float] = 0.5,
               subset: Optional[int] = None, test_subset: Optional[int] = None, workers: int = 4,
               image_size: Optional[int] = None, augment: bool = True, seed: int = 0, rank: int = 0,
               world_size: int = 1, device: torch.device | str = "cpu", fashion_root: Optional[str] = None,
               train: bool = True) -> DataBundle:
    """Train (and, for the search, meta) loaders plus the test loader.

    ``data_dir=None`` is Fashion-MNIST; otherwise an ImageFolder tree with ``train/`` and ``val/``
    (or ``test/``). ``meta_fraction=None`` keeps the whole training set for training (retraining);
    otherwise it is split into D_tr and D_mt (Eq. 3). ``subset`` draws that many training samples
    first, ``test_subset`` that many test samples. ``batch_size`` is the global batch: each of
    ``world_size`` processes loads ``batch_size / world_size`` samples per step. ``train=False``
    builds only the test loader (evaluation).
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
    per_rank = batch_size // world_size
    common = dict(rank=rank, world_size=world_size, device=device)

    if data_dir is None:
        if image_size not in (None, 28):
            raise ValueError("Fashion-MNIST images are 28x28; drop --image-size or use --data-dir")
        test_set = load_fashion_mnist("test", fashion_root)
        train_set = load_fashion_mnist("train", fashion_root) if train else None
        num_classes, in_chans, size, name, classes = 10, 1, 28, "Fashion-MNIST", FASHION_MNIST_CLASSES
        count = lambda ds: len(ds[1])  # noqa: E731

        def make(ds, idx, is_train, salt):
            return TensorLoader(ds[0], ds[1], idx, per_rank, train=is_train, mean=FASHION_MNIST_MEAN,
                                std=FASHION_MNIST_STD, pad=4 if augment else 0, seed=seed + salt, **common)
    else:
        from torchvision.datasets import ImageFolder

        root = Path(data_dir)
        if not root.exists():
            raise FileNotFoundError(f"--data-dir {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"--data-dir {root} is a file, not an ImageFolder tree")
        size = image_size or 224
        test_set = ImageFolder(_find_split_dir(root, ("val", "test")), loader=load_image,
                               transform=folder_transforms(size, False, IMAGENET_MEAN, IMAGENET_STD))
        train_set = None
        if train:
            train_set = ImageFolder(_find_split_dir(root, ("train",)), loader=load_image,
                                    transform=folder_transforms(size, augment, IMAGENET_MEAN, IMAGENET_STD))
            if train_set.classes != test_set.classes:
                raise ValueError(f"{root}: the train and test folders hold different classes")
        num_classes, in_chans, name, classes = len(test_set.classes), 3, f"ImageFolder {root}", tuple(test_set.classes)
        count = len

        def make(ds, idx, is_train, salt):
            return FolderLoader(ds, idx, per_rank, train=is_train, workers=workers, seed=seed + salt, **common)

    test_loader = make(test_set, subset_indices(count(test_set), test_subset, seed), False, 0)
    if not train:
        return DataBundle(None, None, test_loader, num_classes, in_chans, size, name, classes)
    pool = subset_indices(count(train_set), subset, seed)
    if meta_fraction is None:
        train_loader, meta_loader = make(train_set, pool, True, 0), None
    else:
        train_idx, meta_idx = split_indices(pool, meta_fraction, seed)
        train_loader, meta_loader = make(train_set, train_idx, True, 0), make(train_set, meta_idx, True, 101)
    if len(train_loader) == 0:
        raise ValueError("the training split is empty; use a larger --subset")
    return DataBundle(train_loader, meta_loader, test_loader, num_classes, in_chans, size, name, classes)
