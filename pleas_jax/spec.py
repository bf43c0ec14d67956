"""Permutation specs: which tensor axes must be permuted together.

A *permutation group* is a set of ``(path, axis)`` pairs of a variables pytree
that can be permuted by one shared permutation without changing the model's
function: a conv's output channels, the BatchNorm after it and the next conv's
input channels; a whole residual stream. A *spec* maps a readable group key to
its :class:`Group`.

:func:`derive_spec` finds the groups by tracing ``module.apply`` to a jaxpr.
Nodes are ``(value, axis)`` pairs; a union-find joins the nodes that must carry
the same permutation, equation by equation, by the primitive's rule (the graph
and the rules are :mod:`pleas_jax.spec_rules`; its
:class:`UnsupportedPrimitiveError` is re-exported here). A class
that holds a parameter axis and no axis of the model's input or output (nor an
axis some primitive cannot permute, such as a conv's spatial axes) is a group.
:func:`check_spec` permutes each group at random and asserts that the output is
unchanged. :func:`spec_from_dict` and the small editing helpers below write or
repair a spec by hand.

Example (a ResNet-20 of base width 4; run by ``tests/test_docstrings.py``):

>>> import jax, jax.numpy as jnp
>>> from pleas_jax import models
>>> model = models.resnet("resnet20", num_classes=10, width=4)
>>> x = jnp.zeros((1, 8, 8, 3))
>>> variables = model.init(jax.random.key(0), x)
>>> spec = derive_spec(model, variables, x)
>>> len(spec), spec["params/layer1_0/conv1/kernel:3"].size
(12, 4)
>>> check_spec(model, variables, spec, jnp.ones((2, 8, 8, 3)))  # raises, naming a wrong group
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pleas_jax import tracing
from pleas_jax.permutation import apply_permutation

# The graph and the per-primitive rules, re-exported: ``spec.UnsupportedPrimitiveError``
# etc. are the same objects.
from pleas_jax.spec_rules import Rule, UnsupportedPrimitiveError, _Graph, _run
from pleas_jax.tree import Path, flatten, map_with_path, parse_path, path_str, to_dict, unflatten

__all__ = [
    "Group",
    "Rule",
    "Spec",
    "UnsupportedPrimitiveError",
    "check_spec",
    "derive_spec",
    "drop_groups",
    "merge_groups",
    "rename_groups",
    "spec_from_dict",
    "spec_to_dict",
    "validate_spec",
]


@dataclasses.dataclass(frozen=True)
class Group:
    """One permutation group.

    Attributes:
      size: the length of every axis in the group (the number of units).
      axes: ``(path, axis)`` pairs, ``path`` into the variables pytree including
        the collection, e.g. ``(("params", "layer1_0", "conv1", "kernel"), 3)``.
    """

    size: int
    axes: tuple[tuple[Path, int], ...]


Spec = dict[str, Group]


def group_key(path: Path, axis: int) -> str:
    """The readable key of a group whose first axis is ``(path, axis)``: ``"params/fc/kernel:0"``."""
    return f"{path_str(path)}:{axis}"


# ------------------------------------------------------------------- tracing
@dataclasses.dataclass
class _Trace:
    graph: _Graph
    paths: list[Path]  # variable leaves, flatten order
    leaf_values: list[int]  # their value ids
    output_values: list[int]  # the model output's leaves (mutable state excluded)


def _mutable(apply_kwargs: Mapping[str, Any]) -> bool:
    return apply_kwargs.get("mutable", False) not in (False, None, ())


def _trace(module, variables, example_input, apply_kwargs: Mapping[str, Any]) -> _Trace:
    flat = flatten(to_dict(variables))
    paths = list(flat)
    kwargs = dict(apply_kwargs)

    def fn(leaves, x):
        return module.apply(unflatten(dict(zip(paths, leaves, strict=True))), x, **kwargs)

    leaves = [flat[p] for p in paths]
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(leaves, example_input)
    g = _Graph()
    leaf_values = [g.new(np.shape(leaf)) for leaf in leaves]
    input_values = [g.new(np.shape(x)) for x in jax.tree.leaves(example_input)]
    outs = _run(g, closed, [*leaf_values, *input_values], ())
    for v in input_values:
        g.fix(v)

    if not _mutable(kwargs):
        return _Trace(g, paths, leaf_values, outs)
    # apply(..., mutable=...) returns (output, state): updated variables carry
    # the permutation of the variables they replace; other state is ignored.
    n_out = len(jax.tree.leaves(out_shape[0]))
    index = {p: i for i, p in enumerate(paths)}
    state_paths = flatten(to_dict(out_shape[1]))
    for p, v in zip(state_paths, outs[n_out:], strict=True):
        if p in index:
            old = leaf_values[index[p]]
            for ax in range(len(g.shapes[v])):
                g.join(old, ax, v, ax)
    return _Trace(g, paths, leaf_values, outs[:n_out])


def derive_spec(
    module,
    variables: Mapping[str, Any],
    example_input: Any,
    *,
    free_output: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Spec:
    """The permutation groups of ``module`` by tracing ``module.apply(variables, x)``.

    Args:
      module: a Flax module (anything with ``apply(variables, x, **kw)``).
      variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}``;
        every leaf (parameters and statistics alike) is a candidate axis.
      example_input: an input of the right shape and dtype, e.g. ``[1, H, W, 3]``
        (only shapes are used). A pytree of arrays is allowed.
      free_output: let groups reach the output (for a backbone whose head is
        removed); otherwise output axes are fixed.
      apply_kwargs: extra keyword arguments for ``apply``, e.g.
        ``{"train": True, "mutable": ["batch_stats"]}``; updated state is
        permuted like the variables it replaces.

    Returns:
      ``{key: Group}``; groups, and the axes within a group, are ordered by the
      first use of their leaves in the forward pass (not by dict order, which
      ``jax.tree.map`` and ``eval_shape`` change). A key is the group's first
      ``path:axis``, e.g. ``"params/conv1/kernel:3"``.

    Raises:
      UnsupportedPrimitiveError: naming the primitive and the source line.

    The spec depends only on the module and the shapes and dtypes of the
    variables and input, so it is kept (:mod:`pleas_jax.tracing`): a second
    call for the same signature returns a copy without tracing again.
    """
    kwargs = dict(apply_kwargs or {})
    key = tracing.signature(
        module,
        variables,
        example_input,
        free_output=free_output,
        apply_kwargs=tuple(sorted(kwargs.items())),
    )
    spec = tracing.cached(
        "spec", key, lambda: _derive(module, variables, example_input, free_output, kwargs)
    )
    return dict(spec)  # a dict of its own: callers edit specs


def _derive(module, variables, example_input, free_output: bool, apply_kwargs) -> Spec:
    t = _trace(module, variables, example_input, apply_kwargs)
    g = t.graph
    if not free_output:
        for v in t.output_values:
            g.fix(v)
    # Leaves in order of first use in the forward pass (jax.tree.map and
    # eval_shape sort dict keys, so flatten order is not stable); unused
    # leaves are left out, permuting them would mean nothing.
    used = sorted(
        (g.first_use[v], path, v)
        for path, v in zip(t.paths, t.leaf_values, strict=True)
        if v in g.first_use
    )
    classes: dict[tuple[int, int], list[tuple[Path, int]]] = {}
    for _, path, v in used:
        for ax, size in enumerate(g.shapes[v]):
            if size > 1 and not g.is_fixed((v, ax)):
                classes.setdefault(g.find((v, ax)), []).append((path, ax))
    spec: Spec = {}
    for root, axes in classes.items():
        spec[group_key(*axes[0])] = Group(g.shapes[root[0]][root[1]], tuple(axes))
    return spec


# -------------------------------------------------------------- hand-written
def validate_spec(spec: Mapping[str, Group], variables: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the group and path if an axis is missing or mis-sized.

    Also rejects an axis listed twice (in one group or two).
    """
    flat = flatten(to_dict(variables))
    seen: dict[tuple[Path, int], str] = {}
    for key, group in spec.items():
        if not isinstance(group, Group):
            raise ValueError(f"group {key!r} is a {type(group).__name__}, not a Group")
        if group.size < 1 or not group.axes:
            raise ValueError(f"group {key!r} is empty (size {group.size}, {len(group.axes)} axes)")
        for path, axis in group.axes:
            where = f"group {key!r}: {path_str(path)}"
            if path not in flat:
                raise ValueError(f"{where} is not in the variables")
            shape = np.shape(flat[path])
            if not 0 <= axis < len(shape):
                raise ValueError(f"{where} has shape {shape}, no axis {axis}")
            if shape[axis] != group.size:
                raise ValueError(
                    f"{where} axis {axis} has length {shape[axis]}, the group has size {group.size}"
                )
            if (path, axis) in seen:
                raise ValueError(f"{where} axis {axis} is also in group {seen[path, axis]!r}")
            seen[path, axis] = key


def spec_from_dict(
    groups: Mapping[str, Iterable[tuple[str | Path, int]]], variables: Mapping[str, Any]
) -> Spec:
    """A spec written by hand: ``{key: [(path, axis), ...]}``, checked against ``variables``.

    Paths may be strings (``"params/conv1/kernel"``) or tuples. Sizes are read
    from the variables. Example::

        spec_from_dict({"stem": [("params/conv1/kernel", 3), ("params/bn1/scale", 0),
                                 ("params/bn1/bias", 0), ("batch_stats/bn1/mean", 0),
                                 ("batch_stats/bn1/var", 0), ("params/layer1_0/conv1/kernel", 2)]},
                       variables)
    """
    flat = flatten(to_dict(variables))
    spec: Spec = {}
    for key, listed in groups.items():
        axes = tuple((parse_path(p), int(ax)) for p, ax in listed)
        if not axes:
            raise ValueError(f"group {key!r} lists no axes")
        path, ax = axes[0]
        if path not in flat:
            raise ValueError(f"group {key!r}: {path_str(path)} is not in the variables")
        shape = np.shape(flat[path])
        if not 0 <= ax < len(shape):
            raise ValueError(f"group {key!r}: {path_str(path)} has shape {shape}, no axis {ax}")
        spec[key] = Group(int(shape[ax]), axes)
    validate_spec(spec, variables)
    return spec


def spec_to_dict(spec: Mapping[str, Group]) -> dict[str, list[tuple[str, int]]]:
    """Inverse of :func:`spec_from_dict` (JSON-friendly: string paths)."""
    return {k: [(path_str(p), ax) for p, ax in g.axes] for k, g in spec.items()}


def rename_groups(spec: Mapping[str, Group], names: Mapping[str, str]) -> Spec:
    """Rename some groups (``{old: new}``), keeping the order."""
    unknown = set(names) - set(spec)
    if unknown:
        raise KeyError(f"no groups {sorted(unknown)} in the spec")
    out = {names.get(k, k): g for k, g in spec.items()}
    if len(out) != len(spec):
        raise ValueError("renaming would give two groups the same key")
    return out


def drop_groups(spec: Mapping[str, Group], keys: Iterable[str]) -> Spec:
    """The spec without the given groups (their axes are then left alone)."""
    keys = set(keys)
    unknown = keys - set(spec)
    if unknown:
        raise KeyError(f"no groups {sorted(unknown)} in the spec")
    return {k: g for k, g in spec.items() if k not in keys}


def merge_groups(
    spec: Mapping[str, Group], keys: Sequence[str], new_key: str | None = None
) -> Spec:
    """Join groups of equal size into one (at the position of the first), named ``new_key``.

    ``new_key`` defaults to the first key.
    """
    if not keys:
        raise ValueError("merge_groups needs at least one group")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise KeyError(f"no groups {missing} in the spec")
    sizes = {spec[k].size for k in keys}
    if len(sizes) != 1:
        raise ValueError(f"cannot merge groups of sizes {sorted(sizes)}: {list(keys)}")
    merged = Group(sizes.pop(), tuple(a for k in keys for a in spec[k].axes))
    new_key = keys[0] if new_key is None else new_key
    out: Spec = {}
    for k, g in spec.items():
        if k == keys[0]:
            out[new_key] = merged
        elif k not in keys:
            out[k] = g
    if len(out) != len(spec) - len(keys) + 1:
        raise ValueError(f"merged key {new_key!r} collides with another group")
    return out


# ------------------------------------------------------------------- checking
def _output_axes(trace: _Trace, spec: Mapping[str, Group]) -> dict[str, list[tuple[int, int]]]:
    """For each group, the ``(output leaf index, axis)`` pairs in its class."""
    g = trace.graph
    value = dict(zip(trace.paths, trace.leaf_values, strict=True))
    out: dict[str, list[tuple[int, int]]] = {}
    for key, group in spec.items():
        roots = {g.find((value[p], ax)) for p, ax in group.axes}
        out[key] = [
            (i, ax)
            for i, v in enumerate(trace.output_values)
            for ax in range(len(g.shapes[v]))
            if g.shapes[v][ax] > 1 and g.find((v, ax)) in roots
        ]
    return out


def _derangement_like(rng: np.random.Generator, n: int) -> np.ndarray:
    perm = rng.permutation(n)
    if n > 1 and np.array_equal(perm, np.arange(n)):
        perm = np.roll(perm, 1)  # the identity would test nothing
    return perm


def check_spec(
    module,
    variables: Mapping[str, Any],
    spec: Mapping[str, Group],
    x: Any,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float | None = None,
    groups: Iterable[str] | None = None,
    free_output: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Assert that permuting each group of ``spec`` at random leaves ``module``'s output unchanged.

    Groups are permuted one at a time (a random non-identity permutation each,
    seeded by ``seed`` and the group's position). Use variables without
    symmetries: freshly initialised BatchNorm layers are equal across channels
    and would hide a BatchNorm missing from a group.

    Args:
      module, variables: the model, as for :func:`derive_spec`.
      spec: the spec to check; every axis is validated first.
      x: a model input, e.g. ``[N, H, W, 3]``.
      seed: seeds the permutations.
      rtol, atol: tolerance of the comparison; ``atol`` defaults to ``rtol``
        times the largest absolute value of each reference output leaf.
      groups: check only these groups (default: all).
      free_output: the spec was derived with ``free_output=True``; outputs are
        compared after permuting the output axes that belong to the group.
      apply_kwargs: as for :func:`derive_spec`; with ``mutable`` only the first
        output and the updated variables are compared.

    Raises:
      ValueError: an axis is missing or has the wrong length (names the path).
      AssertionError: permuting a group changed the output (names the group).
    """
    variables = to_dict(variables)
    validate_spec(spec, variables)
    kwargs = dict(apply_kwargs or {})
    mutable = _mutable(kwargs)
    wanted = set(spec) if groups is None else set(groups)
    unknown = wanted - set(spec)
    if unknown:
        raise KeyError(f"no groups {sorted(unknown)} in the spec")

    @jax.jit
    def forward(v, x):
        out = module.apply(v, x, **kwargs)
        if not mutable:
            return jax.tree.leaves(out), {}
        y, state = out
        flat = flatten(to_dict(state))
        return jax.tree.leaves(y), {p: s for p, s in flat.items() if p in flat_vars}

    flat_vars = flatten(variables)
    # Permute on the host: eager jnp.take would compile a gather per leaf shape.
    variables = map_with_path(lambda _, leaf: np.asarray(leaf), variables)
    ref_out, ref_state = forward(variables, x)
    ref_out = [np.asarray(o) for o in ref_out]
    out_axes = _output_axes(_trace(module, variables, x, kwargs), spec) if free_output else {}

    for i, (key, group) in enumerate(spec.items()):
        if key not in wanted:
            continue
        perm = _derangement_like(np.random.default_rng([seed, i]), group.size)
        one = {key: group}
        got_out, got_state = forward(apply_permutation(variables, one, {key: perm}), x)
        expected = list(ref_out)
        for leaf, ax in out_axes.get(key, []):
            expected[leaf] = np.take(expected[leaf], perm, axis=ax)
        pairs = [
            (f"output leaf {j}", e, o)
            for j, (e, o) in enumerate(zip(expected, got_out, strict=True))
        ]
        if ref_state:
            want_state = flatten(
                apply_permutation(unflatten(ref_state), one, {key: perm}, strict=False)
            )
            pairs += [(f"updated {path_str(p)}", want_state[p], got_state[p]) for p in ref_state]
        for what, want, got in pairs:
            want, got = np.asarray(want), np.asarray(got)
            tol = rtol * float(np.max(np.abs(want), initial=0.0)) if atol is None else atol
            if not np.allclose(got, want, rtol=rtol, atol=tol):
                err = float(np.max(np.abs(got - want)))
                raise AssertionError(
                    f"permuting group {key!r} (size {group.size}, {len(group.axes)} axes) changed "
                    f"the model's {what}: max abs difference {err:.3g} (rtol {rtol}, atol {tol:.3g})"
                )
