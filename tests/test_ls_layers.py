"""Layer geometry: patch rows times the kernel matrix are the conv, and the
kernel <-> matrix layout round-trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax.ls_layers import Layer, layer_apply, layer_rows, matrix_to_weights, weights_to_matrix


@pytest.mark.parametrize(
    "k,stride,pad,dil",
    [
        (3, 2, ((1, 1), (1, 1)), 1),
        (7, 2, ((3, 3), (3, 3)), 1),
        (1, 2, ((0, 0), (0, 0)), 1),
        (3, 1, ((2, 2), (2, 2)), 2),
        (3, 2, ((0, 1), (1, 0)), 1),
    ],
)
def test_patches_times_matrix_is_the_conv(k, stride, pad, dil):
    layer = Layer(
        "c",
        "conv",
        (k, k),
        (stride, stride),
        pad,
        (dil, dil),
        False,
        None,
        None,
        (5, 0, 0),
        (4, 0, 0),
    )
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(2, 15, 15, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=layer.kernel_shape), jnp.float32)
    ref = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        pad,
        rhs_dilation=(dil, dil),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    rows = layer_rows(layer, x)
    got = jnp.matmul(rows, weights_to_matrix(layer, kernel), precision=jax.lax.Precision.HIGHEST)
    # fp32 sums of up to 245 products: compare at 1e-6 of the output scale.
    tol = 1e-6 * float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(got.reshape(ref.shape), ref, atol=tol)
    np.testing.assert_allclose(layer_apply(layer, x, {"kernel": kernel}), ref, atol=tol)
    back = matrix_to_weights(layer, weights_to_matrix(layer, kernel))["kernel"]
    np.testing.assert_array_equal(back, kernel)
