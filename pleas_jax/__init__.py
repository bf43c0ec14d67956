"""pleas-jax: merge two networks by permutation matching and least squares (PLeaS).

The public API is this flat set of names; submodules hold the pieces.

Example::

    import pleas_jax

    a, b = pleas_jax.load("ckpt/a"), pleas_jax.load("ckpt/b")
    spec = pleas_jax.derive_spec(a[0], a[1], images[:1])
    result = pleas_jax.merge(a, b, batches, budget=1.5)
"""

# ruff: noqa: E402 (the environment default below must precede the imports)
import os

# XLA:CPU runs its LAPACK calls (the least-squares Cholesky) inside its own
# thread pool; OpenBLAS threads on top oversubscribe the cores, and on a
# loaded 2-core machine a 1152-wide Cholesky solve then took 0.7 s instead of
# 0.02 s. Only a default: a value the user set wins, and it only takes effect
# if OpenBLAS is not loaded yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pleas_jax import data, models
from pleas_jax.batch_norm import recompute_batch_norm
from pleas_jax.checkpoint import load, load_heads, load_metadata, save
from pleas_jax.heads import apply_head, head_group, route_heads, train_linear_probe
from pleas_jax.least_squares import least_squares
from pleas_jax.matching.activations import activation_matching
from pleas_jax.matching.lap import solve as linear_assignment
from pleas_jax.matching.weights import weight_matching
from pleas_jax.merge import MergeResult, merge
from pleas_jax.partial import make_blocks, partial_merge
from pleas_jax.permutation import apply_permutation, compose, identity, invert
from pleas_jax.spec import Group, check_spec, derive_spec, spec_from_dict

__version__ = "0.1.0"

__all__ = [
    "Group",
    "MergeResult",
    "__version__",
    "activation_matching",
    "apply_head",
    "apply_permutation",
    "check_spec",
    "compose",
    "data",
    "derive_spec",
    "head_group",
    "identity",
    "invert",
    "least_squares",
    "linear_assignment",
    "load",
    "load_heads",
    "load_metadata",
    "make_blocks",
    "merge",
    "models",
    "partial_merge",
    "recompute_batch_norm",
    "route_heads",
    "save",
    "spec_from_dict",
    "train_linear_probe",
    "weight_matching",
]
