"""Budget -> per-group ratios: how much of each group a merged model keeps separate.

A budget ``B`` is the compute of a partially merged model relative to one
source model, in ``[1, 2]`` (1: fully merged, 2: the ensemble). How compute
and parameters are counted is :mod:`pleas_jax.accounting`; its names
(:func:`layer_table`, :func:`macs`, :func:`relative_compute`, :func:`params`,
:func:`xla_flops`, ...) are re-exported here.

Merging an isolated group saves nothing: a merged layer between two separate
ones reads both models' inputs, or feeds both models' outputs. Savings come from
runs of adjacent merged groups, which is why allocations differ so much.

Budget -> ratios: :func:`uniform_ratios` (one ratio for every group),
:func:`zip_ratios` (the first ``k`` stages merged, the rest separate, as in
ZipIt!'s partial zipping) and :func:`optimized_ratios` (most sensitive groups
kept separate first, under the budget); :func:`ratios_for_budget` dispatches.
:func:`align_ratios` rounds the separate counts down to hardware-friendly
multiples.

Example::

    table = layer_table(model, variables, spec, (224, 224, 3))
    macs(table, spec, 0.0)                           # one source model
    ratios = uniform_ratios(table, spec, 1.5)
    relative_compute(table, spec, ratios)            # <= 1.5, as close as rounding allows
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.optimize

# The accounting, re-exported: ``budget.macs`` etc. are the same objects.
from pleas_jax.accounting import (
    Layer,
    LayerTable,
    ParamCount,
    Ratios,
    _Compute,
    layer_table,
    macs,
    params,
    relative_compute,
    separate_units,
    xla_flops,
)
from pleas_jax.partial import n_separate

__all__ = [
    "METHODS",
    "align_ratios",
    "check_multiple",
    "Layer",
    "LayerTable",
    "ParamCount",
    "Ratios",
    "layer_table",
    "macs",
    "optimized_ratios",
    "params",
    "ratios_for_budget",
    "relative_compute",
    "sensitivity_from_costs",
    "separate_units",
    "stage_of_layer",
    "uniform_ratios",
    "xla_flops",
    "zip_budgets",
    "zip_ratios",
    "zip_ratios_for_budget",
]


def _check_budget(budget: float) -> float:
    b = float(budget)
    if not 1.0 <= b <= 2.0:  # also rejects NaN
        raise ValueError(
            f"a budget is compute relative to one source model and must lie in [1, 2], got {budget}"
        )
    return b


def _as_ratios(groups, sizes, s) -> dict[str, float]:
    # k / n rounds back to exactly k units under n_separate.
    return {g: float(k) / float(n) for g, n, k in zip(groups, sizes, s, strict=True)}


# ------------------------------------------------------------------- uniform
def uniform_ratios(
    table: LayerTable, spec: Mapping[str, Any], budget: float, *, count_padding: bool = True
) -> dict[str, float]:
    """One ratio for every group, the largest whose compute stays within ``budget``.

    Compute is a step function of a shared ratio r (each group's separate units
    ``floor(r n + 1/2)`` jump at ``r = (k - 1/2) / n``), so the answer is exact:
    the allocation spends at most ``budget`` and the next step up would spend
    more. Within its step, r is the middle of the step (0 and 1 at the ends).

    Returns:
      group -> r (the same r for all).
    """
    b = _check_budget(budget)
    comp = _Compute(table, spec, count_padding)
    limit = b * comp.base
    steps = np.unique(
        np.concatenate([(np.arange(1, n + 1) - 0.5) / n for n in comp.sizes] or [np.zeros(0)])
    )
    # Representatives of the intervals [0, steps[0]), [steps[0], steps[1]), ..., [steps[-1], 1].
    reps = (
        np.concatenate([[0.0], (steps[:-1] + steps[1:]) / 2, [1.0]]) if len(steps) else np.zeros(1)
    )

    def cost(r):
        return comp(np.array([n_separate(int(n), float(r)) for n in comp.sizes], np.int64))

    lo, hi = 0, len(reps) - 1  # cost(reps[0]) = base <= limit
    if cost(reps[hi]) <= limit:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(reps[mid]) <= limit:
            lo = mid
        else:
            hi = mid
    return dict.fromkeys(spec, float(reps[lo]))


# ----------------------------------------------------------------------- zip
_BLOCK = re.compile(r"^layer(\d+)_(\d+)(/|$)")


def stage_of_layer(name: str) -> tuple[int, int] | None:
    """``(stage, block)`` of a layer of our ResNets from its name.

    ``"layer3_1/conv2" -> (3, 1)``; the stem (``"conv1"``) belongs to the first
    block of stage 1, whose residual stream it writes; the classifier and
    anything else outside the stages -> ``None``.
    """
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    if name in ("conv1", "bn1"):
        return (1, 0)
    return None


def _zip_units(table: LayerTable, spec, unit: str, stage_of) -> tuple[list, dict[str, int]]:
    """Ordered units and, per group, the index of the last unit that writes it."""
    if unit not in ("stage", "block"):
        raise ValueError(f"unit must be 'stage' or 'block', got {unit!r}")
    key_of = {}
    for la in table.layers:
        pos = stage_of(la.name)
        if pos is not None:
            key_of[la.name] = pos[0] if unit == "stage" else tuple(pos)
    units = sorted(set(key_of.values()))
    rank = {u: i for i, u in enumerate(units)}
    last: dict[str, int] = {}
    readers: dict[str, int] = {}
    for la in table.layers:
        if la.name not in key_of:
            continue
        r = rank[key_of[la.name]]
        if la.out_group is not None:
            last[la.out_group] = max(last.get(la.out_group, -1), r)
        if la.in_group is not None:
            readers[la.in_group] = min(readers.get(la.in_group, len(units)), r)
    for g in spec:
        if g not in last:
            if g not in readers:
                raise ValueError(f"no layer inside the stages writes or reads group {g!r}")
            last[g] = readers[g]  # written by no conv: belongs where it is first read
    return units, last


def zip_ratios(
    table: LayerTable,
    spec: Mapping[str, Any],
    k: int,
    *,
    unit: str = "stage",
    stage_of: Callable[[str], tuple[int, int] | None] = stage_of_layer,
) -> dict[str, float]:
    """ZipIt!'s partial zipping: the first ``k`` units merged, the rest separate.

    A unit is a stage (``"layer{s}_*"``, the stem with stage 1) or, with
    ``unit="block"``, a residual block. A group is merged (r = 0) when every
    layer that writes it lies in the first ``k`` units, else fully separate
    (r = 1): a residual stream is merged only with its whole stage. ``k = 0``
    is the ensemble (budget 2), ``k`` = number of units the fully merged model.

    Returns:
      group -> 0.0 or 1.0.
    """
    units, last = _zip_units(table, spec, unit, stage_of)
    if not 0 <= int(k) <= len(units) or int(k) != k:
        raise ValueError(f"k must be an integer in [0, {len(units)}] ({unit}s), got {k}")
    return {g: 0.0 if last[g] < k else 1.0 for g in spec}


def zip_budgets(
    table: LayerTable,
    spec: Mapping[str, Any],
    *,
    unit: str = "stage",
    stage_of: Callable[[str], tuple[int, int] | None] = stage_of_layer,
    count_padding: bool = True,
) -> list[tuple[int, float]]:
    """``(k, budget)`` of every zip allocation, ``k = 0 .. units``; budgets fall with k."""
    units, _ = _zip_units(table, spec, unit, stage_of)
    return [
        (
            k,
            relative_compute(
                table,
                spec,
                zip_ratios(table, spec, k, unit=unit, stage_of=stage_of),
                count_padding=count_padding,
            ),
        )
        for k in range(len(units) + 1)
    ]


def zip_ratios_for_budget(
    table: LayerTable,
    spec: Mapping[str, Any],
    budget: float,
    *,
    unit: str = "stage",
    stage_of: Callable[[str], tuple[int, int] | None] = stage_of_layer,
    count_padding: bool = True,
) -> dict[str, float]:
    """The zip allocation that spends the most compute within ``budget``: the
    fewest merged units ``k`` whose budget is at most ``budget``."""
    b = _check_budget(budget)
    for k, spent in zip_budgets(
        table, spec, unit=unit, stage_of=stage_of, count_padding=count_padding
    ):
        if spent <= b * (1 + 1e-12):
            return zip_ratios(table, spec, k, unit=unit, stage_of=stage_of)
    raise AssertionError("unreachable: the fully merged model spends budget 1")


# ----------------------------------------------------------------- optimized
def sensitivity_from_costs(
    spec: Mapping[str, Any],
    perm: Mapping[str, Any],
    costs: Mapping[str, Any],
    *,
    reference: Mapping[str, float] | float | None = None,
) -> dict[str, float]:
    """Per-unit sensitivity of each group to merging, from its matching scores.

    For group g with matched scores ``m_i = costs[g][i, perm[g][i]]`` (higher is
    better), the deficit of pair i is ``(ref - m_i) / (ref - mean(costs[g]))``:
    0 for a pair as good as the reference, 1 for a pair no better than a random
    pairing (the mean of all scores). The sensitivity is the mean deficit over
    the group's pairs, clipped at 0: the share of alignment a merged unit of the
    group loses on average. Scale- and shift-free, so groups observed at
    different numbers of points, or matched by distance, correlation or inner
    product, compare.

    Args:
      spec, perm, costs: as from :func:`pleas_jax.weight_matching` or
        :func:`pleas_jax.activation_matching` (``costs[g] [n, n]``).
      reference: the score of a perfectly aligned pair, per group or for all;
        by default each group's best matched score (which makes a group whose
        pairs are all equally good, however good, insensitive: pass e.g. the
        number of observation points for summed correlations to measure
        absolute deficits).

    Returns:
      group -> sensitivity ``w_g >= 0`` (1.0 where all scores are equal: no
      evidence of alignment).
    """
    out = {}
    for g, group in spec.items():
        c = np.asarray(costs[g], np.float64)
        p = np.asarray(perm[g], np.int64)
        if c.shape != (group.size, group.size) or p.shape != (group.size,):
            raise ValueError(
                f"group {g!r}: costs {c.shape} / perm {p.shape} do not fit its {group.size} units"
            )
        matched = c[np.arange(group.size), p]
        if reference is None:
            ref = float(matched.max())
        else:
            ref = float(reference[g] if isinstance(reference, Mapping) else reference)
        spread = ref - float(c.mean())
        if not spread > 0:
            out[g] = 1.0
            continue
        out[g] = float(np.mean(np.maximum((ref - matched) / spread, 0.0)))
    return out


def _check_weights(spec, weights) -> np.ndarray:
    if not isinstance(weights, Mapping):
        weights = dict.fromkeys(spec, float(weights))
    missing = [g for g in spec if g not in weights]
    unknown = [g for g in weights if g not in spec]
    if missing or unknown:
        raise ValueError(f"weights must name every group: missing {missing}, unknown {unknown}")
    w = np.array([float(weights[g]) for g in spec])
    bad = [g for g, v in zip(spec, w, strict=True) if not (np.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and non-negative; bad for {bad}")
    return w


def _round_feasible(comp: _Compute, w: np.ndarray, r: np.ndarray, limit: float) -> np.ndarray:
    """Integer separate units near ``r * n`` within ``limit``, then filled greedily.

    Units are taken off (least weight per unit of compute first) while over the
    limit, then added (most weight per unit of compute first) while one fits.
    """
    n = comp.sizes
    s = np.clip(np.floor(r * n + 1e-9), 0, n).astype(np.int64)
    G = len(n)
    eye = np.eye(G, dtype=np.int64)

    def deltas(sign):
        now = comp(s)
        return np.array([comp(s + sign * eye[g]) - now for g in range(G)], np.float64)

    while comp(s) > limit:
        d = -deltas(-1)  # compute saved by removing a unit
        ok = (s > 0) & (d > 0)
        # Cheapest objective loss per compute saved; ties -> first group.
        score = np.where(ok, w / np.where(d > 0, d, 1.0), np.inf)
        s[int(np.argmin(score))] -= 1
    while True:
        d = deltas(+1)
        now = comp(s)
        ok = (s < n) & (w > 0) & (now + d <= limit)
        if not ok.any():
            return s
        score = np.where(ok, w / np.maximum(d, 1e-300), -np.inf)
        s[int(np.argmax(score))] += 1


def _greedy_start(comp: _Compute, w: np.ndarray, limit: float) -> np.ndarray:
    """Continuous greedy: open groups fully, best weight per compute first."""
    n = comp.sizes.astype(np.float64)
    r = np.zeros(len(n))
    open_ = w > 0
    while open_.any():
        grad = comp.grad(r * n) * n  # compute per unit of ratio
        score = np.where(open_, w * n / np.maximum(grad, 1e-300), -np.inf)
        g = int(np.argmax(score))
        open_[g] = False
        trial = r.copy()
        trial[g] = 1.0
        if comp(trial * n) <= limit:
            r = trial
            continue

        # The budget binds inside this group: compute is monotone in r_g.
        def excess(x, g=g, r=r):
            return comp(np.where(np.arange(len(n)) == g, x, r) * n) - limit

        if excess(0.0) < 0:
            r[g] = scipy.optimize.brentq(excess, 0.0, 1.0, xtol=1e-12)
        # The budget is spent (brentq's root may even lie a hair past it, so a
        # next group would have no sign change to search).
        break
    return r


def optimized_ratios(
    table: LayerTable,
    spec: Mapping[str, Any],
    budget: float,
    weights: Mapping[str, float] | float,
    *,
    count_padding: bool = True,
    maxiter: int = 500,
) -> dict[str, float]:
    """Per-group ratios that keep the most sensitive units separate within ``budget``.

    Maximises ``sum_g w_g s_g`` (``s_g = r_g n_g`` separate units, ``w_g`` the
    per-unit sensitivity, e.g. :func:`sensitivity_from_costs`) subject to
    ``macs <= budget * macs(source)`` and ``0 <= r_g <= 1``. The constraint is
    quadratic (a layer's cost grows with both its input and output widths), so
    the continuous problem is solved with scipy's SLSQP from two deterministic
    starts (the uniform allocation and a greedy one); each solution is rounded
    to whole units and repaired / filled greedily so the budget holds exactly,
    and the best of these and the uniform allocation is returned. Deterministic.

    Returns:
      group -> r (each ``k / n_g`` for a whole number k of separate units).
    """
    b = _check_budget(budget)
    w = _check_weights(spec, weights)
    comp = _Compute(table, spec, count_padding)
    n = comp.sizes.astype(np.float64)
    limit = b * comp.base
    uniform = comp.separate(uniform_ratios(table, spec, b, count_padding=count_padding))
    candidates = [uniform]
    if w.any():
        scale = float(np.sum(w * n))

        def objective(r):
            return -float(np.dot(w * n, r)) / scale

        def objective_grad(r):
            return -(w * n) / scale

        cons = {
            "type": "ineq",
            "fun": lambda r: (limit - comp(r * n)) / comp.base,
            "jac": lambda r: -(comp.grad(r * n) * n) / comp.base,
        }
        for start in (uniform / n, _greedy_start(comp, w, limit)):
            res = scipy.optimize.minimize(
                objective,
                start,
                jac=objective_grad,
                bounds=[(0.0, 1.0)] * len(n),
                constraints=[cons],
                method="SLSQP",
                options={"maxiter": maxiter, "ftol": 1e-12},
            )
            r = np.clip(res.x, 0.0, 1.0) if np.all(np.isfinite(res.x)) else start
            candidates.append(_round_feasible(comp, w, r, limit))
            candidates.append(_round_feasible(comp, w, start, limit))
    # Best objective; ties -> the earliest candidate (uniform first).
    best = max(range(len(candidates)), key=lambda i: (float(np.dot(w, candidates[i])), -i))
    return _as_ratios(comp.groups, comp.sizes, candidates[best])


# ----------------------------------------------------------------- alignment
def check_multiple(multiple: Any, name: str = "multiple") -> int:
    """``multiple`` as an int if it is a whole number >= 1, else a ``ValueError``
    naming ``name``."""
    if isinstance(multiple, bool) or not isinstance(multiple, int | np.integer) or multiple < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {multiple!r}")
    return int(multiple)


def align_ratios(
    spec: Mapping[str, Any], ratios: Mapping[str, float], multiple: int
) -> dict[str, float]:
    """Ratios whose separate-unit counts are whole multiples of ``multiple``.

    A group of ``n`` units with ``s`` kept separate gives its layers channel
    blocks ``[n − s | s | s]``; counts like 45 and 19 are slow on hardware
    whose kernels work in lanes of 8. ``bench/run.py --size 96 --budgets 1.5
    --warm`` on this project's CPU: the BatchNorm pass of a merged resnet18
    (its forward over 256 images) took 5.34 s at uniform ratios (blocks such as
    45/19, budget 1.499) and 2.40 s with ``multiple=8`` (48/16, budget 1.450);
    the whole merge 40.5 s and 33.9 s.

    Each count is rounded *down* to a multiple (a fully separate group keeps
    all ``n``), so compute and parameters never grow and the result stays
    within any budget the input met; with ``n`` a multiple too, all three
    blocks are aligned.

    Args:
      spec: permutation spec (group -> ``Group(size, axes)``).
      ratios: group -> r in [0, 1].
      multiple: lane width, at least 1 (1 changes nothing).

    Returns:
      group -> ``k / n`` with ``k`` the aligned count (exact under
      :func:`pleas_jax.partial.n_separate`).
    """
    multiple = check_multiple(multiple)
    out = {}
    for g, s in separate_units(spec, ratios).items():  # checks the ratios
        n = int(spec[g].size)
        k = s if s == n else s - s % multiple
        out[g] = float(k) / float(n) if n else 0.0
    return out


# ---------------------------------------------------------------- dispatcher
METHODS = ("uniform", "zip", "optimized")


def ratios_for_budget(
    method: str,
    table: LayerTable,
    spec: Mapping[str, Any],
    budget: float,
    *,
    weights: Mapping[str, float] | float | None = None,
    count_padding: bool = True,
    **kwargs: Any,
) -> dict[str, float]:
    """Per-group ratios for ``budget`` by ``method``: ``"uniform"``
    (:func:`uniform_ratios`), ``"zip"`` (:func:`zip_ratios_for_budget`, extra
    ``unit=``) or ``"optimized"`` (:func:`optimized_ratios`, needs ``weights``)."""
    _check_budget(budget)
    if method == "uniform":
        return uniform_ratios(table, spec, budget, count_padding=count_padding, **kwargs)
    if method == "zip":
        return zip_ratios_for_budget(table, spec, budget, count_padding=count_padding, **kwargs)
    if method == "optimized":
        if weights is None:
            raise ValueError("the optimized allocation needs per-group weights (sensitivities)")
        return optimized_ratios(table, spec, budget, weights, count_padding=count_padding, **kwargs)
    raise ValueError(f"unknown ratio method {method!r}; choose from {', '.join(METHODS)}")
