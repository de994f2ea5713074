"""What the JAX and the torch trainer share, written in neither framework.

The DDPM schedule (``schedule``), the digits (``digits``), a run's settings and flags
(``settings``), the files of a run's folder (``run_folder``) and what is wrong with a
weights file (``weights``). Importing any of it imports neither torch nor JAX, so
``unet_torch`` works without JAX and ``unet_jax`` without torch (``tests/test_imports.py``).
"""
