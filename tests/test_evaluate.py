"""The sample-quality metric itself: accuracy of its classifier and sanity of its Frechet distance."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import data, evaluate


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("classifier"))
    params, acc, held_out = evaluate.load_or_train_classifier(data.BUNDLED, cache)
    return params, acc, held_out, cache


def _scaled(images_u8):
    return np.asarray(data.to_model_range(jnp.asarray(images_u8)))


def test_classifier_reaches_95_percent_on_the_bundled_split_and_is_cached(classifier):
    params, acc, _, cache = classifier
    assert acc >= 0.95
    again, acc_again, _ = evaluate.load_or_train_classifier(data.BUNDLED, cache)
    assert acc_again == acc and len(os.listdir(cache)) == 2


def test_frechet_distance_of_gaussians_has_its_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2 + 1  # mean 1, variance 4 per axis: 3*1 + 3*(1 + 4 - 2*2)
    assert evaluate.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_fd_sanity(classifier):
    params, _, held_out, _ = classifier
    train = data.load(data.BUNDLED, "train")
    reference = _scaled(held_out.images)
    _, ref_feats = evaluate.classify(params, reference)

    def fd(images):
        return evaluate.frechet_distance(evaluate.classify(params, images)[1], ref_feats)

    real = fd(_scaled(train.images[:1000]))
    noise = fd(np.clip(np.random.default_rng(0).standard_normal((1000, 28, 28, 1)), -1, 1))
    assert real * 20 < noise  # real digits sit far closer than noise

    digits = _scaled(train.images[:1000])
    rng = np.random.default_rng(1)
    noised = [fd(np.clip(digits + s * rng.standard_normal(digits.shape), -1, 1)) for s in (0.0, 0.3, 0.6, 1.0)]
    assert noised == sorted(noised) and noised[0] == pytest.approx(real)
    blurred = [fd(_blur(digits, k)) for k in (0, 1, 2, 3)]
    assert blurred == sorted(blurred)

    assert fd(digits) == fd(digits)  # the same samples give the same numbers
    report = evaluate.sample_report(params, digits, reference)
    assert report == evaluate.sample_report(params, digits, reference)
    assert report["frac_confident"] > 0.9 and report["class_entropy"] > 0.95 * np.log(10)
    json.dumps(report)


def _blur(images, radius):
    """A box blur of the given radius (0: unchanged)."""
    if radius == 0:
        return images
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    size = 2 * radius + 1
    out = np.zeros_like(images)
    for dy in range(size):
        for dx in range(size):
            out += padded[:, dy: dy + 28, dx: dx + 28]
    return out / size**2
