"""pleas-jax: merge two networks by permutation matching and least squares (PLeaS)."""

from pleas_jax import models

__version__ = "0.1.0"

__all__ = ["__version__", "models"]
