"""Weight porting between the torch reference and the Flax mirror, and the parity report."""

from parity.port import CheckpointMismatchError, flax_to_torch, load_state_dict, torch_to_flax

__all__ = ["CheckpointMismatchError", "flax_to_torch", "load_state_dict", "torch_to_flax"]
