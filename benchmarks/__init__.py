"""Benchmarks of the jit-compiled JAX path against eager torch and torch.compile."""
