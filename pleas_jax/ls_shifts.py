"""Conv Grams from shifted products of the input map (``gram="shifts"``).

The patch Gram of a stride-1 k×k conv repeats itself: its taps² blocks are
window sums of only (2k−1)² shifted products of the input map.
:func:`_shift_gram` forms them as GEMMs; :func:`_shift_saving` estimates what
that saves over the patch GEMM, which ``gram="auto"`` in
:func:`pleas_jax.ls_statistics.batch_sums` reads.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.ls_layers import Layer
from pleas_jax.products import gram_einsum

# "auto" takes the shift Gram where :func:`_shift_saving` estimates it at most
# 2/3 of the patch Gram's cost. The estimate counts multiply-adds plus the
# per-batch assembly of the taps² blocks, ~400 multiply-adds' worth per Gram
# entry (measured on CPU; memory-bound on a GPU too). Measured on one layer's
# sums (CPU, fp32, 3x3 convs, bench/gram.py and its predecessor): shifts were
# 1.4-2.5x faster from 8x8 maps up at batch 64 and from 14x14 up at batch 8,
# break-even at 4x4, and slower at 2x2 (batch 64) and 7x7 (batch 8), where the
# assembly dominates. Sized for 64 examples per device (below), it takes
# shifts at 7x7, slower with only 8 examples per device.
_SHIFT_MIN_SAVING = 1.5
_ASSEMBLY_MACS = 400.0
# The choice is made for this many examples per device, not the shard's own
# count: the two ways round off differently, and the sums must not depend on
# how many devices share a batch (tests/test_ls_statistics.py, 8 devices).
_AUTO_EXAMPLES = 64


def _windows(layer: Layer, xp, out_spatial):
    """Per kernel offset (row-major), the strided slice of the padded input
    ``xp [N, *spatial, C]`` that meets it: each ``[N, *out_spatial, C]``."""
    for offs in itertools.product(*(range(k) for k in layer.kernel_size)):
        start = (0, *(o * d for o, d in zip(offs, layer.dilation, strict=True)), 0)
        limit = (
            xp.shape[0],
            *(
                s + st * (n - 1) + 1
                for s, st, n in zip(start[1:-1], layer.strides, out_spatial, strict=True)
            ),
            xp.shape[-1],
        )
        yield jax.lax.slice(xp, start, limit, (1, *layer.strides, 1))


def _shifts_apply(layer: Layer) -> bool:
    """The shift-structured Gram covers 2-D convs with stride and dilation 1."""
    return (
        layer.kind == "conv"
        and len(layer.kernel_size) == 2
        and layer.taps > 1
        and all(s == 1 for s in layer.strides)
        and all(d == 1 for d in layer.dilation)
    )


def _shift_saving(layer: Layer, spatial, examples: int) -> float:
    """Estimated cost of the patch Gram over that of the shift Gram, for a
    layer that :func:`_shifts_apply` to, on ``examples`` input maps of
    ``spatial`` positions (per channel pair: multiply-adds, plus the shift
    Gram's per-batch block assembly)."""
    ext = []
    for n, (lo, hi), k in zip(spatial, layer.padding, layer.kernel_size, strict=True):
        padded = n + lo + hi
        out = padded - k + 1
        inner = range(max(lo, 0), padded - max(hi, 0))
        border = sum(1 for y in inner if not k - 1 <= y < out)
        ext.append((out, len(inner) + border))
    shifts = ((2 * layer.kernel_size[0] - 1) * (2 * layer.kernel_size[1] - 1) + 1) // 2
    patch = layer.taps**2 * ext[0][0] * ext[1][0] * examples
    shift = shifts * ext[0][1] * ext[1][1] * examples + _ASSEMBLY_MACS * layer.taps**2
    return patch / shift


def _shift_gram(layer: Layer, xp, xpw, precision):
    """Patch Gram of a stride-1 conv from shifted products of its input map.

    Block ``(t, t')`` of the Gram sums ``xpw[u] ⊗ xp[u + δ]`` (``δ = t' − t``)
    over the window ``W_t`` of positions ``u`` that kernel offset ``t`` sees.
    The ``taps²`` blocks share only ``(2k−1)²`` shifts (half of them by
    symmetry), and the windows of one shift differ only in a few border rows
    and columns. So per shift one GEMM sums over every position where
    ``xpw`` can be non-zero (``Y × X``: the input, not the padding), and
    small GEMMs over the border rows, the border columns and their crossings
    take away what a window leaves out (inclusion-exclusion):
    ``Σ_{W_t} = Σ_{Y×X} − Σ_{(Y∖W_y)×X} − Σ_{Y×(X∖W_x)} + Σ_{(Y∖W_y)×(X∖W_x)}``.
    A 3×3 conv thus costs ~13 products per position instead of the patch
    Gram's 81, all as GEMMs contracting over examples and positions.
    ``xp``: the padded input ``[N, Hp, Wp, C]``; ``xpw``: the same weighted
    per example.
    """
    ky, kx = layer.kernel_size
    _, hp, wp, c = xp.shape
    ho, wo = hp - ky + 1, wp - kx + 1
    deltas = [
        (dy, dx) for dy in range(-(ky - 1), ky) for dx in range(-(kx - 1), kx) if (dy, dx) >= (0, 0)
    ]
    # Where xpw can be non-zero: inside the padding (a negative pad crops).
    (y0, y1), (x0, x1) = (
        (max(lo, 0), n - max(hi, 0)) for (lo, hi), n in zip(layer.padding, (hp, wp), strict=True)
    )
    # Zero margins let every shift read one [Y, X] range; the margins only
    # meet offset pairs that do not exist.
    big = jnp.pad(xp, ((0, 0), (ky - 1, ky - 1), (kx - 1, kx - 1), (0, 0)))
    xs = xpw[:, y0:y1, x0:x1]
    shifted = jnp.stack(
        [
            big[:, ky - 1 + dy + y0 : ky - 1 + dy + y1, kx - 1 + dx + x0 : kx - 1 + dx + x1]
            for dy, dx in deltas
        ],
        axis=3,
    )  # [N, |Y|, |X|, E, C]: one GEMM operand
    # Border rows/columns: outside the window of at least one offset
    # (indices relative to Y and X); out_y[a]: those outside offset a's.
    ey = [y - y0 for y in range(y0, y1) if not ky - 1 <= y < ho]
    ex = [x - x0 for x in range(x0, x1) if not kx - 1 <= x < wo]
    out_y = [[i for i, y in enumerate(ey) if not a <= y0 + y < a + ho] for a in range(ky)]
    out_x = [[j for j, x in enumerate(ex) if not a <= x0 + x < a + wo] for a in range(kx)]
    full = gram_einsum("nyxc,nyxed->ecd", xs, shifted, precision)
    if ey:
        iy = np.asarray(ey)
        rows = gram_einsum("nyxc,nyxed->eycd", xs[:, iy], shifted[:, iy], precision)
    if ex:
        ix = np.asarray(ex)
        cols = gram_einsum("nyxc,nyxed->excd", xs[:, :, ix], shifted[:, :, ix], precision)
    if ey and ex:
        pts = gram_einsum(
            "nyxc,nyxed->eyxcd", xs[:, iy][:, :, ix], shifted[:, iy][:, :, ix], precision
        )

    def window_sum(e, ay, ax):
        # Written out per block (not as selection matmuls), so that XLA
        # fuses each block into one elementwise pass.
        b = full[e]
        for i in out_y[ay]:
            b = b - rows[e, i]
        for j in out_x[ax]:
            b = b - cols[e, j]
        for i, j in itertools.product(out_y[ay], out_x[ax]):
            b = b + pts[e, i, j]
        return b

    # Block (t, t') is the window sum of offset t at shift t' − t; a pair
    # with a negative shift is the transpose of its mirror.
    index = {d: e for e, d in enumerate(deltas)}
    taps = ky * kx
    cache: dict[tuple[int, int, int], jax.Array] = {}
    blocks: list[jax.Array] = []
    for t, t2 in itertools.product(range(taps), repeat=2):
        (ay, ax), (by, bx) = divmod(t, kx), divmod(t2, kx)
        d = (by - ay, bx - ax)
        neg = d < (0, 0)
        key = (index[(-d[0], -d[1])], by, bx) if neg else (index[d], ay, ax)
        if key not in cache:
            cache[key] = window_sum(*key)
        blocks.append(cache[key].T if neg else cache[key])
    tiled = jnp.stack(blocks).reshape(taps, taps, c, c)
    g = tiled.transpose(2, 0, 3, 1).reshape(c * taps, c * taps)  # channel-major rows and columns
    if layer.bias:
        sums = jnp.stack([w.sum((0, 1, 2)) for w in _windows(layer, xpw, (ho, wo))], 1).reshape(-1)
        g = jnp.concatenate([g, sums[None]], axis=0)
        g = jnp.concatenate([g, jnp.append(sums, 0.0)[:, None]], axis=1)
    return g
