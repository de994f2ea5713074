"""Weight porting between the torch reference and the Flax mirror, and the parity report."""

from parity.port import (CheckpointMismatchError, WeightsFileError, check_floating, flax_to_torch, load_state_dict,
                         torch_to_flax)

__all__ = ["CheckpointMismatchError", "WeightsFileError", "check_floating", "flax_to_torch", "load_state_dict",
           "torch_to_flax"]
