"""Datasets: Fashion-MNIST from the real Debian files, clear errors for missing data, ImageNet transforms."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from actcomp.data import (
    FASHION_MNIST_DIRS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataError,
    build_data,
    imagenet_transforms,
    subset_indices,
)

FMNIST = Path(FASHION_MNIST_DIRS[0])
have_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="Fashion-MNIST not installed (make data)")


@pytest.fixture(scope="module")
def fmnist32():
    return build_data("fashion_mnist", image_size=32, channels=3, resize="pad")


@have_fmnist
def test_fashion_mnist_real_files(fmnist32):
    d = fmnist32
    assert (len(d.train), len(d.val), d.num_classes, d.in_chans, d.image_size) == (60000, 10000, 10, 3, 32)
    # The real test set is balanced: 1000 of each class; the training set 6000 of each.
    assert torch.bincount(d.val.labels).tolist() == [1000] * 10
    assert torch.bincount(d.train.labels).tolist() == [6000] * 10
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[2])  # grey repeated
    # 2 px zero padding around the 28x28 image: border is the normalized value of a black pixel
    black = (0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(x[:, :2], torch.full_like(x[:, :2], black))
    # Pixel statistics of the training set match the normalization constants (computed on 28x28 pixels).
    raw = d.train.images[:, :, 2:30, 2:30].float() / 255
    assert abs(raw.mean().item() - FASHION_MNIST_MEAN) < 1e-3 and abs(raw.std().item() - FASHION_MNIST_STD) < 1e-3


@have_fmnist
def test_fashion_mnist_native_and_resize():
    d = build_data("fashion_mnist", image_size=28, channels=1, subset_train=100, subset_val=50, subset_seed=3)
    assert d.train[0][0].shape == (1, 28, 28) and (len(d.train), len(d.val)) == (100, 50)
    with pytest.raises(DataError, match="cannot shrink"):
        build_data("fashion_mnist", image_size=20, resize="pad")


def test_subset_is_seeded():
    a, b, c = subset_indices(1000, 10, 0), subset_indices(1000, 10, 0), subset_indices(1000, 10, 1)
    assert a == b and a != c and len(set(a)) == 10
    assert subset_indices(10, None, 0) is None and subset_indices(10, 20, 0) is None


def test_missing_fashion_mnist_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as e:
        build_data("fashion_mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "make data" in msg and "apt-get install dataset-fashion-mnist" in msg


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def test_idx_reader_on_a_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    d = build_data("fashion_mnist", root=str(tmp_path), image_size=28, channels=1)
    assert (len(d.train), len(d.val)) == (20, 10) and d.val[3][1] == 3
    r = build_data("fashion_mnist", root=str(tmp_path), image_size=40, resize="resize", channels=3)
    assert r.train[0][0].shape == (3, 40, 40)
    with pytest.raises(DataError, match="resize must be"):
        build_data("fashion_mnist", root=str(tmp_path), image_size=40, resize="stretch")
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # truncated: 10 labels announced, 4 given
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(4))
    with pytest.raises(DataError, match="truncated"):
        build_data("fashion_mnist", root=str(tmp_path))


def test_missing_cifar_and_imagenet(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(DataError, match="not found") as e:
            build_data(name, root=str(tmp_path))
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="data.root"):
        build_data("imagenet")
    with pytest.raises(DataError, match="not found"):
        build_data("imagenet", root=str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset"):
        build_data("mnist3d")
    with pytest.raises(DataError, match="unknown option"):
        build_data("synthetic", colour=True)


def test_imagenet_folder_with_the_papers_transforms(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((300, 260, 3), 128, np.uint8)).save(tmp_path / split / cls / "0.png")
    d = build_data("imagenet", root=str(tmp_path))
    assert d.num_classes == 2 and len(d.train) == 2
    assert d.train[0][0].shape == (3, 224, 224) and d.val[1][0].shape == (3, 224, 224)
    tr, va = (repr(t) for t in imagenet_transforms())
    assert "RandomResizedCrop" in tr and "size=(224, 224)" in tr and "bicubic" in tr
    assert "RandAugment(n=2" in tr and "m=9, mstd=0.5" in tr and "RandomHorizontalFlip(p=0.5)" in tr
    assert "RandomErasing(p=0.25" in tr
    assert "Resize(size=248, interpolation=bicubic" in va and "CenterCrop(size=(224, 224))" in va


def test_synthetic():
    d = build_data("synthetic", n_train=12, n_val=6, image_size=8, channels=1, num_classes=3)
    assert d.train[0][0].shape == (1, 8, 8) and len(d.val) == 6 and d.num_classes == 3
    again = build_data("synthetic", n_train=12, n_val=6, image_size=8, channels=1, num_classes=3)
    assert torch.equal(d.train[5][0], again.train[5][0])


def test_truncated_gzip_is_one_clear_line(tmp_path):
    """A partial download: gzip raises EOFError deep in the reader; the user gets one line naming the file."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated or corrupt") as e:
        build_data("fashion_mnist", root=str(tmp_path))
    assert "\n" not in str(e.value)
