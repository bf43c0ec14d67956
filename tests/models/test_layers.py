"""The recording layers: block-structured convs against flax's dense conv."""

import jax
import numpy as np
import pytest

from pleas_jax.models.layers import Conv
from tests.helpers import apply

SPLITS = ((2, 3, 1), (1, 2, 3))  # (merged, A-only, B-only) inputs, then outputs


def _zero_forbidden(kernel):
    """The kernel with the blocks that a partial merge keeps at zero set to zero."""
    (mi, ai, _), (mo, ao, _) = SPLITS
    k = np.array(kernel)
    k[..., mi : mi + ai, mo + ao :] = 0  # A-only inputs never reach B-only outputs
    k[..., mi + ai :, mo : mo + ao] = 0  # nor B-only inputs A-only outputs
    return k


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": (3, 3), "padding": 1},  # an int padding, as flax accepts it
        {"kernel_size": (3, 3), "padding": "SAME", "strides": 2},
        {"kernel_size": (1, 3), "padding": ((0, 0), (2, 1)), "kernel_dilation": (1, 2)},
    ],
)
def test_block_conv_equals_the_dense_conv_with_zero_blocks(kw):
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    dense = Conv(6, use_bias=False, **kw)
    params = dense.init(jax.random.key(1), x)
    params = {"params": {"kernel": _zero_forbidden(params["params"]["kernel"])}}
    block = Conv(6, use_bias=False, splits=SPLITS, **kw)
    np.testing.assert_allclose(
        apply(block, params, x), apply(dense, params, x), rtol=1e-5, atol=1e-5
    )


def test_block_conv_rejects_what_it_cannot_compute():
    x = np.zeros((1, 5, 5, 6), np.float32)
    with pytest.raises(ValueError, match="padding 'CIRCULAR'"):
        Conv(6, (3, 3), padding="CIRCULAR", use_bias=False, splits=SPLITS).init(
            jax.random.key(0), x
        )
    with pytest.raises(ValueError, match="2-D"):
        Conv(6, 3, use_bias=False, splits=SPLITS).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="neither bias nor feature groups"):
        Conv(6, (3, 3), splits=SPLITS).init(jax.random.key(0), x)
