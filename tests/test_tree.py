"""Path-keyed pytree helpers."""

import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import tree


def test_get_names_the_path_past_any_leaf():
    t = {"params": {"fc": {"kernel": np.zeros((2, 3)), "bias": jnp.zeros(3)}}}
    assert tree.get(t, "params/fc/kernel").shape == (2, 3)
    for path in ("params/fc/kernel/extra", "params/fc/bias/extra", "params/conv"):
        with pytest.raises(KeyError, match=f"no entry '{path}' in the tree"):
            tree.get(t, path)
