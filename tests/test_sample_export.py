"""python -m unet_jax.sample and python -m unet_jax.export on a tiny trained workdir."""

import os
import shutil
import stat

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from parity import torch_to_flax
from unet_jax import export, sample
from unet_jax.model import Unet
from unet_jax.train import Config, train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # tests/test_train.py's TINY program (1 step per dispatch, warm-up 2): the session's compilation cache has it.
    path = str(tmp_path_factory.mktemp("run"))
    train(Config(workdir=path, steps=3, batch_size=8, n_T=20, sample_steps=3, num_samples=4, sample_every=0,
                 ckpt_every=0, warmup_steps=2, conv="tapgrad"))
    return path


def test_sample_cli_writes_png_and_npy(workdir, tmp_path, warm_autotune_cache, monkeypatch):
    # --conv auto reads its plan from the cache, as a second run on this machine does.
    env = warm_autotune_cache(tmp_path / "autotune", train="tapgrad", sample="xla", batches=(10,))
    monkeypatch.setenv("UNET_JAX_CACHE_DIR", env["UNET_JAX_CACHE_DIR"])
    out = str(tmp_path / "grid")
    sample.main(["--workdir", workdir, "--num", "10", "--sample-steps", "4", "--out", out])
    images = np.load(out + ".npy")
    assert images.shape == (10, 28, 28, 1) and images.min() >= -1 and images.max() <= 1
    assert Image.open(out + ".png").size == (2 * (8 * 30 + 2), 2 * (2 * 30 + 2))
    sample.main(["--workdir", workdir, "--num", "2", "--sampler", "ddpm", "--out", out + "_ddpm", "--conv", "im2col"])
    assert np.load(out + "_ddpm.npy").shape == (2, 28, 28, 1)


def test_sample_without_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="error: no checkpoint in"):
        sample.main(["--workdir", str(tmp_path)])
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # the torch trainer's run folder: its weights go to evaluate
    (tmp_path / "config.json").write_text('{"n_T": 400}')
    with pytest.raises(SystemExit, match=r"^error: no checkpoint of the JAX trainer in .*: it holds a torch training run, "
                                         r"whose EMA weights \(model.pt, a torch state_dict\) python -m unet_jax.evaluate "
                                         r"--torch-checkpoint .*model.pt --n-T 400 samples and scores$"):
        sample.main(["--workdir", str(tmp_path)])


@pytest.mark.parametrize("flags", [["--num", "0"], ["--sample-steps", "0"], ["--eta", "nan"], ["--eta", "-1"],
                                   ["--seed", str(2**64)]])
def test_sample_refuses_flags_that_cannot_draw(flags, capsys):
    with pytest.raises(SystemExit) as info:
        sample.main(flags)
    assert info.value.code == 2 and f"argument {flags[0]}: expected " in capsys.readouterr().err


def test_sample_and_export_say_in_one_line_what_they_cannot_read_or_write(workdir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.MonkeyPatch.context() as patch:  # found before any image is drawn
        patch.setattr(sample, "generate_on_local_devices", lambda *_, **__: pytest.fail("the output is checked first"))
        with pytest.raises(SystemExit, match=r"^error: cannot write .*a-file/grid.png: Not a directory$"):
            sample.main(["--workdir", workdir, "--num", "2", "--sample-steps", "2", "--conv", "xla",
                         "--out", str(blocker / "grid")])
    for suffix in (".pt", ".safetensors"):
        with pytest.raises(SystemExit, match=rf"^error: cannot write .*a-file/model{suffix}: "):
            export.main(["--workdir", workdir, "--out", str(blocker / ("model" + suffix))])
        taken = tmp_path / ("a-folder" + suffix)  # the folder exists; the file cannot be made in its place
        taken.mkdir()
        with pytest.raises(SystemExit, match=rf"^error: cannot write .*a-folder{suffix}: "):
            export.main(["--workdir", workdir, "--out", str(taken)])
        assert os.listdir(taken) == [] and not list(tmp_path.glob("*.tmp"))
    broken = tmp_path / "broken"  # the run, with its record of its settings cut short
    shutil.copytree(workdir, broken)
    (broken / "config.json").write_text('{"n_T": 2')
    for cli in (lambda: sample.main(["--workdir", str(broken)]),
                lambda: export.main(["--workdir", str(broken), "--out", str(tmp_path / "model.pt")])):
        with pytest.raises(SystemExit, match=r"^error: .*broken/config.json is not a readable record of the run's "):
            cli()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_into_the_tutorials_unet_and_matches(workdir, tmp_path, suffix, tutorial_namespace):
    out = str(tmp_path / ("model" + suffix))
    umask = os.umask(0o022)
    try:
        export.main(["--workdir", workdir, "--out", out])
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644  # readable by whoever loads it, as the umask says
    tutorial_unet = tutorial_namespace["Unet"]()
    state_dict = torch_to_flax(out)  # also proves the file reads back through the strict loader
    if suffix == ".pt":
        tutorial_unet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    else:
        from safetensors.torch import load_file

        tutorial_unet.load_state_dict(load_file(out), strict=True)
    x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
    t = np.array([0.001, 0.5, 1.0], np.float32)
    with torch.no_grad():
        theirs = tutorial_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).numpy()
    ours = np.asarray(Unet().apply(state_dict, x, t))
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)
    assert jax.tree.leaves(state_dict)[0].dtype == np.float32


def test_export_refuses_an_unknown_extension(workdir):
    with pytest.raises(SystemExit) as info:
        export.main(["--workdir", workdir, "--out", "model.bin"])
    assert info.value.code == 2


@pytest.mark.parametrize("flags", [["--raw"], ["--workdir", "runs/mine"]])
def test_export_of_initial_weights_refuses_the_flags_of_a_run(flags, tmp_path, capsys):
    # --init-seed makes its weights from the seed: a run's --workdir or --raw would be silently ignored.
    with pytest.raises(SystemExit) as info:
        export.main(["--init-seed", "3", "--out", str(tmp_path / "init.pt"), *flags])
    assert info.value.code == 2 and "drop --workdir and --raw" in capsys.readouterr().err
    assert not (tmp_path / "init.pt").exists()


def test_export_of_the_initial_weights_is_the_trainers_start(tmp_path):
    # The trainer's first step runs at learning rate 0 (linear warm-up from 0), so after one step
    # its raw weights are still the ones it started from: those --init-seed must export.
    run = str(tmp_path / "run")
    train(Config(workdir=run, steps=1, seed=3, batch_size=8, n_T=20, sample_steps=3, num_samples=4, sample_every=0,
                 ckpt_every=0, warmup_steps=2, conv="tapgrad"))
    export.main(["--init-seed", "3", "--out", str(tmp_path / "init.pt")])
    export.main(["--workdir", run, "--raw", "--out", str(tmp_path / "step1.pt")])
    initial, trained = (torch_to_flax(str(tmp_path / name))["params"] for name in ("init.pt", "step1.pt"))
    assert jax.tree.all(jax.tree.map(np.array_equal, initial, trained))
    export.main(["--init-seed", "4", "--out", str(tmp_path / "other.pt")])  # and the seed matters
    assert not jax.tree.all(jax.tree.map(np.array_equal, initial, torch_to_flax(str(tmp_path / "other.pt"))["params"]))


def test_sample_uses_the_runs_compute_dtype(workdir, tmp_path, monkeypatch):
    import json
    import shutil

    import jax.numpy as jnp

    run = str(tmp_path / "bf16")
    shutil.copytree(workdir, run)
    config = json.load(open(f"{run}/config.json"))
    json.dump(config | {"dtype": "bfloat16"}, open(f"{run}/config.json", "w"))
    models, tuned_for = [], []
    monkeypatch.setattr(sample, "generate", lambda params, key, *, model, num, **kw: models.append(model)
                        or jnp.zeros((num, 28, 28, 1)))
    monkeypatch.setattr(sample.autotune, "resolve", lambda conv, batch, mode, **kw: tuned_for.append(kw["dtype"])
                        or sample.autotune.ConvPlan("xla"))
    for path, out in ((run, "g"), (workdir, "h")):
        sample.main(["--workdir", path, "--num", "2", "--sample-steps", "3", "--out", str(tmp_path / out)])
    assert [m.dtype for m in models] == [jnp.bfloat16, jnp.float32]
    assert tuned_for == ["bfloat16", "float32"]  # --conv auto times the lowerings in the run's dtype
