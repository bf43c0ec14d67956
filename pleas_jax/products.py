"""Matmul precision of the least-squares sums: fp32, or bf16 tensor-core products.

The statistics passes (:mod:`pleas_jax.ls_statistics`) are Gram matrices of
fp32 features, ``Σ XᵀX`` over every position of every image: on a GPU they are
nearly all of the least-squares time, and fp32 matmuls run there at a small
fraction of the bf16 tensor-core rate. :func:`einsum` takes a *precision
mode*:

- ``"highest"`` (default): fp32 products, fp32 sums (``Precision.HIGHEST``).
- ``"bf16_3x"``: each fp32 operand is split into a bf16 head and a bf16 tail
  (``x ≈ hi + lo``, 16 significant bits together) and ``a·b`` is formed as
  ``hi·hi + hi·lo + lo·hi`` from three bf16 matmuls that accumulate in fp32.
  The dropped ``lo·lo`` term and the split leave a relative error of at most
  about 2⁻¹⁶ per product, at three times the bf16 cost: on an H100/H200,
  still several times the fp32 rate. Grams (:func:`gram_matrix`, :func:`gram_einsum`)
  keep the ``lo·lo`` term: without it a Gram can lose positive definiteness.
- ``"bfloat16"``: one bf16 matmul with fp32 sums; each product carries bf16's
  2⁻⁹ relative rounding of its operands.

On the Gram of 8,192 ReLU-like rows of 96 features (tests/test_products.py)
the largest error relative to the largest entry was 5.6e-8 (``"highest"``),
3.3e-6 (``"bf16_3x"`` by :func:`matmul`; 3.5e-7 by :func:`gram_matrix`, which
keeps ``lo·lo``) and 3.4e-5 (``"bfloat16"``).

Any :class:`jax.lax.Precision` or :class:`jax.lax.DotAlgorithmPreset` is
passed to ``jnp.einsum`` unchanged. On a CPU, XLA computes bf16 matmuls
slowly (and runs the bf16 algorithm presets as fp32), so the bf16 modes are for
accelerators; the tests check their accuracy on the CPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PRECISION_MODES = ("highest", "bf16_3x", "bfloat16")


def check_precision(precision: Any) -> Any:
    """``precision`` if it is a mode name, a ``jax.lax.Precision`` or a
    ``jax.lax.DotAlgorithmPreset``; otherwise a ``ValueError`` naming the modes."""
    if isinstance(precision, str):
        if precision not in PRECISION_MODES:
            raise ValueError(f"precision must be one of {PRECISION_MODES}, got {precision!r}")
        return precision
    if precision is None or isinstance(precision, (jax.lax.Precision, jax.lax.DotAlgorithmPreset)):
        return precision
    raise ValueError(
        f"precision must be one of {PRECISION_MODES}, a jax.lax.Precision or a "
        f"jax.lax.DotAlgorithmPreset, got {precision!r}"
    )


def split_bf16(x):
    """``(hi, lo)`` in bf16 with ``hi + lo`` equal to fp32 ``x`` to ~2⁻¹⁷ relative."""
    x = x.astype(jnp.float32)
    hi = x.astype(jnp.bfloat16)
    lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    return hi, lo


def _split_einsum(spec: str, a, b, *, tails: bool):
    """``a·b`` from the bf16 splits of both operands, summed in fp32: head ×
    head plus the two cross products, plus tail × tail with ``tails``."""
    (ah, al), (bh, bl) = split_bf16(a), split_bf16(b)

    def dot(x, y):
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)

    # The small terms first, then the head product, so that their
    # contribution is not rounded away against it.
    small = dot(ah, bl) + dot(al, bh)
    if tails:
        small = small + dot(al, bl)
    return dot(ah, bh) + small


def einsum(spec: str, a, b, precision: Any = "highest"):
    """``jnp.einsum(spec, a, b)`` of fp32 operands at a precision mode (module
    docstring); the result is fp32."""
    if precision == "bf16_3x":
        return _split_einsum(spec, a, b, tails=False)
    if precision == "bfloat16":
        return jnp.einsum(
            spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
    if precision == "highest":
        precision = jax.lax.Precision.HIGHEST
    return jnp.einsum(spec, a, b, precision=precision)


def matmul(a, b, precision: Any = "highest"):
    """``a @ b`` for 2-D fp32 operands at a precision mode."""
    return einsum("ij,jk->ik", a, b, precision)


def gram_einsum(spec: str, a, b, precision: Any = "highest"):
    """:func:`einsum` for operands that are views of the same features (windows
    of one map, say) whose results are assembled into a Gram matrix.

    ``"bf16_3x"`` drops the ``lo·lo`` product, so a Gram assembled from
    :func:`einsum` is ``X̂ᵀX̂ − LᵀL`` (``X̂ = hi + lo``, ``L`` the tails): the
    missing term is positive semidefinite, and where X has fewer rows than
    columns its weight falls on a few directions that ``X̂ᵀX̂`` leaves empty,
    enough to make a ridge-regularised Gram indefinite (a resnet50's layer4
    Grams over 32 rows did). Here the fourth product is formed too, so the
    assembled matrix is the Gram of X̂ up to fp32 summation, positive
    semidefinite like an fp32 one, at 4/3 of :func:`einsum`'s cost. Other
    modes: :func:`einsum`.
    """
    if precision != "bf16_3x":
        return einsum(spec, a, b, precision)
    return _split_einsum(spec, a, b, tails=True)


def gram_matrix(x, precision: Any = "highest"):
    """``xᵀx`` of a 2-D fp32 ``x [rows, dim]`` at a precision mode: ``[dim, dim]``.

    With ``"bf16_3x"`` it is the Gram of ``X̂ = hi + lo`` (see
    :func:`gram_einsum`) from three bf16 products, not four:
    ``HᵀH + M + Mᵀ + LᵀL`` with ``M = HᵀL``, symmetric by construction.
    """
    if precision != "bf16_3x":
        return matmul(x.T, x, precision)
    h, lo = split_bf16(x)

    def dot(u, v):
        return jnp.matmul(u.T, v, preferred_element_type=jnp.float32)

    m = dot(h, lo)
    return dot(h, h) + ((m + m.T) + dot(lo, lo))
