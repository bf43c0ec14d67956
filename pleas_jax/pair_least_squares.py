"""Least squares for every budget and matching from one pass over the data.

A merged layer's regression inputs X̃ and targets Ỹ are a fixed linear map of
the two source models' features (:func:`pleas_jax.partial.combine`): along a
grouped axis of n units, a merged channel averages A's unit ``merged_a[j]``
and B's unit ``merged_b[j]``, a separate channel copies one unit. Write
``F = [A's n | B's n]`` for the *full coordinates* of the axis (the budget-2
layout with identity matching) and ``S [2n, width]`` for the selection (two
non-zeros of 1/2 per merged column, one 1 per separate column); an axis
outside every group (image channels, a shared classifier's classes) is the
models' average in every merge, so its full coordinates are that average.
Then ``X̃ = X_F S_in`` and ``Ỹ = Y_F S_out``, so

    G = S_inᵀ G_F S_in,   C = S_inᵀ C_F S_out,   Σ Ỹ² = diag(S_outᵀ T_F S_out)

with ``G_F = Σ X_Fᵀ X_F``, ``C_F = Σ X_Fᵀ Y_F``, ``T_F = Σ Y_Fᵀ Y_F`` taken once
(:func:`pair_statistics`; for a conv, ``S_in`` acts on channels and the patch
taps ride along). Every budget, ratio allocation and matching of the pair is
then a gather of those sums, and its solve is the one of
:mod:`pleas_jax.least_squares` (three ridge regressions per layer, centred on
the partial-merge weights W0).

Shapes are padded up to the next eighth of the full coordinates (a merged
axis never has more than ``2n`` channels): the layer's projection, and each
output block's system on its own allowed rows and columns (padded rows solve
against the identity, padded columns are dropped). Each layer then compiles
for a few shapes, reused by every later merge of the pair and of any pair of
the same architecture. Padding everything to the full size would compile once
per layer, but a budget-1 merge (half the full width) would factorise eight
times the volume it needs, and every block would solve for every column:
measured on this project's 2-core CPU with full-width ResNet-18s at 64 px, a
fit took 88.7 s at budget 1.0 and 128 s at 1.5 that way, against 7.1 s and
21.4 s now. The gradient mode runs every layer in one compiled scan, so there
the full size (one compilation for a whole grid) is kept.
:mod:`pleas_jax.pair_problems` builds these padded problems on the host.

Costs and precision, against per-merge statistics
(:func:`pleas_jax.least_squares.layer_statistics`): the full Grams are those
of a budget-2 merge, four times the budget-1 Gram, in memory and in the one
pass that accumulates them; the residual of W0 is formed from the sums
(``G W0 − C``) instead of from the features, so its fp32 round-off scales with
the targets' energy rather than with the residual. Measured on random
width-8 ResNet-20s (tests/test_pair_least_squares.py): at budget 2 the merged
logits stay within 6e-5 of the logit scale of the ensemble, and at budgets
between they differ from the per-merge solution by at most 1.6e-4. For one
merge, per-merge statistics are cheaper; for a sweep, these are.

Example::

    stats = pair_statistics(module, va, module, vb, spec, batches)
    for budget in (1.0, 1.5):
        ...  # matching, ratios, blocks, partial merge
        merged, report = fit(stats, blocks, merged_variables)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pleas_jax import distributed

# Names, not the module: the package re-exports the function least_squares
# under the module's name.
from pleas_jax.least_squares import (
    DEFAULT_MAX_MEMORY_BYTES,
    MODES,
    RIDGE_CENTRES,
    Layer,
    StatisticsOverBound,
    apply_solution,
    layer_statistics,
    memory_chunks,
    memory_report,
)
from pleas_jax.ls_data import Batches
from pleas_jax.ls_solve import SOLVERS, _cholesky_solve, _pinv_solve, first_solver, on_one_device
from pleas_jax.pair_problems import _from_matrix, _problem
from pleas_jax.partial import GroupBlocks
from pleas_jax.tree import to_dict

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class PairStatistics:
    """Full-coordinate sums of a pair of source models over some data.

    Attributes:
      layers: layer name -> :class:`pleas_jax.least_squares.Layer` in full
        coordinates (grouped axes ``(0, n, n)``, ungrouped ``(n, 0, 0)``).
      sums: layer name -> ``{"gram": [D, D], "cross": [D, K], "target_gram":
        [K, K], "count": []}`` with ``D`` the full patch dimension (+1 for a
        bias) and ``K`` the full output channels.
      group_sizes: group -> units, to check a merge's blocks against.
      memory: the pass that took the sums, as
        :func:`pleas_jax.least_squares.memory_report` describes it
        (``"chunks"``, ``"passes"``, ``"peak_statistics_bytes"``, ...).
      models: :func:`models_fingerprint` of the source models (A, B in that
        order), which a merge reusing the sums checks its models against.
    """

    layers: dict[str, Layer]
    sums: dict[str, dict[str, Any]]
    group_sizes: dict[str, int]
    memory: dict[str, Any] | None = None
    models: tuple[float, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Device memory the sums hold."""
        return sum(int(v.nbytes) for s in self.sums.values() for v in s.values())


@jax.jit
def _leaf_sums(variables_a, variables_b):
    def leaf(x):
        x = jnp.ravel(x).astype(jnp.float32)
        # Weighted by position too, so that reordered values tell apart.
        w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32))
        return jnp.stack([jnp.sum(x), jnp.sum(x * w)])

    return jax.tree.map(leaf, (variables_a, variables_b))


def models_fingerprint(variables_a, variables_b) -> tuple[float, ...]:
    """Two order-sensitive sums per leaf of both models' variables, in one
    compiled call: equal for the same pair, different for another pair, for
    A and B swapped, or for retrained weights (not a cryptographic hash)."""
    sums = jax.device_get(_leaf_sums(variables_a, variables_b))
    return tuple(float(v) for leaf in jax.tree.leaves(sums) for v in np.ravel(leaf))


def full_coordinate_blocks(spec: Mapping[str, Any]) -> dict[str, GroupBlocks]:
    """Blocks that keep every unit of both models separate in their own order."""
    out = {}
    for g, group in spec.items():
        units = np.arange(group.size)
        out[g] = GroupBlocks(units[:0], units[:0], units, units)
    return out


def pair_statistics(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    batches: Batches,
    *,
    mesh: jax.sharding.Mesh | None = None,
    precision: Any = "highest",
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    progress: bool = False,
) -> PairStatistics:
    """Budget- and matching-independent least-squares sums, one sharded pass
    per chunk of layers.

    Args:
      module_a, variables_a, module_b, variables_b: the source models (B in
        its original unit order).
      spec: their permutation spec.
      batches: images ``[N, H, W, C]`` (or ``(images, labels)``) per batch: a
        list, a callable returning a fresh iterator, or a one-shot iterator
        (only when the sums fit the bound in one chunk).
      max_memory_bytes: bound on the sums one pass accumulates (fp32 bytes);
        layers are split in forward order into chunks that fit, one pass per
        chunk, and with several chunks the sums end up in host memory
        (:func:`pleas_jax.least_squares.layer_statistics`). ``None``: one pass.
      mesh, precision, progress: as for
        :func:`pleas_jax.least_squares.layer_statistics`.

    Returns:
      a :class:`PairStatistics`.

    Raises:
      ValueError: a layer whose full-coordinate sums alone exceed
        ``max_memory_bytes`` (named, with its bytes; raised before any pass),
        or a one-shot iterator where several passes are needed.
    """
    full = full_coordinate_blocks(spec)
    try:
        stats = layer_statistics(
            module_a,
            variables_a,
            module_b,
            variables_b,
            spec,
            full,
            batches,
            mesh=mesh,
            precision=precision,
            target_gram=True,
            max_memory_bytes=max_memory_bytes,
            progress=progress,
        )
    except StatisticsOverBound as e:
        # Per-merge statistics hold one merge's widths and fall back to
        # gradient descent for a layer over the bound; pair statistics cannot.
        raise ValueError(
            f"pair statistics: layer {e.layer} needs {e.nbytes} bytes of full-coordinate sums "
            f"(Gram, cross and target Gram of both models' units), over max_memory_bytes="
            f"{e.bound}; use per-merge statistics (merge(statistics='per_merge'), or "
            "pleas_jax.least_squares.least_squares) or a larger max_memory_bytes"
        ) from None
    layers, sums = {}, {}
    for name, s in stats.items():
        layers[name] = s["layer"]
        sums[name] = {k: s[k] for k in ("gram", "cross", "target_gram", "count")}
    kw = {"init": False, "target_gram": True}
    chunks = memory_chunks(layers, max_memory_bytes, **kw)
    memory = memory_report(layers, chunks, max_memory_bytes, **kw)
    sizes = {g: int(grp.size) for g, grp in spec.items()}
    return PairStatistics(layers, sums, sizes, memory, models_fingerprint(variables_a, variables_b))


# -------------------------------------------------------------------- kernels
def _gather2(m, ri, rw, ci, cw):
    """``Σ_{p,q} rw_p ⊗ cw_q ∘ m[ri_p][:, ci_q]`` (the projection ``SᵀmS'``)."""
    out = 0.0
    for i, wi in zip(ri, rw, strict=True):
        for j, wj in zip(ci, cw, strict=True):
            out = out + (wi[:, None] * wj[None, :]) * m[i[:, None], j[None, :]]
    return out


def _project(sums, rows, cols):
    ri, rw = rows[:2], rows[2:]
    ci, cw = cols[:2], cols[2:]
    gram = _gather2(sums["gram"], ri, rw, ri, rw)
    cross = _gather2(sums["cross"], ri, rw, ci, cw)
    t = sums["target_gram"]
    target_sq = sum(
        wp * wq * t[ip, iq]
        for ip, wp in zip(ci, cw, strict=True)
        for iq, wq in zip(ci, cw, strict=True)
    )
    return gram, cross, target_sq


def _sse(gram, cross, target_sq, w):
    """Per output column ``‖X̃w − ỹ‖²`` from the sums (clamped at 0: round-off)."""
    return _sse_from(jnp.matmul(gram, w, precision=_HI), cross, target_sq, w)


def _sse_from(gw, cross, target_sq, w):
    """:func:`_sse` given ``G w``."""
    per = jnp.sum(w * gw, axis=0) - 2.0 * jnp.sum(w * cross, axis=0) + target_sq
    return jnp.sum(jnp.maximum(per, 0.0))


def _solve_block(gram, r0, pull, blk, ridge, method):
    """One output block's ridge step ``[R, C]`` on its own rows and columns
    (padded rows solve to 0 against the identity; padded columns are 0)."""
    r, rv, c, cv = blk["r"], blk["rv"], blk["c"], blk["cv"]
    g = gram[r[:, None], r[None, :]] * (rv[:, None] * rv[None, :])
    tr = jnp.trace(g)
    lam = jnp.where(tr > 0, ridge * tr / jnp.maximum(jnp.sum(rv), 1.0), 1.0)
    diag = lam * rv + (1.0 - rv)
    rhs = (-r0[r[:, None], c[None, :]] + lam * pull[r[:, None], c[None, :]]) * (
        rv[:, None] * cv[None, :]
    )
    if method == "eigh":
        return _pinv_solve(g + jnp.diag(diag), rhs)
    # Padded rows add 1 to the diagonal, real ones λ: the smaller is the floor.
    floor = jnp.where(ridge > 0, jnp.minimum(lam, 1.0), 0.0)
    return _cholesky_solve(g, diag, rhs, method, floor)


@functools.partial(jax.jit, static_argnames=("centre", "method"))
def _solve_layer(sums, problem, ridge, centre, method):
    """Project the pair sums and solve one layer; returns ``(W, before, after)``
    with W ``[dp, kp]`` and the sums of squared errors of W0 and W."""
    gram, cross, target_sq = _project(sums, problem["rows"], problem["cols"])
    gram = 0.5 * (gram + gram.T)
    w0 = problem["init"]
    gw0 = jnp.matmul(gram, w0, precision=_HI)
    r0 = gw0 - cross
    pull = jnp.zeros_like(w0) if centre == "init" else -w0
    w = w0
    # Only the blocks with outputs are here (a budget-1 merge has no A-only
    # block), each at its own padded size.
    for blk in problem["blocks"]:
        x = _solve_block(gram, r0, pull, blk, ridge, method)
        keep = blk["rv"][:, None] * blk["cv"][None, :]
        w = w.at[blk["r"][:, None], blk["c"][None, :]].add(x * keep)
    before = _sse_from(gw0, cross, target_sq, w0)
    after = _sse_from(jnp.matmul(gram, w, precision=_HI), cross, target_sq, w)
    return w, before, after


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _descend(sums, problems, scales, steps, learning_rate):
    """Adam with a cosine schedule on every layer's masked mean squared error,
    full batch, from the projected Grams (one compiled scan for all layers)."""
    proj: dict[str, tuple[Any, Any, Any]] = {
        n: _project(sums[n], p["rows"], p["cols"]) for n, p in problems.items()
    }
    masks = {n: jnp.einsum("kd,kc->dc", p["allowed"], p["members"]) for n, p in problems.items()}
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params = {n: p["init"] for n, p in problems.items()}

    def step(carry, _):
        params, state = carry
        grads, losses = {}, []
        for n, w in params.items():
            gram, cross, target_sq = proj[n]
            # By hand, not by autodiff: one matmul per layer and step.
            r = jnp.matmul(gram, w, precision=_HI) - cross
            grads[n] = (2.0 / scales[n]) * r * masks[n]
            losses.append((jnp.sum(w * (r - cross)) + jnp.sum(target_sq)) / scales[n])
        upd, state = opt.update(grads, state, params)
        params = jax.tree.map(jnp.multiply, optax.apply_updates(params, upd), masks)
        return (params, state), sum(losses) / len(losses)

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    before = {n: _sse(*proj[n], problems[n]["init"]) for n in problems}
    after = {n: _sse(*proj[n], params[n]) for n in problems}
    return params, losses, before, after


# ------------------------------------------------------------------ top level
def _check(stats: PairStatistics, blocks: Mapping[str, GroupBlocks]) -> None:
    for g, n in stats.group_sizes.items():
        if g not in blocks:
            raise ValueError(f"the blocks have no group {g!r} of the pair statistics")
        m, a, b = blocks[g].sizes
        if m + a != n or m + b != n:
            raise ValueError(
                f"group {g!r} has {n} units in the pair statistics but blocks of sizes {(m, a, b)}"
            )


def _has(variables: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node = variables.get("params", {})
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return False
        node = node[k]
    return True


def fit(
    stats: PairStatistics,
    blocks: Mapping[str, GroupBlocks],
    merged_variables: Mapping[str, Any],
    *,
    mode: str = "closed_form",
    ridge: float = 1e-4,
    ridge_centre: str = "init",
    steps: int = 400,
    learning_rate: float = 5e-4,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refit every conv/dense layer of a merge of the pair behind ``stats``.

    Args:
      stats: from :func:`pair_statistics` on the two source models.
      blocks: this merge's blocks (any matching, any ratios).
      merged_variables: the partial merge
        (:func:`pleas_jax.partial.partial_merge`); its weights W0 centre the
        ridge and start the gradient mode.
      mode: ``"closed_form"`` (three ridge solves per layer, as
        :func:`pleas_jax.least_squares.solve`) or ``"gd"`` (Adam with a cosine
        schedule for ``steps`` full-batch steps on the same objective, the
        optimiser of the paper's code, its gradient ``2(GW − C)`` formed from
        the Grams).
      ridge, ridge_centre: see :func:`pleas_jax.least_squares.solve`.
      steps, learning_rate: the gradient mode.

    Returns:
      ``(variables, report)`` as :func:`pleas_jax.least_squares.least_squares`
      returns them (``report["statistics"] == "pair"``; ``report["memory"]``
      describes the pass that took ``stats``).

    Memory: the closed-form solve goes layer by layer, so beyond ``stats``
    (on the device, or on the host when they were taken in several chunks:
    then each layer's sums travel to the device for its solve) the device
    holds one layer's projection and factorisation at a time. The gradient
    mode runs every layer in one compiled scan and holds every layer's
    projected sums and Adam moments at once.

    Raises:
      ValueError: an unknown mode or centre, blocks of another pair, or a
        solution that is not finite.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ridge_centre not in RIDGE_CENTRES:
        raise ValueError(f"ridge_centre must be one of {RIDGE_CENTRES}, got {ridge_centre!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check(stats, blocks)
    t0 = time.perf_counter()
    merged_variables = to_dict(merged_variables)
    missing = [n for n, lay in stats.layers.items() if not _has(merged_variables, lay.path)]
    if missing:
        raise ValueError(
            f"the pair statistics have layers the merged model lacks ({', '.join(missing[:3])}): "
            "statistics of a shared-head merge reused with separate heads, or of another model?"
        )
    problems = {
        n: _problem(n, full, blocks, merged_variables, mode) for n, full in stats.layers.items()
    }
    solution, layers_report = {}, {}
    # Rows per layer: examples times output positions.
    count = {n: max(float(s["count"]), 1.0) for n, s in stats.sums.items()}
    with jax.default_matmul_precision("highest"):
        if mode == "gd":
            scales = {n: count[n] * p.layer.c_out for n, p in problems.items()}
            params, _, before, after = _descend(
                stats.sums,
                {n: p.args for n, p in problems.items()},
                scales,
                int(steps),
                float(learning_rate),
            )
            results = {n: (params[n], before[n], after[n], None) for n in problems}
        else:

            def one(n):
                with jax.default_matmul_precision("highest"):
                    args = (stats.sums[n], problems[n].args, float(ridge), ridge_centre)
                    # NaN from fp32 Cholesky: not positive definite to its
                    # round-off; float64 on the host then solves the same
                    # system, and the pseudo-inverse (least squares of
                    # smallest norm) where there is no ridge (see ls_solve).
                    first = SOLVERS.index(first_solver(count[n], problems[n].layer.dim))
                    for solver in SOLVERS[first:]:
                        host = solver == "cholesky_f64"
                        out = _solve_layer(*(on_one_device(args) if host else args), solver)
                        if bool(jnp.all(jnp.isfinite(out[0]))):
                            break
                    # To the host at once: the device then holds the sums and
                    # one layer's projection and factorisation (on a CPU, one
                    # per thread), never every solution.
                    return (*jax.device_get(out), solver)

            solved = distributed.map_programs(
                one, list(problems), cost=lambda n: problems[n].layer.dim ** 3
            )
            results = dict(zip(problems, solved, strict=True))
    for n, (w, before, after, solver) in results.items():
        layer = problems[n].layer
        w = np.asarray(w)[: layer.dim, : layer.c_out]
        if not np.all(np.isfinite(w)):
            raise ValueError(
                f"layer {n}: the least-squares solution is not finite (features overflow?)"
            )
        solution[n] = _from_matrix(layer, w)
        scale = count[n] * layer.c_out
        layers_report[n] = {
            "method": mode,
            "before": float(before) / scale,
            "after": float(after) / scale,
            "fallback": solver in ("cholesky_f64", "eigh"),
            "solver": solver,  # None for gradient descent
        }
    variables = apply_solution(merged_variables, solution)
    report = {
        "mode": mode,
        "ridge": ridge,
        "ridge_centre": ridge_centre,
        "statistics": "pair",
        "seconds": {"solve" if mode == "closed_form" else "gradient": time.perf_counter() - t0},
        "layers": layers_report,
        # The pass that took the sums (earlier, when they are reused).
        "memory": stats.memory,
    }
    return variables, report
