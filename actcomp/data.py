"""Datasets for the training study: real Fashion-MNIST offline, CIFAR-10/100, ImageNet, and synthetic smoke data.

    from actcomp.data import build_data
    d = build_data("fashion_mnist", image_size=32, channels=3, subset_train=20000, seed=0)
    d.train[0]   # (float tensor 3x32x32, int label)

Every builder returns a :class:`DataBundle` (train/val datasets, classes, channels, size). Nothing is
downloaded unless ``download=True``; missing data raises :class:`DataError` with one line saying how to get it.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .config import ActcompError


class DataError(ActcompError):
    """Missing or unusable data (one line, fit for a CLI)."""


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    info: dict = field(default_factory=dict)  # where the data came from, subset sizes, transforms


# ------------------------------------------------------------------------------------------ Fashion-MNIST

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian package dataset-fashion-mnist
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # training-set pixel statistics (in [0, 1])
_FMNIST_HINT = ("run `make data` (or `apt-get install dataset-fashion-mnist`), or pass data.root=<dir with "
                "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz>, or data.download=true on a machine with internet")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (0, 0, dtype 0x08=uint8, ndim), big-endian dims, raw bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a partial download or a damaged copy
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}); {_FMNIST_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an uint8 IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} values for shape {dims}")
    return data.reshape(dims)


def _find_fmnist(root: str | os.PathLike | None, download: bool) -> Path:
    cands = [Path(root).expanduser()] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    if root:  # torchvision's layout under a user root
        cands.append(Path(root).expanduser() / "FashionMNIST" / "raw")
    for d in cands:
        if all((d / f).is_file() for pair in _FMNIST_FILES.values() for f in pair):
            return d
    if download:
        from torchvision.datasets import FashionMNIST

        dl_root = Path(root or "data").expanduser()
        try:
            FashionMNIST(str(dl_root), train=True, download=True)
            FashionMNIST(str(dl_root), train=False, download=True)
        except Exception as e:  # network errors come in many types; report one line
            raise DataError(f"Fashion-MNIST download to {dl_root} failed ({type(e).__name__}); {_FMNIST_HINT}") from None
        return dl_root / "FashionMNIST" / "raw"
    where = ", ".join(str(c) for c in cands)
    raise DataError(f"Fashion-MNIST not found in {where}; {_FMNIST_HINT}")


class TensorImages(Dataset):
    """uint8 images (N, 1|C, H, W) kept in memory; items are normalized float tensors, channels repeated.

    Storing uint8 at the target size keeps 60k images at 32 px in ~60 MB; the float conversion per item is
    cheap next to a training step. ``hflip`` draws from the global torch RNG, which checkpoints save, so a
    resumed run sees the same flips (with ``num_workers=0``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int, mean: float, std: float,
                 hflip: bool = False):
        self.images, self.labels = images, labels
        self.channels, self.mean, self.std, self.hflip = channels, mean, std, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].float() / 255.0 - self.mean) / self.std
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x, int(self.labels[i])


def _fit_size(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, 1, 28, 28) uint8 -> (N, 1, size, size) uint8 by zero-padding (centred) or bilinear resizing."""
    h = images.shape[-1]
    if size == h:
        return images
    if mode == "pad":
        if size < h:
            raise DataError(f"data.resize=pad cannot shrink {h} px images to {size} px; use data.resize=resize")
        lo = (size - h) // 2
        return F.pad(images, (lo, size - h - lo, lo, size - h - lo))
    if mode == "resize":
        out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)
               for c in images.split(4096)]  # chunks: the float copy of 60k images at once would be large
        return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"data.resize must be 'pad' or 'resize', got {mode!r}")


def fashion_mnist(root=None, image_size: int = 28, channels: int = 1, resize: str = "pad", hflip: bool = False,
                  download: bool = False, **subset) -> DataBundle:
    """Fashion-MNIST (60k train / 10k test, 10 classes), read with gzip+numpy from the Debian package files.

    image_size: 28 (native), or larger by zero-padding (``resize="pad"``, 28->32 adds a 2 px border) or bilinear
    resizing (``resize="resize"``). channels: 1, or 3 (the grey channel repeated, for ImageNet-shaped stems).
    """
    _check_pos(image_size, "data.image_size")
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {channels!r}")
    d = _find_fmnist(root, download)
    splits = {}
    for split, (img_f, lab_f) in _FMNIST_FILES.items():
        imgs = torch.from_numpy(_read_idx(d / img_f).copy()).unsqueeze(1)
        labs = torch.from_numpy(_read_idx(d / lab_f).astype(np.int64))
        if len(imgs) != len(labs):
            raise DataError(f"{d}: {len(imgs)} images but {len(labs)} labels in the {split} split")
        imgs = _fit_size(imgs, image_size, resize)
        splits[split] = TensorImages(imgs, labs, channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                     hflip=hflip and split == "train")
    info = dict(source=str(d), resize=resize if image_size != 28 else "none", hflip=hflip)
    return _finish("fashion_mnist", splits["train"], splits["val"], 10, channels, image_size, info, **subset)


# ------------------------------------------------------------------------------------------ CIFAR

_CIFAR_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def _cifar(n: int, root=None, image_size: int = 32, augment: bool = True, download: bool = False, **subset):
    from torchvision import datasets
    from torchvision import transforms as T

    _check_pos(image_size, "data.image_size")
    root = Path(root or "data").expanduser()
    mean, std = _CIFAR_STATS[n]
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train_tf = T.Compose(resize + ([T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
                                   if augment else []) + [T.ToTensor(), T.Normalize(mean, std)])
    val_tf = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
    cls = datasets.CIFAR10 if n == 10 else datasets.CIFAR100
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=val_tf, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"CIFAR-{n} not found under {root} ({str(e).splitlines()[0][:80]}); pass data.root=<dir> "
                        f"holding cifar-{n}-batches-py / cifar-100-python, or data.download=true with internet") from None
    except OSError as e:  # no network while downloading
        raise DataError(f"CIFAR-{n} download to {root} failed ({type(e).__name__}); pass data.root=<dir with the "
                        f"extracted dataset>") from None
    info = dict(source=str(root), augment=augment)
    return _finish(f"cifar{n}", train, val, n, 3, image_size, info, **subset)


def cifar10(root=None, **kw) -> DataBundle:
    """CIFAR-10 through torchvision (``download=False`` unless asked): crop+flip training augmentation."""
    return _cifar(10, root, **kw)


def cifar100(root=None, **kw) -> DataBundle:
    """CIFAR-100 through torchvision (``download=False`` unless asked): crop+flip training augmentation."""
    return _cifar(100, root, **kw)


# ------------------------------------------------------------------------------------------ ImageNet

def imagenet_transforms(image_size: int = 224, test_resize: int = 248, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                        re_prob: float = 0.25, re_mode: str = "pixel", interpolation: str = "bicubic"):
    """The authors' recipe (arXiv 2409.11902) through timm's ``create_transform``.

    Train: RandomResizedCrop(image_size, bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``,
    RandomErasing(p=0.25; ``re_mode="pixel"`` as timm's train.py defaults). Test: resize ``test_resize`` bicubic,
    centre crop ``image_size`` (``crop_pct = image_size / test_resize``).
    """
    from timm.data import create_transform

    train = create_transform(image_size, is_training=True, auto_augment=auto_augment, interpolation=interpolation,
                             re_prob=re_prob, re_mode=re_mode)
    val = create_transform(image_size, is_training=False, interpolation=interpolation,
                           crop_pct=image_size / test_resize)
    return train, val


def imagenet(root=None, image_size: int = 224, test_resize: int = 248, train_dir: str = "train", val_dir: str = "val",
             auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25, re_mode: str = "pixel",
             **subset) -> DataBundle:
    """ImageNet (or any ImageFolder tree) at ``root/{train,val}/<class>/<image>`` with the paper's transforms."""
    from torchvision.datasets import ImageFolder

    if not root:
        raise DataError("imagenet needs data.root=<dir holding train/ and val/ ImageFolder trees>")
    root = Path(root).expanduser()
    dirs = {s: root / d for s, d in (("train", train_dir), ("val", val_dir))}
    for s, d in dirs.items():
        if not d.is_dir():
            raise DataError(f"ImageNet {s} folder {d} not found; data.root must hold {train_dir}/ and {val_dir}/ "
                            f"with one sub-folder per class")
    train_tf, val_tf = imagenet_transforms(image_size, test_resize, auto_augment, re_prob, re_mode)
    try:
        train = ImageFolder(str(dirs["train"]), transform=train_tf)
        val = ImageFolder(str(dirs["val"]), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"ImageNet at {root}: {str(e).splitlines()[0][:160]}") from None
    if train.classes != val.classes:
        raise DataError(f"ImageNet at {root}: train has {len(train.classes)} classes, val {len(val.classes)}; "
                        f"they must match")
    info = dict(source=str(root), train_transform=repr(train_tf).replace("\n", " "),
                val_transform=repr(val_tf).replace("\n", " "))
    return _finish("imagenet", train, val, len(train.classes), 3, image_size, info, **subset)


# ------------------------------------------------------------------------------------------ synthetic

class _Synthetic(Dataset):
    """Learnable random data: each class has its own mean image plus noise. Smoke tests only."""

    def __init__(self, n: int, num_classes: int, channels: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        centres = torch.randn(num_classes, channels, size, size, generator=torch.Generator().manual_seed(1234))
        self.x = centres[self.labels] + torch.randn(n, channels, size, size, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i])


def synthetic(n_train: int = 256, n_val: int = 128, num_classes: int = 10, channels: int = 3, image_size: int = 32,
              seed: int = 0, **subset) -> DataBundle:
    """Random tensors for smoke tests; never report an accuracy on these."""
    _check_pos(image_size, "data.image_size")
    _check_pos(n_train, "data.n_train")
    _check_pos(n_val, "data.n_val")
    train = _Synthetic(n_train, num_classes, channels, image_size, seed)
    val = _Synthetic(n_val, num_classes, channels, image_size, seed + 1)
    return _finish("synthetic", train, val, num_classes, channels, image_size, dict(source="synthetic"), **subset)


# ------------------------------------------------------------------------------------------ common

def _check_pos(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DataError(f"{what} must be a positive int, got {v!r}")


def subset_indices(n: int, k: int | None, seed: int) -> list[int] | None:
    """``k`` of ``n`` indices drawn without replacement by a generator seeded with ``seed`` (sorted), or None."""
    if k is None or k >= n:
        return None
    _check_pos(k, "subset size")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _finish(name, train, val, num_classes, in_chans, image_size, info, subset_train=None, subset_val=None,
            subset_seed: int = 0) -> DataBundle:
    full = (len(train), len(val))
    # Different seeds per split so the two subsets are drawn independently but reproducibly.
    it = subset_indices(len(train), subset_train, subset_seed)
    iv = subset_indices(len(val), subset_val, subset_seed + 1)
    if it is not None:
        train = Subset(train, it)
    if iv is not None:
        val = Subset(val, iv)
    info = dict(info, n_train=len(train), n_val=len(val), n_train_full=full[0], n_val_full=full[1],
                subset_seed=subset_seed)
    return DataBundle(name, train, val, num_classes, in_chans, image_size, info)


BUILDERS = {"fashion_mnist": fashion_mnist, "cifar10": cifar10, "cifar100": cifar100, "imagenet": imagenet,
            "synthetic": synthetic}


def build_data(name: str, **kwargs) -> DataBundle:
    """Build a dataset by name (keys of :data:`BUILDERS`); unknown options raise :class:`DataError`."""
    import inspect

    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    fn = BUILDERS[name]
    allowed = set(inspect.signature(fn).parameters) | {"subset_train", "subset_val", "subset_seed"}
    allowed |= set(inspect.signature(_cifar).parameters) - {"n"} if name.startswith("cifar") else set()
    unknown = sorted(set(kwargs) - allowed - {"kw", "subset"})
    if unknown:
        raise DataError(f"unknown option(s) for data {name!r}: {', '.join(unknown)}")
    return fn(**kwargs)


__all__ = ["BUILDERS", "DataBundle", "DataError", "build_data", "cifar10", "cifar100", "fashion_mnist", "imagenet",
           "imagenet_transforms", "subset_indices", "synthetic"]
