"""The whole PLeaS merge in one call.

``merge(model_a, model_b, data, budget)`` runs, in order: the permutation spec
(by tracing), matching (activations on ``data`` or weights), per-group ratios
for the compute budget, the partial merge, least squares (closed form or
gradient descent), BatchNorm statistics, and the heads; it returns the merged
model with a report of what each stage did and cost.

A sweep over budgets, ratio allocations or matchings of one pair passes the
first merge's matching (``precomputed_matching``) and least-squares sums
(``statistics="pair"``, then ``statistics=result.pair_statistics``) to the
next ones: only ratios, the partial merge, the solve and BatchNorm are redone.

Example: two ResNet-20s (base width 4, different seeds) merged at 1.5 times
the compute of one, from 32 random images (run by
``tests/test_docstrings.py``; with checkpoints, ``a = pleas_jax.load(path)``).

>>> import jax, jax.numpy as jnp, numpy as np
>>> from pleas_jax import models
>>> model = models.resnet("resnet20", num_classes=10, width=4)
>>> images = np.asarray(jax.random.normal(jax.random.key(2), (32, 8, 8, 3)))
>>> a = (model, model.init(jax.random.key(0), images[:1]))
>>> b = (model, model.init(jax.random.key(1), images[:1]))
>>> batches = [images[:16], images[16:]]
>>> result = merge(a, b, batches, budget=1.5, progress=False)
>>> round(result.report["achieved_budget"], 2)   # groups of 4 to 16 units round down
1.46
>>> result.logits(images[:4]).shape
(4, 10)
>>> sorted(result.report["seconds"])
['batch norm', 'heads', 'least squares', 'matching', 'ratios', 'report', 'spec']
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from pleas_jax import budget as budget_lib
from pleas_jax import heads as heads_lib
from pleas_jax import partial
from pleas_jax.batch_norm import recompute_batch_norm
from pleas_jax.least_squares import DEFAULT_MAX_MEMORY_BYTES
from pleas_jax.least_squares import least_squares as fit_least_squares
from pleas_jax.matching.activations import SIMILARITIES, activation_matching, with_compute_dtype
from pleas_jax.matching.weights import weight_matching
from pleas_jax.pair_least_squares import PairStatistics, fit, models_fingerprint, pair_statistics
from pleas_jax.permutation import identity
from pleas_jax.products import check_precision
from pleas_jax.spec import Group, derive_spec

_log = logging.getLogger(__name__)

MATCHINGS = ("activation", "weight", "identity")
RATIOS = ("uniform", "zip", "optimized")
LEAST_SQUARES = ("closed_form", "gd", None)
STATISTICS = ("per_merge", "pair")
HEADS = ("shared", "separate")


@dataclasses.dataclass
class MergeResult:
    """What :func:`merge` returns.

    Attributes:
      module, variables: the merged model (a backbone returning pooled
        features when ``heads="separate"``).
      heads: ``{"a": head, "b": head}`` routed source heads for separate label
        spaces (see :func:`pleas_jax.heads.route_heads`), else ``None``.
      spec, perm, costs: the permutation spec and the matching (``perm[g][i]``
        is B's unit matched with A's unit i).
      ratios, blocks: per-group ratios and merge blocks.
      report: seconds per stage, FLOPs, parameters, least-squares residuals.
      pair_statistics: the pair's least-squares sums when the merge used
        ``statistics="pair"`` or was given them (reusable by later merges of
        the same pair, heads mode and data), else ``None``.
    """

    module: Any
    variables: dict
    heads: dict | None
    spec: dict
    perm: dict
    costs: dict
    ratios: dict
    blocks: dict
    report: dict
    pair_statistics: PairStatistics | None = None

    def logits(self, x, head: str | None = None):
        """Outputs for images ``x [N, H, W, C]``: the shared head's logits, or
        ``head="a"``/``"b"``'s logits on the merged backbone's features."""
        out = self.module.apply(self.variables, x)
        if self.heads is None:
            if head is not None:
                raise ValueError("this merge has a shared head; call logits(x) without head")
            return out
        if head not in self.heads:
            raise ValueError(
                f"choose head 'a' or 'b' for a merge with separate heads, got {head!r}"
            )
        return heads_lib.apply_head(self.heads[head], out)


def _batches_factory(data) -> Callable[[], Iterable[Any]]:
    if callable(data):
        return data
    if isinstance(data, Iterable) and not hasattr(data, "__next__"):
        return lambda: data
    raise TypeError(
        "data must be a re-iterable collection of batches (e.g. a list) or a callable "
        "returning a fresh iterator of batches; a one-shot iterator cannot feed every stage"
    )


def _first_images(data_fn) -> np.ndarray:
    for batch in data_fn():
        x = np.asarray(batch[0] if isinstance(batch, tuple | list) else batch)
        if x.ndim != 4:
            raise ValueError(f"batches must hold images [N, H, W, C], got shape {x.shape}")
        if x.shape[0]:
            return x
    raise ValueError("merging needs data: the batches are empty")


def _check_models(module_a, module_b, heads: str) -> None:
    ca, cb = dict(module_a.config()), dict(module_b.config())
    na, nb = ca.pop("num_classes"), cb.pop("num_classes")
    for key in ca:
        if ca[key] != cb.get(key):
            raise ValueError(
                f"models A and B have different architectures or widths: {key} is "
                f"{ca[key]} in A but {cb.get(key)} in B"
            )
    if heads == "shared" and na != nb:
        raise ValueError(
            f"a shared head needs the same classes, but A has {na} and B has {nb}; "
            "use heads='separate' for different label spaces"
        )
    if heads == "separate" and (na is None or nb is None):
        raise ValueError("heads='separate' needs both models with their classifier (fc)")


def _without_head(variables) -> dict:
    return {c: {k: v for k, v in t.items() if k != "fc"} for c, t in variables.items()}


def _backbone_spec(spec) -> dict:
    """The spec without the classifier's axes (its group stays, now read by
    the routed heads)."""
    out = {}
    for g, group in spec.items():
        axes = tuple((p, a) for p, a in group.axes if tuple(p)[1:2] != ("fc",))
        if axes:
            out[g] = Group(group.size, axes)
    return out


def _aligned(table, spec, ratios: Mapping[str, float], multiple: int) -> dict[str, float]:
    """:func:`pleas_jax.budget.align_ratios`, with a warning where rounding the
    separate units down gives back much of the extra compute asked for."""
    aligned = budget_lib.align_ratios(spec, ratios, multiple)
    asked, kept = (budget_lib.relative_compute(table, spec, r) for r in (ratios, aligned))
    # A quarter of the extra compute lost: more than lane alignment should cost.
    if asked - kept > 0.25 * (asked - 1.0) + 1e-9:
        _log.warning(
            "unit_multiple=%d rounds the separate units down to budget %.3f from %.3f "
            "(groups of %s units); a smaller multiple keeps more of the budget",
            multiple,
            kept,
            asked,
            sorted({int(spec[g].size) for g in spec if ratios[g] > 0}),
        )
    return aligned


def merge(
    model_a: tuple[Any, Mapping[str, Any]],
    model_b: tuple[Any, Mapping[str, Any]],
    data,
    budget: float,
    *,
    matching: str = "activation",
    ratios: str | Mapping[str, float] = "uniform",
    unit_multiple: int | None = None,
    least_squares: str | None = "closed_form",
    heads: str = "shared",
    similarity: str = "distance",
    matching_dtype: Any = None,
    matching_precision: Any = "highest",
    ls_precision: Any = "highest",
    batch_norm: bool = True,
    ridge: float = 1e-4,
    gd_steps: int = 400,
    gd_learning_rate: float = 5e-4,
    max_iter: int = 100,
    seed: int = 0,
    precomputed_matching: tuple[Mapping, Mapping] | None = None,
    statistics: str | PairStatistics = "per_merge",
    count_xla_flops: bool = True,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge two models of the same architecture into one of ``budget`` compute.

    Args:
      model_a, model_b: ``(module, variables)`` pairs as returned by
        :func:`pleas_jax.load`.
      data: batches of images ``[N, H, W, C]`` (or ``(images, labels)``): a list
        or other re-iterable, or a callable returning a fresh iterator. Used for
        activation matching, least squares and BatchNorm statistics.
      budget: compute of the merged model relative to one source model, in
        ``[1, 2]`` (1: fully merged, 2: the ensemble).
      matching: ``"activation"``, ``"weight"`` (Git Re-Basin) or ``"identity"``
        (no alignment: plain averaging).
      ratios: ``"uniform"``, ``"zip"``, ``"optimized"`` or a dict group -> r.
      unit_multiple: round every group's separate-unit count down to a
        multiple of this (:func:`pleas_jax.budget.align_ratios`), so that the
        merged layers' channel blocks suit the hardware's lanes (8 for CPUs
        and tensor cores); ``None`` keeps the ratios as chosen. Never exceeds
        the budget; it may use less of it.
      least_squares: ``"closed_form"``, ``"gd"`` or ``None`` (keep the
        partial merge's weights, ZipIt!-style).
      heads: ``"shared"`` (same label space; classifier refit like any layer) or
        ``"separate"`` (the merged backbone with each source model's head). The
        models do not say which labels they were trained on: two 5-class
        models of digits 0-4 and 5-9 merge under ``"shared"`` into one
        classifier that confuses them, so pass ``"separate"`` for different
        label spaces (:func:`pleas_jax.workflow.heads_mode` picks it from
        checkpoints' recorded classes, as ``pleas-jax merge`` does).
      similarity: activation similarity (``"distance"``, ``"correlation"``, ``"inner"``).
      matching_dtype: compute dtype of both models in the activation-matching
        pass, e.g. ``"bfloat16"`` (bf16 compute with fp32 accumulation; in the
        tests, ``"distance"`` scores stay within 0.5% of fp32's and the
        matching is unchanged); ``None`` runs them as given. Least squares and BatchNorm always run in the
        models' own dtype.
      matching_precision: matmul precision of the activation-matching cross
        moments of float32 features, a mode of :mod:`pleas_jax.products`
        (``"highest"``, ``"bf16_3x"``, ``"bfloat16"``; see ``ls_precision``).
      ls_precision: matmul precision of the closed-form least-squares sums:
        ``"highest"`` (fp32), ``"bf16_3x"`` (three bf16 tensor-core products
        per fp32 product, ~2⁻¹⁶ relative error; several times faster than
        fp32 on GPUs and TPUs, slower on CPUs) or ``"bfloat16"``
        (:mod:`pleas_jax.products`).
      batch_norm: recompute BatchNorm statistics of the merged model on ``data``.
      ridge, gd_steps, gd_learning_rate: least-squares settings.
      max_iter, seed: weight matching's sweeps and group order.
      precomputed_matching: ``(perm, costs)`` from an earlier merge of the same
        pair (matching does not depend on the budget).
      statistics: the least-squares sums. ``"per_merge"``: taken for this
        merge's blocks (:func:`pleas_jax.least_squares.least_squares`; the
        cheapest for one merge). ``"pair"``: budget- and matching-independent
        sums (:mod:`pleas_jax.pair_least_squares`), returned in
        ``result.pair_statistics``; or those sums from an earlier merge of
        the same pair, heads mode and data, so that this merge skips the pass
        over data and reuses compiled solves.
      count_xla_flops: cross-check the analytic FLOPs with XLA's cost analysis.
      max_memory_bytes: bound on the least-squares sums one pass over ``data``
        accumulates (fp32 bytes; default 6 GiB, see
        :data:`pleas_jax.least_squares.DEFAULT_MAX_MEMORY_BYTES`): layers are
        split into chunks that fit, one pass each. Per-merge statistics fit a
        layer over the bound by gradient descent; pair statistics refuse it.
        ``report["least_squares_report"]["memory"]`` gives the chunks and the
        largest chunk's bytes. ``None``: one pass.
      mesh: device mesh for the statistics passes.
      progress: progress bars per stage.

    Returns:
      a :class:`MergeResult`.
    """
    if isinstance(budget, str | bool) or np.ndim(budget) != 0:
        raise TypeError(f"budget must be a number in [1, 2], got {budget!r}")
    if not 1.0 <= float(budget) <= 2.0:  # also rejects NaN
        raise ValueError(f"budget must lie in [1, 2] (compute relative to one model), got {budget}")
    for name, value, choices in (
        ("matching", matching, MATCHINGS),
        ("least_squares", least_squares, LEAST_SQUARES),
        ("heads", heads, HEADS),
        ("similarity", similarity, SIMILARITIES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if not isinstance(statistics, PairStatistics) and statistics not in STATISTICS:
        raise ValueError(
            f"statistics must be one of {STATISTICS} or a PairStatistics, got {statistics!r}"
        )
    if isinstance(ratios, str) and ratios not in RATIOS:
        raise ValueError(
            f"ratios must be one of {RATIOS} or a dict of group ratios, got {ratios!r}"
        )
    if unit_multiple is not None:
        budget_lib.check_multiple(unit_multiple, "unit_multiple")
    (module_a, va), (module_b, vb) = model_a, model_b
    _check_models(module_a, module_b, heads)
    if matching_dtype is not None:
        with_compute_dtype(module_a, matching_dtype)  # a bad dtype fails before any work
    check_precision(ls_precision)
    check_precision(matching_precision)
    if isinstance(statistics, PairStatistics) and statistics.models is not None:
        # Separate heads take their sums from the backbones, as below.
        fa, fb = (_without_head(v) if heads == "separate" else v for v in (va, vb))
        if statistics.models != models_fingerprint(fa, fb):
            raise ValueError(
                "statistics: these pair statistics were taken from other source models "
                "(or with A and B the other way round, or the other heads mode); take them "
                "from this pair (statistics='pair')"
            )
    data_fn = _batches_factory(data)
    example = _first_images(data_fn)[:1]

    seconds: dict[str, float] = {}
    stages = tqdm(total=7, desc="merge", disable=not progress)

    def stage(name):
        stages.set_postfix_str(name)
        return time.perf_counter()

    def done(name, t0):
        seconds[name] = time.perf_counter() - t0
        stages.update(1)

    try:
        t0 = stage("spec")
        spec = derive_spec(module_a, va, example)
        head_group: str | None = None  # the classifier's input group, for separate heads
        if heads == "separate":
            head_group = heads_lib.head_group(spec)
            spec = _backbone_spec(spec)
            heads_ab = (va["params"]["fc"], vb["params"]["fc"])
            module_a, module_b = module_a.clone(num_classes=None), module_b.clone(num_classes=None)
            va, vb = _without_head(va), _without_head(vb)
        done("spec", t0)

        t0 = stage("matching")
        if precomputed_matching is not None:
            perm, costs = dict(precomputed_matching[0]), dict(precomputed_matching[1])
            missing = set(spec) - set(perm)
            if missing:
                raise ValueError(f"precomputed matching lacks group(s) {sorted(missing)}")
        elif matching == "activation":
            perm, costs = activation_matching(
                module_a,
                va,
                module_b,
                vb,
                spec,
                data_fn(),
                similarity,
                mesh=mesh,
                dtype=matching_dtype,
                precision=matching_precision,
                progress=progress,
            )
        elif matching == "weight":
            perm, costs = weight_matching(spec, va, vb, max_iter=max_iter, seed=seed)
        else:
            perm = {g: np.asarray(p) for g, p in identity(spec).items()}
            costs = {g: np.zeros((grp.size, grp.size)) for g, grp in spec.items()}
        done("matching", t0)

        t0 = stage("ratios")
        table = budget_lib.layer_table(module_a, va, spec, example.shape[1:])
        if isinstance(ratios, str):
            weights = (
                budget_lib.sensitivity_from_costs(spec, perm, costs)
                if ratios == "optimized"
                else None
            )
            group_ratios = budget_lib.ratios_for_budget(
                ratios, table, spec, float(budget), weights=weights
            )
        else:
            budget_lib.separate_units(spec, ratios)  # every group named, each in [0, 1]
            group_ratios = {g: float(ratios[g]) for g in spec}
        if unit_multiple is not None:
            group_ratios = _aligned(table, spec, group_ratios, unit_multiple)
        blocks = partial.make_blocks(spec, perm, costs, group_ratios)
        merged_module, merged = partial.partial_merge(module_a, spec, blocks, va, vb)
        done("ratios", t0)

        t0 = stage("least squares")
        ls_report = None
        pair_stats = statistics if isinstance(statistics, PairStatistics) else None
        if least_squares is not None and statistics == "per_merge":
            merged, ls_report = fit_least_squares(
                module_a,
                va,
                module_b,
                vb,
                spec,
                blocks,
                merged_module,
                merged,
                data_fn,
                mode=least_squares,
                ridge=ridge,
                steps=gd_steps,
                learning_rate=gd_learning_rate,
                max_memory_bytes=max_memory_bytes,
                mesh=mesh,
                precision=ls_precision,
                progress=progress,
            )
        elif least_squares is not None:
            if pair_stats is None:
                t_stats = time.perf_counter()
                pair_stats = pair_statistics(
                    module_a,
                    va,
                    module_b,
                    vb,
                    spec,
                    data_fn,
                    mesh=mesh,
                    precision=ls_precision,
                    max_memory_bytes=max_memory_bytes,
                    progress=progress,
                )
                jax.block_until_ready(pair_stats.sums)
                t_stats = time.perf_counter() - t_stats
            merged, ls_report = fit(
                pair_stats,
                blocks,
                merged,
                mode=least_squares,
                ridge=ridge,
                steps=gd_steps,
                learning_rate=gd_learning_rate,
            )
            if not isinstance(statistics, PairStatistics):
                ls_report["seconds"]["statistics"] = t_stats
        done("least squares", t0)

        t0 = stage("batch norm")
        if batch_norm:
            merged = recompute_batch_norm(
                merged_module, merged, data_fn(), mesh=mesh, progress=progress
            )
        done("batch norm", t0)

        t0 = stage("heads")
        routed = None
        if head_group is not None:
            ha, hb = heads_lib.route_heads(blocks[head_group], *heads_ab)
            routed = {"a": ha, "b": hb}
        done("heads", t0)

        t0 = stage("report")
        report = {
            "budget": float(budget),
            "achieved_budget": budget_lib.relative_compute(table, spec, group_ratios),
            "matching": matching if precomputed_matching is None else "precomputed",
            "least_squares": least_squares,
            "heads": heads,
            "macs": budget_lib.macs(table, spec, group_ratios),
            "macs_source": budget_lib.macs(table, spec, 0.0),
            "params": budget_lib.params(table, spec, group_ratios)._asdict(),
            "ratios": {g: float(r) for g, r in group_ratios.items()},
            "unit_multiple": unit_multiple,
            "widths": {g: int(b.width) for g, b in blocks.items()},
            "least_squares_report": ls_report,
        }
        if count_xla_flops:
            # Like for like: XLA counts 2 FLOPs per multiply-add on real input taps.
            report["analytic_conv_flops"] = 2 * budget_lib.macs(
                table, spec, group_ratios, count_padding=False
            )
            report["xla_flops"] = budget_lib.xla_flops(merged_module, merged, example.shape[1:])
        done("report", t0)
    finally:
        # A failed or interrupted merge must not leave a stale bar behind.
        stages.close()
    report["seconds"] = seconds
    return MergeResult(
        merged_module, merged, routed, spec, perm, costs, group_ratios, blocks, report, pair_stats
    )
