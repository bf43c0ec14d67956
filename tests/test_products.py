"""Precision modes of the least-squares sums against float64 products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax.products import PRECISION_MODES, check_precision, einsum, matmul, split_bf16


def _features(seed, shape):
    # ReLU-like features with a spread of scales, as the sums see them.
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=shape), 0) * np.exp(rng.normal(size=shape[-1:]))
    return x.astype(np.float32)


def test_split_is_exact_to_sixteen_bits():
    x = _features(0, (512, 64))
    hi, lo = split_bf16(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    back = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    rel = np.abs(back - x) / np.maximum(np.abs(x), 1e-30)
    assert rel.max() <= 2.0**-16
    # The head alone is bf16: ~2^-9 relative, so the tail carries real bits.
    rel_hi = np.abs(np.asarray(hi, np.float64) - x) / np.maximum(np.abs(x), 1e-30)
    assert rel_hi.max() > 2.0**-12


def test_gram_error_per_mode():
    x = _features(1, (8192, 96))
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    err = {}
    for mode in PRECISION_MODES:
        g = np.asarray(jax.jit(lambda a, mode=mode: matmul(a.T, a, mode))(jnp.asarray(x)))
        assert g.dtype == np.float32
        err[mode] = np.abs(g - ref).max() / np.abs(ref).max()
    # Seen: highest 5.6e-8, bf16_3x 3.3e-6, bfloat16 3.4e-5.
    assert err["highest"] <= 1e-6, err
    assert err["bf16_3x"] <= 1e-5, err
    assert 1e-5 <= err["bfloat16"] <= 1e-3, err  # bf16 rounding shows: the check can fail
    assert err["bf16_3x"] <= err["bfloat16"] / 5, err


def test_bf16_3x_einsum_with_batch_axes():
    a = _features(2, (16, 5, 7, 12))
    b = _features(3, (16, 5, 7, 3, 12))
    spec = "nyxc,nyxed->eycd"
    ref = np.einsum(spec, a.astype(np.float64), b.astype(np.float64))
    out = np.asarray(einsum(spec, jnp.asarray(a), jnp.asarray(b), "bf16_3x"))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=4e-5 * np.abs(ref).max())


def test_precision_values():
    for mode in PRECISION_MODES:
        assert check_precision(mode) == mode
    assert check_precision(jax.lax.Precision.HIGHEST) is jax.lax.Precision.HIGHEST
    assert check_precision(jax.lax.DotAlgorithmPreset.BF16_BF16_F32) is not None
    for bad in ("bf16", "fp32", 3):
        with pytest.raises(ValueError, match="bf16_3x"):
            check_precision(bad)
