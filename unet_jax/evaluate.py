"""What a model draws, measured: ``python -m unet_jax.evaluate --workdir W``.

Inception-FID needs weights we cannot download and is wrong for 28x28 digits anyway, so
this is the MNIST practice instead: a small LeNet-like classifier, trained here in JAX on
the same training digits (once, cached by the data's fingerprint), gives
- the Frechet distance between its penultimate features of the samples and of held-out
  real digits (``fd``; "FID-LeNet"),
- its own view of the samples: mean top-class confidence, the share above 0.9, and the
  class histogram with its entropy (mode coverage; log(10) = 2.303 is uniform).
Writes ``W/eval.json`` and ``W/eval_samples.png`` (the grid, labelled with predictions);
``--raw`` evaluates the raw weights instead of the EMA, into ``W/eval_raw.*``.
"""

import argparse
import hashlib
import inspect
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from ddpm_recipe.errors import first_line
from ddpm_recipe.run_folder import check_writable, to_uint8, write_atomically, write_json
from ddpm_recipe.schedule import DEFAULT_ETA, DEFAULT_SAMPLE_STEPS, DEFAULT_SAMPLER, N_T
from ddpm_recipe.settings import SAMPLERS, ddim_eta, positive, seed
from ddpm_recipe.weights import flag_error
from unet_jax import autotune, checkpoints, data, devices
from unet_jax.layers import conv_same_tapgrad, max_pool
from unet_jax.sample import generate_on_local_devices

CONFIDENT = 0.9


def _conv_same_tapgrad(x, kernel, window_strides, padding, **_):
    """nn.Conv's convolution (stride 1, "SAME") with its weight gradient as tap matmuls: XLA:CPU's
    own weight-gradient convolution takes most of a training step on some CPUs (unet_jax.layers)."""
    if tuple(window_strides) != (1, 1) or padding != "SAME":
        raise ValueError(f"expected stride 1 and SAME padding, got {window_strides} and {padding}")
    return conv_same_tapgrad(x, kernel)


class LeNet(nn.Module):
    """Conv5x5(32) -> pool -> Conv5x5(64) -> pool -> Dense(128) = features -> Dense(10).

    On a CPU the convolutions' weight gradients are tap matmuls (the same numbers up to float32
    rounding); elsewhere XLA's own convolution, as the UNet's default there.
    """

    @nn.compact
    def __call__(self, x_Bx28x28x1, *, features: bool = False):
        conv = _conv_same_tapgrad if jax.default_backend() == "cpu" else None
        x = max_pool(nn.relu(nn.Conv(32, (5, 5), padding="SAME", conv_general_dilated=conv)(x_Bx28x28x1)), 2)
        x = max_pool(nn.relu(nn.Conv(64, (5, 5), padding="SAME", conv_general_dilated=conv)(x)), 2)
        feats = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return feats if features else nn.Dense(10)(feats)


_OPTIMIZER = optax.adam(1e-3)


@jax.jit
def _classifier_step(params, opt_state, images_u8, labels, key):
    x = data.to_model_range(images_u8)
    # a little translation jitter: the samples are not centred as carefully as MNIST
    shift = jax.random.randint(key, (2,), -2, 3)
    x = jnp.roll(x, shift, axis=(1, 2))

    def loss_fn(p):
        logits = LeNet().apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def classifier_keys(seed: int):
    """(init, data order, per-step jitter) keys: one key per use, none of them another's fold_in."""
    return tuple(jax.random.split(jax.random.key(seed), 3))


def train_classifier(train: data.Digits, *, epochs: int, batch_size: int = 128, seed: int = 0):
    """Params of a LeNet trained on ``train`` with Adam, a fixed data order per seed."""
    init_key, order_key, jitter_key = classifier_keys(seed)
    params = LeNet().init(init_key, jnp.zeros((1, 28, 28, 1)))["params"]
    opt_state = _OPTIMIZER.init(params)
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    steps = epochs * (len(train.labels) // batch_size)
    for step in range(steps):
        idx = data.batch_indices(order_key, step, len(train.labels), batch_size)
        params, opt_state, _ = _classifier_step(params, opt_state, images[idx], labels[idx],
                                                jax.random.fold_in(jitter_key, step))
    return params


@jax.jit
def _logits_and_features(params, x):
    return LeNet().apply({"params": params}, x), LeNet().apply({"params": params}, x, features=True)


def classify(params, images, batch_size: int = 500):
    """(probabilities (N, 10), features (N, 128)) of images in [-1, 1], float64 on the host."""
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        logits, f = _logits_and_features(params, jnp.asarray(images[i: i + batch_size], jnp.float32))
        probs.append(np.asarray(jax.nn.softmax(logits), np.float64))
        feats.append(np.asarray(f, np.float64))
    return np.concatenate(probs), np.concatenate(feats)


def accuracy(params, digits: data.Digits) -> float:
    probs, _ = classify(params, np.asarray(data.to_model_range(jnp.asarray(digits.images))))
    return float(np.mean(probs.argmax(1) == digits.labels))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2), which avoids a general (and complex-valued) matrix square root.
    """
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


class ClassifierCacheError(RuntimeError):
    """The trained classifier cannot be kept in its cache folder."""

    @classmethod
    def of(cls, cache_dir: str, error: OSError) -> "ClassifierCacheError":
        return cls(f"cannot write the classifier cache {cache_dir}: {error.strerror or error}")


def load_or_train_classifier(source: str, cache_dir: str, *, epochs: int | None = None):
    """The classifier for ``source``'s training digits: from the cache, else trained and cached."""
    train, held_out = data.load(source, "train"), data.load(source, "test")
    epochs = epochs or (10 if len(train.labels) < 10_000 else 3)
    key = f"{data.fingerprint(train)}-e{epochs}-{_recipe_fingerprint()}"
    path, info_path = os.path.join(cache_dir, key + ".msgpack"), os.path.join(cache_dir, key + ".json")
    template = LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    if os.path.exists(path) and os.path.exists(info_path):
        try:
            with open(path, "rb") as f:
                params = serialization.from_bytes(template, f.read())
            with open(info_path) as f:
                held_out_accuracy = float(json.load(f)["held_out_accuracy"])
            return params, held_out_accuracy, held_out
        except Exception as error:  # a damaged cache fails in msgpack, Flax or json alike; it is only a cache
            print(f"note: the cached classifier {path} cannot be read ({first_line(error)[:200]}); training it again")
    try:  # before the training: a cache that cannot be written says so before the work is done
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise ClassifierCacheError.of(cache_dir, error) from None
    params = train_classifier(train, epochs=epochs)
    held_out_accuracy = accuracy(params, held_out)
    try:  # each file atomically, the weights last: weights on disk mean their record is there too
        write_atomically(info_path, json.dumps({"held_out_accuracy": held_out_accuracy, "epochs": epochs,
                                                "train_images": len(train.labels)}))
        write_atomically(path, serialization.to_bytes(params))
    except OSError as error:
        raise ClassifierCacheError.of(cache_dir, error) from None
    return params, held_out_accuracy, held_out


def _recipe_fingerprint() -> str:
    """A hash of the classifier's architecture and training code: a cached classifier is reused only
    when both are the ones that trained it."""
    shapes = jax.eval_shape(lambda: LeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    source = "".join(inspect.getsource(f) for f in (_conv_same_tapgrad, LeNet, _classifier_step, train_classifier))
    return hashlib.sha256((str(shapes) + source).encode()).hexdigest()[:12]


def sample_report(classifier, samples, reference_images) -> dict:
    """The metrics of ``samples`` (N, 28, 28, 1) in [-1, 1] against real ``reference_images``."""
    probs, feats = classify(classifier, samples)
    _, ref_feats = classify(classifier, reference_images)
    confidence = probs.max(1)
    hist = np.bincount(probs.argmax(1), minlength=10)
    p = hist / hist.sum()
    entropy = float(-np.sum(p[p > 0] * np.log(p[p > 0])))
    return {"fd": frechet_distance(feats, ref_feats), "confidence_mean": float(confidence.mean()),
            "frac_confident": float(np.mean(confidence > CONFIDENT)), "class_hist": hist.tolist(),
            "class_entropy": entropy, "n_samples": int(len(samples))}


def save_labelled_grid(images, labels, confidences, path: str, columns: int = 10, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    pixels = to_uint8(images)[..., 0]
    rows = -(-len(pixels) // columns)
    cell = 28 * scale + 14
    canvas = Image.new("L", (columns * cell, rows * cell), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (image, label, conf) in enumerate(zip(pixels, labels, confidences)):
        r, c = divmod(i, columns)
        canvas.paste(Image.fromarray(image).resize((28 * scale, 28 * scale), Image.NEAREST), (c * cell + 7, r * cell))
        draw.text((c * cell + 7, r * cell + 28 * scale), f"{label} ({conf:.2f})", fill=0)
    canvas.save(path)


def main(argv=None) -> None:
    devices.use_all_cpu_cores()
    parser = argparse.ArgumentParser(prog="python -m unet_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/default",
                        help="the run to evaluate; eval.json goes here (with --torch-checkpoint, beside that file)")
    parser.add_argument("--torch-checkpoint", default=None,
                        help="evaluate this torch state_dict instead (ported, sampled by the same JAX sampler); "
                             "the report goes beside it, as NAME.eval.json")
    parser.add_argument("--n-T", type=positive(int), default=None, dest="n_T",
                        help=f"diffusion steps T the torch checkpoint was trained with (its run's --n-T; default {N_T})")
    parser.add_argument("--data", default=None, help="'bundled' or a torchvision root (default: the run's own data; "
                                                     "with --torch-checkpoint, bundled)")
    parser.add_argument("--classifier-dir", default="runs/classifier", help="cache of trained classifiers")
    parser.add_argument("--num", type=int, default=1000, help="samples to draw")
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
    parser.add_argument("--sample-steps", type=positive(int), default=DEFAULT_SAMPLE_STEPS)
    parser.add_argument("--eta", type=ddim_eta, default=DEFAULT_ETA)
    parser.add_argument("--seed", type=seed, default=0)
    autotune.add_conv_flag(parser)
    parser.add_argument("--raw", action="store_true",
                        help="evaluate the raw weights instead of the EMA (writes eval_raw.json, eval_raw_samples.png)")
    args = parser.parse_args(argv)
    if args.num < 2:
        parser.error("--num must be at least 2 (a covariance needs two samples)")
    if args.raw and args.torch_checkpoint:
        parser.error("--raw applies to a workdir's checkpoint; a torch state_dict holds one set of weights")
    if args.n_T is not None and not args.torch_checkpoint:
        parser.error("--n-T is for --torch-checkpoint; a workdir records its own n_T")

    params, n_T, config = _weights(args)
    if args.sampler == "ddim" and args.sample_steps > n_T:
        raise SystemExit(f"error: --sample-steps {args.sample_steps} exceeds n_T {n_T}")
    if args.torch_checkpoint:  # beside the checkpoint: a workdir's own eval.json is never overwritten
        prefix = os.path.splitext(args.torch_checkpoint)[0] + ".eval"
    else:
        prefix = os.path.join(args.workdir, "eval_raw" if args.raw else "eval")
    try:  # before the classifier and the sampling, which would be lost
        check_writable(prefix + ".json", prefix + "_samples.png")
    except OSError as error:
        raise SystemExit(f"error: cannot write the report {error.filename}: {error.strerror}") from None
    try:
        source = args.data or config.get("data", data.BUNDLED)
        classifier, held_out_accuracy, held_out = load_or_train_classifier(source, args.classifier_dir)
    except (data.MnistError, ClassifierCacheError) as error:
        raise SystemExit(f"error: {error}") from None
    samples = generate_on_local_devices(params, jax.random.key(args.seed), num=args.num, sampler=args.sampler,
                                        steps=args.sample_steps, n_T=n_T, eta=args.eta, conv=args.conv,
                                        dtype="float32" if args.torch_checkpoint else config.get("dtype", "float32"))
    reference = np.asarray(data.to_model_range(jnp.asarray(held_out.images)))
    report = sample_report(classifier, samples, reference)
    weights = "state_dict" if args.torch_checkpoint else ("raw" if args.raw else "ema")
    report |= {"classifier_accuracy": held_out_accuracy, "sampler": args.sampler, "steps": args.sample_steps if args.sampler == "ddim" else n_T,
               "eta": args.eta, "model": args.torch_checkpoint or args.workdir, "weights": weights}
    probs, _ = classify(classifier, samples[:100])
    path = prefix + ".json"
    try:
        write_json(path, report)
        path = prefix + "_samples.png"
        save_labelled_grid(samples[:100], probs.argmax(1), probs.max(1), path)
    except OSError as error:
        raise SystemExit(f"error: cannot write the report {path}: {error.strerror or error}") from None
    print(f"wrote {prefix}.json and {prefix}_samples.png")
    _print_report(report)


def _weights(args) -> tuple[dict, int, dict]:
    """(params, n_T, the run's record) to evaluate: a torch state_dict ported, whose run is recorded
    nowhere (its data is --data, or the bundled digits), or a workdir's EMA or raw weights."""
    try:
        if args.torch_checkpoint:
            from parity import CheckpointMismatchError, WeightsFileError, torch_to_flax

            try:
                return torch_to_flax(args.torch_checkpoint)["params"], args.n_T or N_T, {}
            except (WeightsFileError, CheckpointMismatchError) as error:
                raise SystemExit(f"error: {flag_error('--torch-checkpoint', args.torch_checkpoint, error)}") from None
        config, restored = checkpoints.restore_latest_params(args.workdir)
        return restored["params" if args.raw else "ema_params"], config["n_T"], config
    except checkpoints.UNREADABLE_RUN as error:
        raise SystemExit(f"error: {error}") from None


def _print_report(report: dict) -> None:
    print(f"model: {report['model']} ({report['weights']} weights; {report['n_samples']} samples, {report['sampler']} "
          f"{report['steps']} steps)")
    print(f"classifier held-out accuracy: {report['classifier_accuracy']:.4f}")
    print(f"Frechet distance (LeNet features) to held-out digits: {report['fd']:.3f}")
    print(f"confidence: mean {report['confidence_mean']:.3f}, share > {CONFIDENT}: {report['frac_confident']:.3f}")
    print(f"classes: {report['class_hist']}  entropy {report['class_entropy']:.3f} (uniform: {np.log(10):.3f})")


if __name__ == "__main__":
    main()
