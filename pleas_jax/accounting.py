"""Compute and parameter accounting of partially merged models.

A merged group of ``n`` units at ratio ``r`` has ``n_m = n - s`` merged units,
``s = n_separate(n, r)`` A-only units and ``s`` B-only units
(:func:`pleas_jax.partial.n_separate`). In a merged conv/dense layer, merged
outputs read every input, A-only outputs read ``[merged | A-only]`` inputs and
B-only outputs ``[merged | B-only]`` (:func:`pleas_jax.models.block_apply`
computes exactly these blocks). A layer whose input group has ``N_i`` units
(``s_i`` separate) and output group ``N_o`` (``s_o``) therefore costs, per
kernel tap and output position,

    n_m_o (n_m_i + 2 s_i) + 2 s_o (n_m_i + s_i) = (N_o + s_o)(N_i + s_i) - 2 s_o s_i

multiply-adds. Axes outside every group (image channels, a shared classifier's
classes) count as merged (``s = 0``). At ``r = 0`` everywhere this is the source
model; at ``r = 1`` everywhere it is exactly twice the source model: the merged
stem reads the shared image once per model, and the shared classifier reads
both models' features, so all-``r = 1`` is the ensemble, whose conv + dense
compute is 2x. The **budget** ``B`` of an allocation is its compute relative to
one source model (:func:`relative_compute`), so ``B`` lies in ``[1, 2]``;
:mod:`pleas_jax.budget` chooses the per-group ratios for a given ``B``.

**Why analytic.** The counts come from the formula above applied to a table of
the *source* model's layers (:func:`pleas_jax.layer_shapes.layer_table`: kernel shapes, strides,
padding and dilation read from a jaxpr of one traced forward pass; nothing is
compiled or run). So they are exact integers for any ratios without building the
merged model, cheap enough for the ratio solvers to evaluate many times, and
independent of backend and fusion. :func:`xla_flops` is the cross-check: XLA's
cost analysis of a real merged model.

**What is counted.** :func:`macs` counts the multiply-adds of conv and dense
kernels only, per image (bias adds, BatchNorm, activations and pooling are not
in it, as in the usual GMACs figures). By default every kernel tap at every
output position counts, padding included: the convention of published figures
(torchvision's ResNet-18 at 224 px: 1.814 GMACs, ResNet-50: 4.089) and what
dense accelerator kernels compute. ``count_padding=False`` counts only the taps
that read real input, which is what XLA's cost analysis counts, so
``2 * macs(..., count_padding=False)`` is the figure to compare with
:func:`xla_flops` (which adds BatchNorm, ReLU, residual sums and pooling: under
1% for ResNets). Parameters (:func:`params`) are counted both as stored
(zero cross blocks included) and as possibly non-zero.

Example::

    table = layer_table(model, variables, spec, (224, 224, 3))
    macs(table, spec, 0.0)                           # one source model
    relative_compute(table, spec, 1.0)               # 2.0: the ensemble
    params(table, spec, 0.5).nonzero
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax import tracing

# The table is re-exported: ``accounting.layer_table`` is the one of
# :mod:`pleas_jax.layer_shapes`.
from pleas_jax.layer_shapes import Layer, LayerTable, image_shape, layer_table
from pleas_jax.partial import n_separate

__all__ = [
    "Layer",
    "LayerTable",
    "ParamCount",
    "Ratios",
    "layer_table",
    "macs",
    "params",
    "relative_compute",
    "separate_units",
    "xla_flops",
]

Ratios = Mapping[str, float] | float


# --------------------------------------------------------------------- counts
def separate_units(spec: Mapping[str, Any], ratios: Ratios) -> dict[str, int]:
    """Units of each model kept separate per group: ``n_separate(n_g, r_g)``.

    ``ratios`` is one ratio for every group or a dict with exactly the spec's
    groups. Raises ``ValueError`` for a ratio outside ``[0, 1]`` (naming the
    group), a missing group or an unknown one.
    """
    if isinstance(ratios, int | float | np.floating | np.integer):
        ratios = dict.fromkeys(spec, float(ratios))
    missing = [g for g in spec if g not in ratios]
    unknown = [g for g in ratios if g not in spec]
    if missing or unknown:
        raise ValueError(
            f"ratios must name every group of the spec: missing {missing}, unknown {unknown}"
        )
    out = {}
    for g, group in spec.items():
        r = float(ratios[g])
        if not 0.0 <= r <= 1.0:  # also rejects NaN
            raise ValueError(f"the ratio of group {g!r} must lie in [0, 1], got {ratios[g]}")
        out[g] = n_separate(group.size, r)
    return out


class _Compute:
    """Vectorised conv + dense multiply-adds as a function of the separate units.

    ``s`` is ``[G]`` separate units per group in ``self.groups`` order (ints
    for exact counts, floats for the continuous relaxation the ratio solvers
    of :mod:`pleas_jax.budget` use).
    """

    def __init__(self, table: LayerTable, spec: Mapping[str, Any], count_padding: bool):
        self.spec = spec
        self.groups = list(spec)
        self.sizes = np.array([spec[g].size for g in self.groups], np.int64)
        index: dict[str | None, int] = {g: i for i, g in enumerate(self.groups)}
        G = len(self.groups)
        for la in table.layers:
            for g in (la.in_group, la.out_group):
                if g is not None and g not in index:
                    raise ValueError(f"layer {la.name} has group {g!r}, which the spec lacks")
        # Index G is a dummy group that never has separate units.
        self.i = np.array([index.get(la.in_group, G) for la in table.layers], np.int64)
        self.o = np.array([index.get(la.out_group, G) for la in table.layers], np.int64)
        self.ci = np.array([la.c_in for la in table.layers], np.int64)
        self.co = np.array([la.c_out for la in table.layers], np.int64)
        self.taps = np.array(
            [la.taps if count_padding else la.valid_taps for la in table.layers], np.int64
        )
        self.base = int(self(np.zeros(G, np.int64)))

    def _ext(self, s):
        return np.append(s, np.zeros(1, np.asarray(s).dtype))

    def __call__(self, s):
        e = self._ext(s)
        si, so = e[self.i], e[self.o]
        # Merged outputs (co - so) read all ci + si inputs; each model's so
        # separate outputs read its ci inputs: (co + so)(ci + si) - 2 so si.
        return np.sum(self.taps * ((self.co + so) * (self.ci + si) - 2 * so * si))

    def grad(self, s):
        """``d compute / d s_g``, ``[G]``."""
        e = self._ext(np.asarray(s, np.float64))
        si, so = e[self.i], e[self.o]
        out = np.zeros(len(self.groups) + 1)
        np.add.at(out, self.i, self.taps * (self.co + so - 2 * so))
        np.add.at(out, self.o, self.taps * (self.ci + si - 2 * si))
        return out[:-1]

    def separate(self, ratios: Ratios) -> np.ndarray:
        sep = separate_units(self.spec, ratios)
        return np.array([sep[g] for g in self.groups], np.int64)


def macs(
    table: LayerTable, spec: Mapping[str, Any], ratios: Ratios, *, count_padding: bool = True
) -> int:
    """Conv + dense multiply-adds of the merged model, per image.

    Args:
      table: from :func:`layer_table`.
      spec: the permutation spec the table was built with.
      ratios: per-group ratios (or one for all); ``0.0`` gives the source model.
      count_padding: count kernel taps that fall on padding (the convention of
        published GMACs); ``False`` counts what XLA's cost analysis counts.

    Returns:
      the exact integer count (bias adds not included).
    """
    comp = _Compute(table, spec, count_padding)
    return int(comp(comp.separate(ratios)))


def relative_compute(
    table: LayerTable, spec: Mapping[str, Any], ratios: Ratios, *, count_padding: bool = True
) -> float:
    """The budget ``B`` an allocation spends: ``macs(ratios) / macs(0)``, in ``[1, 2]``."""
    base = macs(table, spec, 0.0, count_padding=count_padding)
    return macs(table, spec, ratios, count_padding=count_padding) / base


class ParamCount(NamedTuple):
    """Parameters of a merged model (the ``params`` collection; BatchNorm running
    statistics are not parameters).

    Attributes:
      stored: entries of the merged variables, the zero A-only <-> B-only cross
        blocks of kernels included (what a checkpoint holds).
      nonzero: ``stored`` less those cross blocks (what can be non-zero).
    """

    stored: int
    nonzero: int


def params(table: LayerTable, spec: Mapping[str, Any], ratios: Ratios) -> ParamCount:
    """Parameter counts of the merged model at ``ratios`` (see :class:`ParamCount`)."""
    sep = separate_units(spec, ratios)
    stored = nonzero = 0
    for _, shape, groups in table.params:
        dims = list(shape)
        for ax, g in groups.items():
            dims[ax] = shape[ax] + sep[g]
        n = math.prod(dims)
        stored += n
        if len(groups) == 2:
            (ax1, g1), (ax2, g2) = sorted(groups.items())
            # A-only x B-only and B-only x A-only blocks stay zero.
            other = n // (dims[ax1] * dims[ax2])
            n -= other * 2 * sep[g1] * sep[g2]
        nonzero += n
    return ParamCount(stored, nonzero)


# ------------------------------------------------------------------------ XLA
def xla_flops(
    module, variables: Mapping[str, Any], input_shape: Sequence[int], *, compiled: bool = False
) -> float:
    """FLOPs of ``module.apply(variables, x)`` per image, by XLA's cost analysis.

    The function is lowered with ``variables`` as arguments (so nothing is
    constant-folded) and never run. XLA counts 2 FLOPs per multiply-add of a
    conv / dot (only taps that read real input: compare with
    ``2 * macs(..., count_padding=False)``) and one per element of every other
    arithmetic op (BatchNorm, ReLU, residual sums, pooling), which adds well
    under 1% to a ResNet.

    Args:
      module, variables: the model (e.g. a merged one from
        :func:`pleas_jax.partial.partial_merge`).
      input_shape: ``(H, W, C)`` (one image) or ``(N, H, W, C)`` (divided by N).
      compiled: analyse the program compiled for the default backend instead
        of the program as lowered. Convs and dots cost the same in both, but
        backend fusion may duplicate cheap elementwise producers (BatchNorm,
        ReLU) into each of their consumers and count them once per copy; a
        block-structured layer slices its input several times, so a merged
        model's compiled count exceeds its lowered one by a few percent on CPU.

    Returns:
      FLOPs per image (float).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    image_shape(shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    key = tracing.signature(module, variables, x, compiled=compiled)
    return tracing.cached("xla_flops", key, lambda: _xla_flops(module, variables, x, compiled))


def _xla_flops(module, variables, x, compiled: bool) -> float:
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), variables
    )
    lowered = jax.jit(lambda v, x: module.apply(v, x)).lower(abstract, x)
    cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
    # Older jax returns one dict per computation.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA's cost analysis reports no 'flops' for this program")
    return float(cost["flops"]) / x.shape[0]
