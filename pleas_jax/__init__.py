"""pleas-jax: merge two networks by permutation matching and least squares (PLeaS)."""

from pleas_jax import models
from pleas_jax.checkpoint import load, save

__version__ = "0.1.0"

__all__ = ["__version__", "load", "models", "save"]
