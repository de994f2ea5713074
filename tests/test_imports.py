"""Dependencies run one way: the torch reference imports no JAX, the JAX side no torch.

Each check runs in a fresh interpreter and reads ``sys.modules``; the last one hides torch
altogether, as a JAX-only install (``pip install .``) would have it.
"""

import os
import subprocess
import sys

import numpy as np

JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax")
TORCH_STACK = ("torch", "torchvision")


def _loaded_after(code: str, *, hide_torch: bool = False) -> set[str]:
    """The top-level packages imported by ``code`` in a fresh interpreter."""
    prelude = "import sys\n" + ("sys.modules.update(torch=None, torchvision=None)\n" if hide_torch else "")
    # A name hidden as None is not loaded: `import torch` then raises ImportError.
    report = "\nprint(' '.join(sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None})))"
    done = subprocess.run([sys.executable, "-c", prelude + code + report], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split("\n")[-2].split())


def test_the_torch_reference_and_its_trainer_import_no_jax():
    code = """
import unet_torch, unet_torch.diffusion, unet_torch.model, unet_torch.weights, unet_torch.train as trainer
try:
    trainer.main(["--help"])
except SystemExit:
    pass
"""
    loaded = _loaded_after(code)
    assert "torch" in loaded and not loaded & set(JAX_STACK)


def test_the_jax_side_and_its_tools_import_no_torch():
    code = """
import unet_jax, unet_jax.train, unet_jax.sample, unet_jax.export, unet_jax.evaluate, unet_jax.autotune, parity
for main in (unet_jax.train.main, unet_jax.sample.main, unet_jax.export.main, unet_jax.evaluate.main):
    try:
        main(["--help"])
    except SystemExit:
        pass
"""
    loaded = _loaded_after(code)
    assert "jax" in loaded and "flax" in loaded and not loaded & set(TORCH_STACK)


def test_the_shared_recipe_imports_neither_framework():
    code = "import ddpm_recipe.digits, ddpm_recipe.run_folder, ddpm_recipe.schedule, ddpm_recipe.settings, ddpm_recipe.weights"
    assert not _loaded_after(code) & set(JAX_STACK + TORCH_STACK)


def test_without_torch_safetensors_port_and_export_and_pt_files_name_the_extra(tmp_path):
    import jax
    from safetensors.torch import save_file

    from parity import flax_to_torch
    from unet_jax.model import init_variables

    state_dict = flax_to_torch(init_variables(jax.random.key(0)))
    save_file(dict(state_dict), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.pt").write_bytes(b"any bytes: the file is never opened without torch")
    np.save(tmp_path / "expected.npy", state_dict["decoder.out.weight"].numpy())
    code = f"""
import numpy as np, pytest
from parity import WeightsFileError, flax_to_numpy, torch_to_flax
from unet_jax import export
ported = torch_to_flax({str(tmp_path / "w.safetensors")!r})
back = flax_to_numpy(ported)["decoder.out.weight"]
assert np.array_equal(back, np.load({str(tmp_path / "expected.npy")!r})), "round trip"
export.save_torch(ported["params"], {str(tmp_path / "out.safetensors")!r})
assert np.array_equal(flax_to_numpy(torch_to_flax({str(tmp_path / "out.safetensors")!r}))["decoder.out.weight"], back)
with pytest.raises(WeightsFileError, match=r"w.pt' is a torch file, and reading it needs torch: pip install 'unet-jax\\[torch\\]'"):
    torch_to_flax({str(tmp_path / "w.pt")!r})
with pytest.raises(SystemExit, match=r"^error: writing .*out.pt .*needs torch, which is not installed: pip install 'unet-jax\\[torch\\]'"):
    export.main(["--init-seed", "0", "--out", {str(tmp_path / "out.pt")!r}])
import parity.__main__
with pytest.raises(SystemExit, match=r"^error: python -m parity .* needs torch, which is not installed"):
    parity.__main__.main([])
"""
    loaded = _loaded_after(code, hide_torch=True)
    assert not loaded & set(TORCH_STACK)


def test_without_torch_the_trainer_refuses_a_pt_init_in_one_line(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"never opened")
    code = f"""
import pytest
from unet_jax import train
with pytest.raises(SystemExit, match=r"^error: --init-from: .*w.pt' is a torch file, and reading it needs torch: pip install 'unet-jax\\[torch\\]'"):
    train.main(["--workdir", {str(tmp_path / "run")!r}, "--init-from", {str(tmp_path / "w.pt")!r}, "--steps", "1"])
"""
    _loaded_after(code, hide_torch=True)
    assert not (tmp_path / "run").exists()


def test_without_torch_benchmarks_scaling_imports_and_records_no_version_and_benchmarks_conv_names_the_extra():
    code = """
import pytest
import benchmarks.scaling  # times the JAX trainer alone
from benchmarks.machine import machine
assert machine()["torch"] is None
with pytest.raises(SystemExit, match=r"^error: python -m benchmarks.conv .*needs torch, which is not installed"):
    import benchmarks.conv
"""
    assert not _loaded_after(code, hide_torch=True) & set(TORCH_STACK)
