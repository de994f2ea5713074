"""The eager torch reference trainer end to end, and its learning-rate schedule against optax."""

import json
import os

import numpy as np
import pytest
import torch

from unet_jax.train import Config, learning_rate
from unet_torch import Unet
from unet_torch.train import learning_rate_factor, main


def test_tiny_torch_run(tmp_path):
    workdir = str(tmp_path / "torch")
    main(["--workdir", workdir, "--steps", "3", "--batch-size", "8", "--n-T", "20", "--sample-steps", "3",
          "--num-samples", "4", "--log-every", "1"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    Unet().load_state_dict(torch.load(os.path.join(workdir, "model.pt"), weights_only=True), strict=True)
    assert os.path.isfile(os.path.join(workdir, "samples", "step_3.png"))
    main(["--workdir", workdir, "--steps", "4", "--batch-size", "8", "--n-T", "20", "--sample-steps", "3",
          "--num-samples", "4", "--log-every", "1"])
    assert torch.load(os.path.join(workdir, "checkpoint.pt"), weights_only=True)["step"] == 4


@pytest.mark.parametrize("warmup,decay", [(0, 0), (10, 0), (10, 50)])
def test_torch_lr_schedule_is_optax_schedule(warmup, decay):
    schedule = learning_rate(Config(lr=2e-3, warmup_steps=warmup, decay_steps=decay))
    for step in (0, 1, 5, 10, 11, 30, 60, 100):
        assert 2e-3 * learning_rate_factor(step, warmup, decay) == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-12)
