"""Precision modes of the least-squares sums against float64 products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax.products import (
    PRECISION_MODES,
    check_precision,
    einsum,
    gram_einsum,
    gram_matrix,
    matmul,
    split_bf16,
)


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
    # With lo·lo kept (seen: 3.5e-7).
    g = np.asarray(jax.jit(gram_matrix, static_argnums=1)(jnp.asarray(x), "bf16_3x"))
    assert np.abs(g - ref).max() / np.abs(ref).max() <= 1e-6


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


def _min_ridged_eigenvalue(g, ridge=1e-4):
    # What the solve factors: G + λI (λ = ridge · mean diagonal) with unit
    # diagonal (Jacobi scaling), its smallest eigenvalue in float64.
    g = np.asarray(g, np.float64)
    g = 0.5 * (g + g.T)
    a = g + ridge * np.trace(g) / len(g) * np.eye(len(g))
    s = 1.0 / np.sqrt(np.diag(a))
    return np.linalg.eigvalsh(a * s[:, None] * s[None, :]).min()


def test_bf16_3x_gram_of_few_rows_stays_positive_definite():
    # 32 rows of 1,024 features, as a resnet50's layer4 sees on 32 images at
    # 32 px: the plain bf16_3x product lacks lo·lo and its ridged Gram turns
    # indefinite (the solve then needs its slow pseudo-inverse); gram_matrix() does not.
    x = jnp.asarray(_features(4, (32, 1024)))
    plain = matmul(x.T, x, "bf16_3x")
    assert _min_ridged_eigenvalue(plain) < 0  # the failure this guards against
    g = jax.jit(gram_matrix, static_argnums=1)(x, "bf16_3x")
    assert np.array_equal(g, g.T)
    assert _min_ridged_eigenvalue(g) > 0
    assert _min_ridged_eigenvalue(g) >= 0.9 * _min_ridged_eigenvalue(gram_matrix(x, "highest"))
    # It is the Gram of the split features hi + lo, to fp32 summation.
    hi, lo = split_bf16(x)
    xs = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    ref = xs.T @ xs
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    for mode in ("highest", "bfloat16"):
        np.testing.assert_array_equal(gram_matrix(x, mode), matmul(x.T, x, mode))


def test_gram_einsum_forms_every_split_product():
    # Shifted windows of one map, as the shift Gram contracts them.
    x = _features(5, (8, 6, 7, 5))
    a, b = x[:, :, :-1], np.stack([x[:, :, 1:], x[:, :, :-1]], axis=3)
    spec = "nyxc,nyxed->ecd"

    def split64(v):
        hi, lo = split_bf16(jnp.asarray(v))
        return np.asarray(hi, np.float64) + np.asarray(lo, np.float64)

    ref = np.einsum(spec, split64(a), split64(b))
    out = np.asarray(gram_einsum(spec, jnp.asarray(a), jnp.asarray(b), "bf16_3x"))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    # einsum's three products lack the tails' product, which adds up on the
    # block of equal windows (a Gram's diagonal) while fp32 round-off does not.
    plain = np.asarray(einsum(spec, jnp.asarray(a), jnp.asarray(b), "bf16_3x"))
    tails = np.einsum(
        spec, *(np.asarray(split_bf16(jnp.asarray(v))[1], np.float64) for v in (a, b))
    )
    t = np.trace(tails[1])  # seen: 3.1e-3; ref - out 4.4e-4, ref - plain 3.5e-3
    assert abs(np.trace(ref[1] - out[1])) < 0.3 * t
    assert abs(np.trace(ref[1] - plain[1]) - t) < 0.3 * t
    np.testing.assert_array_equal(
        gram_einsum(spec, jnp.asarray(a), jnp.asarray(b), "highest"),
        einsum(spec, jnp.asarray(a), jnp.asarray(b), "highest"),
    )
