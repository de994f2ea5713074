"""The README's Python quickstart runs as written, on a torch checkpoint of the tutorial's Unet."""

import os
import re

import numpy as np
import torch
from safetensors.torch import load_file

from unet_torch import Unet as TorchUnet

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_the_quickstart_runs_and_its_weights_go_back_to_torch(tmp_path, monkeypatch):
    with open(README) as f:
        (block,) = re.findall(r"## Quickstart\n\n```python\n(.*?)```", f.read(), re.S)
    torch.manual_seed(0)
    original = TorchUnet().state_dict()
    torch.save(original, tmp_path / "tutorial_unet.pt")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md quickstart", "exec"), namespace)
    assert namespace["eps_hat"].shape == (4, 28, 28, 1) and np.isfinite(np.asarray(namespace["eps_hat"])).all()
    digits = np.asarray(namespace["digits"])
    assert digits.shape == (16, 28, 28, 1) and digits.min() >= -1.0 and digits.max() <= 1.0 and digits.std() > 0
    back = load_file(tmp_path / "back.safetensors")
    TorchUnet().load_state_dict(back, strict=True)
    assert all(torch.equal(back[k], v) for k, v in original.items())
