"""Real MNIST digits, held on the device as uint8 and batched there.

The digits come from ``ddpm_recipe.digits`` (the bundled 4,500 / 500, or a torchvision root).

A batch is a pure function of (data, key, step): each epoch is a ``jax.random.permutation``
keyed by its epoch number, so a resumed run sees exactly the batches an uninterrupted one
would, and no image crosses from host to device after start-up.
"""

import jax
import jax.numpy as jnp
import numpy as np

# The digits themselves are read by ddpm_recipe.digits, which the torch trainer shares.
from ddpm_recipe.digits import (  # noqa: F401
    BUNDLED,
    Digits,
    MnistError,
    download,
    fingerprint,
    load,
    load_bundled,
)

# ToTensor then Normalize((0.5,), (0.5,)) for each of the 256 pixel values, in torch's float32
# order of operations. A table lookup keeps it bit-exact: XLA may fuse the arithmetic differently.
_PIXEL_TO_MODEL = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def to_model_range(images_u8):
    """uint8 pixels -> [-1, 1] float32, bit for bit what the tutorial's transform gives."""
    return jnp.asarray(_PIXEL_TO_MODEL)[images_u8.astype(jnp.int32)]


def epoch_order(key, step, num_examples: int, batch_size: int, known=None):
    """(epoch, order) of the epoch that batch ``step`` falls in: epoch e's order is
    permutation(fold_in(key, e)).

    The permutation sorts the whole dataset (60,000 keys for full MNIST), too much to redo every
    step, so a program of several steps passes the pair of its previous step as ``known``: returned
    as it is while the step stays in that epoch, the sort runs once per epoch, not per step.
    """
    epoch = step // (num_examples // batch_size)

    def fresh():
        return epoch, jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)

    if known is None:
        return fresh()
    return jax.lax.cond(epoch == known[0], lambda: known, fresh)


def batch_in_order(order, step, num_examples: int, batch_size: int):
    """Indices of batch ``step`` from its epoch's (epoch, order); the last partial batch is dropped."""
    position = step % (num_examples // batch_size)
    return jax.lax.dynamic_slice_in_dim(order[1], position * batch_size, batch_size)


def batch_indices(key, step, num_examples: int, batch_size: int):
    """Indices of batch ``step``: epoch e is permutation(fold_in(key, e)); the last partial batch is dropped."""
    return batch_in_order(epoch_order(key, step, num_examples, batch_size), step, num_examples, batch_size)
