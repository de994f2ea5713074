"""The sample-quality metric itself: accuracy of its classifier and sanity of its Frechet distance."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import data, evaluate, export
from unet_jax.train import Config, train


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
    assert noised == sorted(noised)
    blurred = [fd(_blur(digits, k)) for k in (0, 1, 2, 3)]
    assert blurred == sorted(blurred)

    # benchmarks/README.md's "real digits score above 90 %" rests on digits the classifier never trained on.
    report = evaluate.sample_report(params, reference, reference)
    assert report["frac_confident"] > 0.9 and report["class_entropy"] > 0.95 * np.log(10)
    assert report["fd"] < 1e-3 * noise  # a set against itself: zero, up to the square root's rounding
    json.dumps(report)


EVAL_KEYS = {"fd", "confidence_mean", "frac_confident", "class_hist", "class_entropy", "classifier_accuracy",
             "n_samples", "sampler", "steps"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # tests/test_train.py's TINY program (1 step per dispatch, warm-up 2): the session's compilation cache has it.
    path = str(tmp_path_factory.mktemp("run"))
    train(Config(workdir=path, steps=3, batch_size=8, n_T=20, sample_steps=3, num_samples=4, sample_every=0,
                 ckpt_every=0, warmup_steps=2, conv="tapgrad"))
    return path


@pytest.fixture(autouse=True)
def warm_plans(tmp_path, warm_autotune_cache, monkeypatch):
    """--conv auto reads the sampler's plan from the cache, as a second evaluation on this machine does."""
    env = warm_autotune_cache(tmp_path / "autotune", train="tapgrad", sample="xla", batches=(12,))
    monkeypatch.setenv("UNET_JAX_CACHE_DIR", env["UNET_JAX_CACHE_DIR"])


def _evaluate(classifier, out, *extra, name="eval", report=None):
    evaluate.main(["--workdir", out, "--classifier-dir", classifier[3], "--num", "12", "--sample-steps", "3", *extra])
    with open(report or os.path.join(out, name + ".json")) as f:
        return json.load(f)


def test_evaluate_cli_writes_eval_json_and_a_labelled_grid(classifier, trained):
    report = _evaluate(classifier, trained)
    assert EVAL_KEYS <= set(report)
    assert report["n_samples"] == 12 and sum(report["class_hist"]) == 12 and len(report["class_hist"]) == 10
    assert (report["sampler"], report["steps"]) == ("ddim", 3)
    assert report["classifier_accuracy"] == classifier[1]
    assert os.path.getsize(os.path.join(trained, "eval_samples.png")) > 0
    assert _evaluate(classifier, trained) == report  # same seed, same numbers
    raw = _evaluate(classifier, trained, "--raw", name="eval_raw")
    assert (raw["weights"], report["weights"]) == ("raw", "ema") and raw["fd"] != report["fd"]
    assert os.path.exists(os.path.join(trained, "eval_raw_samples.png"))


def test_evaluate_a_torch_checkpoint_through_the_same_sampler(classifier, trained, tmp_path):
    """A torch state_dict of the run's EMA weights, at the run's n_T, scores exactly what the run scores;
    its report goes beside it, and the workdir's own eval.json is left alone."""
    pt = str(tmp_path / "model.pt")
    export.export(trained, pt)
    ours = _evaluate(classifier, trained)
    before = open(os.path.join(trained, "eval.json")).read()
    # --workdir is unused with --torch-checkpoint: a run there with other data changes nothing.
    elsewhere = tmp_path / "another-run"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"data": str(tmp_path / "no-mnist-here"), "n_T": 1000}))
    ported = _evaluate(classifier, str(elsewhere), "--torch-checkpoint", pt, "--n-T", "20",
                       report=str(tmp_path / "model.eval.json"))
    assert os.path.getsize(tmp_path / "model.eval_samples.png") > 0
    assert open(os.path.join(trained, "eval.json")).read() == before
    assert ported.pop("model") == pt and ours.pop("model") == trained
    assert (ported.pop("weights"), ours.pop("weights")) == ("state_dict", "ema")
    assert ported == ours
    # At the default n_T of 1000 the same weights are sampled on another schedule.
    other = _evaluate(classifier, trained, "--torch-checkpoint", pt, report=str(tmp_path / "model.eval.json"))
    assert other["fd"] != ported["fd"]


def test_evaluate_without_a_model_says_so(classifier, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in"):
        _evaluate(classifier, str(tmp_path))
    with pytest.raises(SystemExit, match="no weights file at"):
        _evaluate(classifier, str(tmp_path), "--torch-checkpoint", str(tmp_path / "missing.pt"))


def test_evaluate_says_in_one_line_what_data_or_cache_it_cannot_use(classifier, trained, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no MNIST at .*missing"):
        _evaluate(classifier, trained, "--data", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match=r"^error: --sample-steps 30 exceeds n_T 20$"):
        evaluate.main(["--workdir", trained, "--classifier-dir", classifier[3], "--sample-steps", "30"])
    pt = str(tmp_path / "model.pt")
    export.export(trained, pt)
    (tmp_path / "model.eval.json").mkdir()  # where the report would go
    with pytest.MonkeyPatch.context() as patch:  # found before the classifier is read and the samples drawn
        patch.setattr(evaluate, "load_or_train_classifier", lambda *_: pytest.fail("the report is checked first"))
        with pytest.raises(SystemExit, match=r"^error: cannot write the report .*model.eval.json: Is a directory$"):
            _evaluate(classifier, trained, "--torch-checkpoint", pt, "--n-T", "20")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write the classifier cache .*a-file/classifiers: "):
        evaluate.main(["--workdir", trained, "--classifier-dir", str(blocker / "classifiers"), "--num", "12",
                       "--sample-steps", "3"])


@pytest.mark.parametrize("flags", [["--sample-steps", "0"], ["--eta", "inf"], ["--eta", "-1"], ["--n-T", "0"],
                                   ["--seed", "-1"]])
def test_evaluate_refuses_flags_that_cannot_draw(flags, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(flags)
    assert info.value.code == 2 and f"argument {flags[0]}: expected " in capsys.readouterr().err


def test_a_classifier_that_cannot_be_cached_after_training_says_so(classifier, tmp_path, monkeypatch):
    def disk_full(path, blob):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "train_classifier", lambda train, epochs: classifier[0])  # trained already
    monkeypatch.setattr(evaluate, "write_atomically", disk_full)
    with pytest.raises(evaluate.ClassifierCacheError, match=r"^cannot write the classifier cache .*cache: No space"):
        evaluate.load_or_train_classifier(data.BUNDLED, str(tmp_path / "cache"))


def test_evaluate_refuses_fewer_than_two_samples_and_raw_torch_weights(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--num", "1"])
    assert "--num must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--raw", "--torch-checkpoint", "model.pt"])
    assert "--raw applies to a workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--n-T", "20"])
    assert "--n-T is for --torch-checkpoint; a workdir records its own n_T" in capsys.readouterr().err


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


def test_a_damaged_classifier_cache_is_trained_again_with_a_note(tmp_path, monkeypatch, capsys):
    trained = []

    def quick_train(digits, epochs):  # the cache's handling is under test, not the training
        trained.append(epochs)
        return evaluate.LeNet().init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))["params"]

    monkeypatch.setattr(evaluate, "train_classifier", quick_train)
    cache = str(tmp_path / "cache")
    first, _, _ = evaluate.load_or_train_classifier(data.BUNDLED, cache, epochs=1)
    (weights,) = glob.glob(os.path.join(cache, "*.msgpack"))
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    again, _, _ = evaluate.load_or_train_classifier(data.BUNDLED, cache, epochs=1)
    assert len(trained) == 2 and f"note: the cached classifier {weights} cannot be read (" in capsys.readouterr().out
    read, _, _ = evaluate.load_or_train_classifier(data.BUNDLED, cache, epochs=1)
    assert len(trained) == 2, "the cache written again reads"
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(read)))
