"""Weight porting between the torch reference and the Flax mirror, and the parity report.

``torch_to_flax`` and ``flax_to_numpy`` need no torch (a ``.safetensors`` file or a NumPy
state_dict); ``flax_to_torch``, ``.pt`` files and ``python -m parity`` need the torch extra.
"""

from parity.port import (
                         CheckpointMismatchError,
                         WeightsFileError,
                         check_floating,
                         flax_to_numpy,
                         flax_to_torch,
                         read_weights,
                         torch_to_flax,
)

__all__ = ["CheckpointMismatchError", "WeightsFileError", "check_floating", "flax_to_numpy", "flax_to_torch",
           "read_weights", "torch_to_flax"]
