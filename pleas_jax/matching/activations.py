"""Activation matching: align B's units with A's from features on data.

Every group is observed at the points of the network where its units appear
as feature channels: the inputs and outputs of the conv/dense layers whose
kernel axis is in the group, and the outputs of its normalisation layers (so a
residual stream is seen before and after every block that reads or writes it).
One pass over the data accumulates, per point, the cross moments of A's and B's
channels; one linear assignment per group then picks the permutation.

The pass is one compiled function per batch, split over a 1-D device mesh with
``jax.shard_map`` and reduced with ``psum`` (see :mod:`pleas_jax.distributed`).
Models must be built from :mod:`pleas_jax.models` layers, which record their
features when asked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pleas_jax import distributed, products
from pleas_jax.matching import lap
from pleas_jax.models.layers import FEATURES, NORM_AFFINE
from pleas_jax.tree import flatten, get, path_str

SIMILARITIES = ("distance", "correlation", "inner")


def feature_points(spec: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, list]:
    """Where each group shows up as feature channels.

    Returns:
      group -> list of feature paths (e.g. ``("layer1_0", "conv1", "in")``) in the
      ``"features"`` collection; each carries the group on its last axis.
    """
    points: dict[str, list] = {}
    for g, group in spec.items():
        pts = []
        for path, axis in group.axes:
            path = tuple(path)
            if path[0] != "params":
                continue
            ndim = np.ndim(get(variables, path))
            layer = path[1:-1]
            if path[-1] == "kernel" and axis == ndim - 1:
                pt = (*layer, "out")
            elif path[-1] == "kernel" and axis == ndim - 2:
                pt = (*layer, "in")
            elif ndim == 1:
                pt = (*layer, "out")
            else:
                continue
            if pt not in pts:
                pts.append(pt)
        points[g] = pts
    return points


def check_compatible(spec, variables_a, variables_b) -> None:
    """Raise ``ValueError`` before any work if a grouped axis is missing or has
    another size in either model (different architectures or widths)."""
    for g, group in spec.items():
        for path, axis in group.axes:
            for name, v in (("A", variables_a), ("B", variables_b)):
                try:
                    shape = np.shape(get(v, path))
                except KeyError:
                    raise ValueError(
                        f"group {g}: model {name} has no {path_str(tuple(path))}"
                    ) from None
                if axis >= len(shape) or shape[axis] != group.size:
                    raise ValueError(
                        f"group {g}: {path_str(tuple(path))} of model {name} has shape {shape}, "
                        f"expected {group.size} units on axis {axis} (different architecture or widths?)"
                    )


def with_compute_dtype(module, dtype):
    """``module`` computing in ``dtype`` (parameters stay as stored).

    Args:
      module: a Flax module with a ``dtype`` field (as every model of
        :mod:`pleas_jax.models` has).
      dtype: a floating dtype or its name, e.g. ``"bfloat16"``.

    Raises:
      ValueError: the dtype is not floating, or the module has no ``dtype`` field.
    """
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute dtype must be floating, got {dtype}")
    if "dtype" not in getattr(module, "__dataclass_fields__", {}):
        raise ValueError(
            f"{type(module).__name__} has no dtype field: build it with the compute dtype instead"
        )
    return module.clone(dtype=dtype)


def _moments(a, b, w, need_sq, precision="highest"):
    """Sums over rows of ``a, b [rows, n]`` weighted by ``w [rows]`` (0/1;
    ``None``: every row counts).

    Everything is summed in float32. For bf16 features the cross moment is a
    bf16 x bf16 matmul with fp32 accumulation (the product of two bf16 numbers
    is exact in fp32); the elementwise sums upcast inside one fused reduction.
    Float32 features take the matmul at ``precision``
    (:func:`pleas_jax.products.matmul`).
    """
    f32 = jnp.float32
    if w is None:
        # No padding in the batch: no masked copy of the features to write
        # and read again (on an accelerator these passes are memory-bound).
        aw, bw, count = a, b, jnp.asarray(a.shape[0], f32)
    else:
        w = w.astype(a.dtype)[:, None]  # 0/1: exact in any dtype
        aw, bw, count = a * w, b * w, jnp.sum(w, dtype=f32)
    if a.dtype == f32:
        cross = products.matmul(aw.T, b, precision)
    else:
        cross = jnp.matmul(aw.T, b, preferred_element_type=f32)
    s = {
        "cross": cross,
        "sum_a": jnp.sum(aw, axis=0, dtype=f32),
        "sum_b": jnp.sum(bw, axis=0, dtype=f32),
        "count": count,
    }
    if need_sq:
        s["sq_a"] = jnp.sum(aw.astype(f32) * a.astype(f32), axis=0)
        s["sq_b"] = jnp.sum(bw.astype(f32) * b.astype(f32), axis=0)
    return s


def _affine_moments(m, scale_a, shift_a, scale_b, shift_b):
    """Moments of ``a * scale_a + shift_a`` and ``b * scale_b + shift_b`` from
    those of ``a`` and ``b`` (:func:`_moments`); exact algebra, each term a
    product of per-channel vectors and the given sums."""
    c = m["count"]
    sum_a, sum_b = m["sum_a"], m["sum_b"]
    out = {
        "cross": scale_a[:, None] * m["cross"] * scale_b[None, :]
        + jnp.outer(scale_a * sum_a, shift_b)
        + jnp.outer(shift_a, scale_b * sum_b + c * shift_b),
        "sum_a": scale_a * sum_a + c * shift_a,
        "sum_b": scale_b * sum_b + c * shift_b,
        "count": c,
    }
    if "sq_a" in m:
        out["sq_a"] = scale_a**2 * m["sq_a"] + shift_a * (2.0 * scale_a * sum_a + c * shift_a)
        out["sq_b"] = scale_b**2 * m["sq_b"] + shift_b * (2.0 * scale_b * sum_b + c * shift_b)
    return out


def _norm_source(pt, pts, fa, fb, affine_a, affine_b):
    """The point among ``pts`` whose features an inference-mode normalisation
    output ``pt`` is an affine map of (in both models), or ``None``."""
    layer = pt[:-1]
    if pt[-1] != "out" or (*layer, "scale") not in affine_a or (*layer, "scale") not in affine_b:
        return None
    xa, xb = fa.get((*layer, "in")), fb.get((*layer, "in"))
    for q in pts:
        if q != pt and fa[q] is xa and fb[q] is xb:
            return q
    return None


def _batch_stats_fn(module_a, module_b, points, similarity, precision, masked=True):
    """Per-shard sums over examples for every (group, point).

    A normalisation output in inference mode is a per-channel affine map of
    its input (:class:`pleas_jax.models.layers.BatchNorm` records it). Where
    that input is itself a point of the group (a conv's output), the output's
    moments are derived from the input's instead of from another product of
    the features: in a ResNet-50 at 224 px this takes the cross moments from 13.0 to 8.3
    GMAC per image.

    ``masked=False`` compiles the version for batches without padding, which
    ignores the mask.
    """
    need_sq = similarity in ("distance", "correlation")
    collections = [FEATURES, NORM_AFFINE]

    def fn(variables, x, mask):
        va, vb = variables
        _, sa = module_a.apply(va, x, mutable=collections)
        _, sb = module_b.apply(vb, x, mutable=collections)
        fa, fb = flatten(sa[FEATURES]), flatten(sb[FEATURES])
        affine_a, affine_b = flatten(sa.get(NORM_AFFINE, {})), flatten(sb.get(NORM_AFFINE, {}))
        out = {}
        for g, pts in points.items():
            for pt in pts:
                if fa.get(pt) is None or fb.get(pt) is None:
                    raise ValueError(f"group {g}: the model records no feature {path_str(pt)}")
            derived = {pt: _norm_source(pt, pts, fa, fb, affine_a, affine_b) for pt in pts}
            derived = {pt: q for pt, q in derived.items() if q is not None and derived[q] is None}
            direct = [pt for pt in pts if pt not in derived]
            seen: list = []
            moments: dict = {}
            for pt in direct:
                a, b = fa[pt], fb[pt]
                # Two layers reading the same value (conv1 and the shortcut conv)
                # would count it twice.
                if any(a is s for s in seen):
                    continue
                seen.append(a)
                n = a.shape[-1]
                w = None
                if masked:
                    w = jnp.broadcast_to(
                        mask.reshape((-1,) + (1,) * (a.ndim - 2)), a.shape[:-1]
                    ).reshape(-1)
                dtype = jnp.promote_types(a.dtype, b.dtype)
                a2 = a.reshape(-1, n).astype(dtype)
                b2 = b.reshape(-1, n).astype(dtype)
                moments[pt] = out[(g, path_str(pt))] = _moments(a2, b2, w, need_sq, precision)
            for pt, source in derived.items():
                # The source may have been skipped as a duplicate of an earlier
                # point reading the same value: take that point's moments.
                src = next(q for q in moments if fa[q] is fa[source])
                layer = pt[:-1]
                out[(g, path_str(pt))] = _affine_moments(
                    moments[src],
                    affine_a[(*layer, "scale")],
                    affine_a[(*layer, "shift")],
                    affine_b[(*layer, "scale")],
                    affine_b[(*layer, "shift")],
                )
        return out

    return fn


@functools.lru_cache(maxsize=32)
def _compiled_step(module_a, module_b, points_key, similarity, mesh, precision, masked):
    # Modules and meshes are hashable: repeated passes over the same pair
    # (benchmarks, several similarities) reuse the compiled kernel.
    points = {g: list(pts) for g, pts in points_key}
    fn = _batch_stats_fn(module_a, module_b, points, similarity, precision, masked)
    return distributed.batch_sum(fn, mesh)


@functools.lru_cache(maxsize=8)
def _accumulate(similarity):
    @jax.jit
    def update(acc, stats):
        new = {}
        for k, s in stats.items():
            new[k] = {name: acc[k][name] + v for name, v in s.items()}
            if similarity == "distance":
                # Distances are taken per batch and summed, as in the paper's
                # code; this keeps memory at one [n, n] per point.
                d2 = s["sq_a"][:, None] + s["sq_b"][None, :] - 2.0 * s["cross"]
                new[k]["neg_dist"] = acc[k]["neg_dist"] - jnp.sqrt(jnp.maximum(d2, 0.0))
        return new

    @jax.jit
    def first(stats):
        # One compiled call: zeros made leaf by leaf would be ~300 dispatches
        # for a resnet50.
        zeros = {}
        for k, s in stats.items():
            zeros[k] = {name: jnp.zeros_like(v) for name, v in s.items()}
            if similarity == "distance":
                zeros[k]["neg_dist"] = jnp.zeros_like(s["cross"])
        return update(zeros, stats)

    return first, update


def activation_statistics(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    similarity: str = "distance",
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = None,
    precision: Any = "highest",
    progress: bool = False,
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Cross moments of A's and B's features at every point of every group.

    Args:
      module_a, variables_a, module_b, variables_b: the two models.
      spec: their permutation spec.
      batches: iterable of images ``[N, H, W, C]`` (or ``(images, labels)``),
        or a callable returning one.
      similarity: which statistics to keep (see :func:`activation_matching`).
      mesh: a 1-D data mesh (all local devices by default).
      dtype: compute dtype of both models for this pass (e.g. ``"bfloat16"``;
        see :func:`with_compute_dtype`); ``None`` runs them as given. The
        moments are products in the features' dtype summed in float32, so
        bf16 features give a bf16 matmul with fp32 accumulation.
      precision: matmul precision of the cross moments of float32 features
        (:mod:`pleas_jax.products`): ``"highest"`` (fp32), ``"bf16_3x"``
        (three bf16 tensor-core products, ~2⁻¹⁶ relative error: on a GPU the
        fp32 cross moments of two resnet50s cost more than their TF32
        forward passes) or ``"bfloat16"``. Ignored for bf16 features.
      progress: show a progress bar.

    Returns:
      ``(group, point) -> {"cross": [n, n], "sum_a": [n], "sum_b": [n],
      "count": [], "sq_a"/"sq_b": [n] (distance, correlation),
      "neg_dist": [n, n] (distance)}``, sums over every real example and
      position, all float32.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    check_compatible(spec, variables_a, variables_b)
    precision = products.check_precision(precision)
    if dtype is not None:
        module_a, module_b = (
            with_compute_dtype(module_a, dtype),
            with_compute_dtype(module_b, dtype),
        )
    points = feature_points(spec, variables_a)
    mesh = mesh or distributed.data_mesh()
    points_key = tuple((g, tuple(pts)) for g, pts in points.items())
    first, update = _accumulate(similarity)
    variables = (variables_a, variables_b)
    acc = None
    if callable(batches):  # as merge and least squares take them
        batches = batches()
    for batch in tqdm(batches, desc="activation statistics", disable=not progress, leave=False):
        x = batch[0] if isinstance(batch, tuple | list) else batch
        x = np.asarray(x)
        if x.ndim != 4:
            # One array of images iterates as single images: say so here,
            # not as a parameter-shape error deep inside the model.
            raise ValueError(
                f"batches must hold images [N, H, W, C], got a batch of shape {x.shape} "
                "(pass a list of batches, e.g. [images], not one array)"
            )
        masked = distributed.is_padded(len(x), mesh)
        step = _compiled_step(module_a, module_b, points_key, similarity, mesh, precision, masked)
        x, mask = distributed.shard_batch(x, mesh)
        stats = step(variables, x, mask)
        acc = first(stats) if acc is None else update(acc, stats)
    if acc is None:
        raise ValueError("activation matching needs at least one batch of data")
    return jax.device_get(acc)  # one transfer of every leaf


# A unit whose variance is below this fraction of its second moment is taken
# as constant: float32 sums leave ~1e-7 of that moment as noise in the variance
# (and in the covariance), so their ratio would be noise over noise.
CONSTANT_UNIT = 1e-4


def _std(sq: np.ndarray, mean: np.ndarray, c: float) -> np.ndarray:
    """Standard deviation from the sums, 0 for a unit that is constant within
    float32 rounding (:data:`CONSTANT_UNIT`)."""
    second = np.asarray(sq, np.float64) / c
    var = second - mean**2
    return np.sqrt(np.where(var > CONSTANT_UNIT * np.abs(second), var, 0.0))


def statistics_to_scores(
    stats: Mapping[tuple[str, str], Mapping[str, np.ndarray]], similarity: str, eps: float = 1e-8
) -> dict[str, np.ndarray]:
    """Per-group scores ``[n, n]`` (A's unit i vs B's unit j), summed over points.

    Correlations are Pearson's, each in ``[-1, 1]``; a unit constant over the
    data (a dead channel, within float32 rounding) correlates 0 with every unit.
    """
    scores: dict[str, np.ndarray] = {}
    for (g, _), s in stats.items():
        if similarity == "correlation":
            cross = np.asarray(s["cross"], np.float64)
            c = float(s["count"])
            mean_a = np.asarray(s["sum_a"], np.float64) / c
            mean_b = np.asarray(s["sum_b"], np.float64) / c
            cov = cross / c - np.outer(mean_a, mean_b)
            std_a, std_b = _std(s["sq_a"], mean_a, c), _std(s["sq_b"], mean_b, c)
            live = np.outer(std_a > 0, std_b > 0)
            sc = np.where(live, cov / (np.outer(std_a, std_b) + eps), 0.0)
            # Rounding can put a correlation of two live units a hair past 1.
            np.clip(sc, -1.0, 1.0, out=sc)
        else:
            sc = s["cross" if similarity == "inner" else "neg_dist"]
        # Summed in float64 in place: no float64 copy of every point's [n, n]
        # (a resnet50's points hold ~100M entries).
        if g in scores:
            np.add(scores[g], sc, out=scores[g])
        else:
            scores[g] = np.array(sc, np.float64)
    return scores


def activation_matching(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    similarity: str = "distance",
    *,
    mesh: jax.sharding.Mesh | None = None,
    solver: lap.Solver | None = None,
    dtype: Any = None,
    precision: Any = "highest",
    progress: bool = False,
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Permutations of B's groups that best align B's features with A's.

    Args:
      similarity: ``"distance"`` (negative Euclidean distance between the units'
        feature vectors, per batch, summed over batches), ``"correlation"``
        (Pearson correlation over all examples and positions) or ``"inner"``
        (raw inner products).
      solver: linear assignment solver (:func:`pleas_jax.matching.lap.scipy_solver`);
        called from several threads at once unless ``threads=1``.
      threads: most groups' assignments solved at once
        (:func:`pleas_jax.matching.lap.solve_all`); the result does not depend on it.
      Other arguments as in :func:`activation_statistics`.

    Returns:
      ``(perm, costs)`` as in :func:`pleas_jax.weight_matching`: ``perm[g][i]``
      is B's unit matched with A's unit i and ``costs[g] [n, n]`` are the scores
      in B's original coordinates.
    """
    stats = activation_statistics(
        module_a,
        variables_a,
        module_b,
        variables_b,
        spec,
        batches,
        similarity,
        mesh=mesh,
        dtype=dtype,
        precision=precision,
        progress=progress,
    )
    scores = statistics_to_scores(stats, similarity)
    missing = [g for g in spec if g not in scores]
    if missing:
        raise ValueError(f"no feature of the models carries group(s) {', '.join(missing)}")
    perm = lap.solve_all({g: scores[g] for g in spec}, solver, threads=threads)
    return perm, {g: scores[g] for g in spec}
