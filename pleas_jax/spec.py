"""Permutation specs: which tensor axes must be permuted together.

A *permutation group* is a set of ``(path, axis)`` pairs of a variables pytree
that can be permuted by one shared permutation without changing the model's
function: a conv's output channels, the BatchNorm after it and the next conv's
input channels; a whole residual stream. A *spec* maps a readable group key to
its :class:`Group`.

:func:`derive_spec` finds the groups by tracing ``module.apply`` to a jaxpr.
Nodes are ``(value, axis)`` pairs; a union-find joins the nodes that must carry
the same permutation, equation by equation, by the primitive's rule. A class
that holds a parameter axis and no axis of the model's input or output (nor an
axis some primitive cannot permute, such as a conv's spatial axes) is a group.
:func:`check_spec` permutes each group at random and asserts that the output is
unchanged. :func:`spec_from_dict` and the small editing helpers below write or
repair a spec by hand.

Example::

    model = models.resnet18(num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    spec = derive_spec(model, variables, jnp.zeros((1, 32, 32, 3)))
    spec["params/layer1_0/conv1/kernel:3"].size          # 64
    check_spec(model, variables, spec, jnp.ones((2, 32, 32, 3)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from pleas_jax.permutation import apply_permutation
from pleas_jax.tree import Path, flatten, map_with_path, parse_path, path_str, to_dict, unflatten

__all__ = [
    "Group",
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


class UnsupportedPrimitiveError(NotImplementedError):
    """:func:`derive_spec` met a primitive it has no rule for."""


def group_key(path: Path, axis: int) -> str:
    """The readable key of a group whose first axis is ``(path, axis)``: ``"params/fc/kernel:0"``."""
    return f"{path_str(path)}:{axis}"


# ---------------------------------------------------------------- union-find
_FIXED = (-1, -1)  # the node every unpermutable axis is joined to


class _Graph:
    """Values of a traced program, their shapes, and a union-find over (value, axis)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}
        # value -> ordinal of its first use by a primitive: orders groups and
        # their axes the same way whatever order the variables' dicts are in.
        self.first_use: dict[int, int] = {}

    def new(self, shape: Sequence[int]) -> int:
        self.shapes.append(tuple(int(d) for d in shape))
        return len(self.shapes) - 1

    def find(self, node: tuple[int, int]) -> tuple[int, int]:
        parent = self.parent
        root = node
        while (up := parent.get(root, root)) != root:
            root = up
        while node != root:
            parent[node], node = root, parent[node]
        return root

    def _union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def join(self, a: int, axis_a: int, b: int, axis_b: int) -> None:
        """Axis ``axis_a`` of value ``a`` carries the same permutation as ``axis_b`` of ``b``."""
        size = self.shapes[a][axis_a]
        if size != self.shapes[b][axis_b]:
            raise AssertionError(
                f"internal error: joining axes of sizes {size} and {self.shapes[b][axis_b]}"
            )
        # A size-1 axis has nothing to permute; joining it would only chain
        # broadcast axes into unrelated classes.
        if size > 1:
            self._union((a, axis_a), (b, axis_b))

    def fix(self, v: int, axes: Iterable[int] | None = None) -> None:
        """These axes of ``v`` cannot be permuted (all of them when ``axes`` is None)."""
        for ax in range(len(self.shapes[v])) if axes is None else axes:
            if self.shapes[v][ax] > 1:
                self._union((v, ax), _FIXED)

    def is_fixed(self, node: tuple[int, int]) -> bool:
        return self.find(node) == self.find(_FIXED)

    def constant(self, value: Any, shape: Sequence[int]) -> int:
        """A value not computed from the inputs (literal or closed-over array)."""
        v = self.new(shape)
        try:
            arr = np.asarray(value)
        except Exception:  # e.g. typed PRNG keys: nothing known about them
            arr = None
        for ax, size in enumerate(self.shapes[v]):
            if size <= 1:
                continue
            # A constant that varies along an axis pins that axis: permuting
            # the other operand would no longer line up with it.
            if arr is None or arr.shape != self.shapes[v] or not _uniform(arr, ax):
                self.fix(v, [ax])
        return v


def _uniform(arr: np.ndarray, axis: int) -> bool:
    return bool(np.all(arr == np.take(arr, [0], axis=axis)))


# --------------------------------------------------------------------- rules
# A rule gets the graph, the equation and the value ids of its inputs and
# outputs, and joins or fixes their axes.
Rule = Callable[[_Graph, Any, list[int], list[int]], None]


def _elementwise(g: _Graph, eqn, ins: list[int], outs: list[int]) -> None:
    for o in outs:
        out_shape = g.shapes[o]
        for i in ins:
            shape = g.shapes[i]
            if len(shape) == 0:
                continue
            if len(shape) != len(out_shape):  # lax broadcasts only scalars and size-1 axes
                g.fix(i)
                g.fix(o)
                continue
            for ax, size in enumerate(shape):
                # A size-1 operand axis is broadcast: uniform, it joins nothing.
                if size == out_shape[ax]:
                    g.join(i, ax, o, ax)


def _per_operand(g: _Graph, eqn, ins: list[int], outs: list[int]) -> None:
    # Identity on each operand (optimization_barrier, device_put).
    for i, o in zip(ins, outs, strict=True):
        for ax in range(len(g.shapes[o])):
            g.join(i, ax, o, ax)


def _broadcast_in_dim(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    for ax, out_ax in enumerate(eqn.params["broadcast_dimensions"]):
        # A size-1 axis broadcast to n is uniform along it: it joins nothing.
        if g.shapes[x][ax] == g.shapes[out][out_ax]:
            g.join(x, ax, out, out_ax)


def _reshape_blocks(src: Sequence[int], dst: Sequence[int]):
    """Pair up runs of non-1 axes of ``src`` and ``dst`` whose sizes multiply equally."""
    a = [i for i, d in enumerate(src) if d != 1]
    b = [j for j, d in enumerate(dst) if d != 1]
    ia = ib = 0
    while ia < len(a) and ib < len(b):
        sa, sb = [a[ia]], [b[ib]]
        pa, pb = src[a[ia]], dst[b[ib]]
        while pa != pb:
            if pa < pb:
                ia += 1
                sa.append(a[ia])
                pa *= src[a[ia]]
            else:
                ib += 1
                sb.append(b[ib])
                pb *= dst[b[ib]]
        yield sa, sb
        ia, ib = ia + 1, ib + 1


def _reshape(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    if eqn.params.get("dimensions") is not None:
        g.fix(x)
        g.fix(out)
        return
    for sa, sb in _reshape_blocks(g.shapes[x], g.shapes[out]):
        if len(sa) == 1 and len(sb) == 1:
            g.join(x, sa[0], out, sb[0])
        else:
            # Merged or split axes: a permutation of one factor is a structured
            # permutation of the product, which a group cannot express.
            g.fix(x, sa)
            g.fix(out, sb)


def _transpose(g: _Graph, eqn, ins, outs) -> None:
    for out_ax, ax in enumerate(eqn.params["permutation"]):
        g.join(ins[0], ax, outs[0], out_ax)


def _squeeze(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    dropped = {d % len(g.shapes[x]) for d in eqn.params["dimensions"]}
    kept = [ax for ax in range(len(g.shapes[x])) if ax not in dropped]
    for out_ax, ax in enumerate(kept):
        g.join(x, ax, out, out_ax)


def _reduce(g: _Graph, eqn, ins, outs) -> None:
    # Sums, maxima and minima are invariant to permuting the reduced axes, so
    # those join nothing; kept axes pass through.
    reduced = set(eqn.params["axes"])
    for x, out in zip(ins, outs, strict=True):
        kept = [ax for ax in range(len(g.shapes[x])) if ax not in reduced]
        for out_ax, ax in enumerate(kept):
            g.join(x, ax, out, out_ax)


def _argreduce(g: _Graph, eqn, ins, outs) -> None:
    # The index of the maximum depends on the order along the reduced axis.
    g.fix(ins[0], eqn.params["axes"])
    _reduce(g, eqn, ins, outs)


def _reduce_window(g: _Graph, eqn, ins, outs) -> None:
    p = eqn.params
    n = len(outs)  # generic reduce_window: operands, then as many init values
    for x, out in zip(ins[:n], outs, strict=True):
        for ax in range(len(g.shapes[x])):
            trivial = (
                p["window_dimensions"][ax] == 1
                and p["window_strides"][ax] == 1
                and tuple(p["padding"][ax]) == (0, 0)
                and p.get("base_dilation", (1,) * (ax + 1))[ax] == 1
            )
            if trivial:
                g.join(x, ax, out, ax)
            else:
                g.fix(x, [ax])
                g.fix(out, [ax])


def _conv(g: _Graph, eqn, ins, outs) -> None:
    lhs, rhs, out = ins[0], ins[1], outs[0]
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    groups = eqn.params["feature_group_count"]
    # Spatial axes: a conv is not equivariant to permuting positions.
    g.fix(lhs, lhs_spec[2:])
    g.fix(rhs, rhs_spec[2:])
    g.fix(out, out_spec[2:])
    if eqn.params["batch_group_count"] != 1:
        g.fix(lhs)
        g.fix(rhs)
        g.fix(out)
        return
    g.join(lhs, lhs_spec[0], out, out_spec[0])
    c_in = g.shapes[lhs][lhs_spec[1]]
    c_out = g.shapes[rhs][rhs_spec[0]]
    if groups == 1:
        g.join(lhs, lhs_spec[1], rhs, rhs_spec[1])
        g.join(rhs, rhs_spec[0], out, out_spec[1])
    elif groups == c_in and c_out == c_in:
        # Depthwise: channel c reads only input channel c.
        g.join(lhs, lhs_spec[1], rhs, rhs_spec[0])
        g.join(rhs, rhs_spec[0], out, out_spec[1])
    else:
        # Other grouped convs (and depthwise with a channel multiplier) allow
        # only permutations that respect the feature groups.
        g.fix(lhs, [lhs_spec[1]])
        g.fix(rhs, rhs_spec[:2])
        g.fix(out, [out_spec[1]])


def _dot_general(g: _Graph, eqn, ins, outs) -> None:
    lhs, rhs, out = ins[0], ins[1], outs[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc, strict=True):
        g.join(lhs, a, rhs, b)
    out_ax = 0
    for a, b in zip(lb, rb, strict=True):
        g.join(lhs, a, out, out_ax)
        g.join(rhs, b, out, out_ax)
        out_ax += 1
    for x, used in ((lhs, (*lc, *lb)), (rhs, (*rc, *rb))):
        for ax in range(len(g.shapes[x])):
            if ax not in used:
                g.join(x, ax, out, out_ax)
                out_ax += 1


def _concatenate(g: _Graph, eqn, ins, outs) -> None:
    dim, out = eqn.params["dimension"], outs[0]
    # Units from different operands cannot mix along the concatenated axis.
    g.fix(out, [dim])
    for x in ins:
        g.fix(x, [dim])
        for ax in range(len(g.shapes[x])):
            if ax != dim:
                g.join(x, ax, out, ax)


def _split(g: _Graph, eqn, ins, outs) -> None:
    x, dim = ins[0], eqn.params["axis"]
    g.fix(x, [dim])
    for out in outs:
        g.fix(out, [dim])
        for ax in range(len(g.shapes[x])):
            if ax != dim:
                g.join(x, ax, out, ax)


def _pad(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    for ax, cfg in enumerate(eqn.params["padding_config"]):
        if tuple(cfg) == (0, 0, 0):
            g.join(x, ax, out, ax)
        else:
            g.fix(x, [ax])
            g.fix(out, [ax])


def _slice(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    strides = eqn.params["strides"] or (1,) * len(g.shapes[x])
    for ax in range(len(g.shapes[x])):
        whole = g.shapes[x][ax] == g.shapes[out][ax] and strides[ax] == 1
        if whole:
            g.join(x, ax, out, ax)
        else:
            g.fix(x, [ax])
            g.fix(out, [ax])


def _rev(g: _Graph, eqn, ins, outs) -> None:
    x, out = ins[0], outs[0]
    flipped = set(eqn.params["dimensions"])
    for ax in range(len(g.shapes[x])):
        if ax in flipped:
            g.fix(x, [ax])
            g.fix(out, [ax])
        else:
            g.join(x, ax, out, ax)


def _iota(g: _Graph, eqn, ins, outs) -> None:
    g.fix(outs[0], [eqn.params["dimension"]])


_ELEMENTWISE = """
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sharding_constraint sign sin sinh sqrt square
stop_gradient sub tan tanh xor
""".split()

_RULES: dict[str, Rule] = {name: _elementwise for name in _ELEMENTWISE}
_RULES.update(
    {
        "argmax": _argreduce,
        "argmin": _argreduce,
        "broadcast_in_dim": _broadcast_in_dim,
        "concatenate": _concatenate,
        "conv_general_dilated": _conv,
        "device_put": _per_operand,
        "dot_general": _dot_general,
        "iota": _iota,
        "optimization_barrier": _per_operand,
        "pad": _pad,
        "reduce_and": _reduce,
        "reduce_max": _reduce,
        "reduce_min": _reduce,
        "reduce_or": _reduce,
        "reduce_prod": _reduce,
        "reduce_sum": _reduce,
        "reduce_window": _reduce_window,
        "reduce_window_max": _reduce_window,
        "reduce_window_min": _reduce_window,
        "reduce_window_sum": _reduce_window,
        "reshape": _reshape,
        "rev": _rev,
        "slice": _slice,
        "split": _split,
        "squeeze": _squeeze,
        "transpose": _transpose,
    }
)

# Control flow and mapped calls change what their inner values mean (carries,
# stacked slices, shards): entering them like a plain call would be wrong.
_NOT_CALLS = {"cond", "while", "scan", "shard_map", "xla_pmap", "pmap", "custom_transpose"}


def _frame(eqn) -> str:
    """The user's source line that emitted ``eqn``, or ``""``."""
    try:
        from jax._src import source_info_util  # private: only for messages

        return source_info_util.summarize(eqn.source_info).strip()
    except Exception:
        return ""


def _where(eqn, stack: tuple[tuple[str, str], ...]) -> str:
    # Equations inside library calls (jnp.sort is a jit) carry no user frame;
    # the innermost enclosing call that has one is where the user wrote it.
    frames = [_frame(eqn)] + [frame for _, frame in reversed(stack)]
    frame = next((f for f in frames if f), "an unknown location")
    inside = f" (inside {' > '.join(label for label, _ in stack)})" if stack else ""
    return f"{frame}{inside}"


def _sub_jaxpr(eqn):
    """The one jaxpr a call-like equation runs on its operands, else None."""
    if eqn.primitive.name in _NOT_CALLS:
        return None
    found = [p for p in eqn.params.values() if isinstance(p, jcore.ClosedJaxpr | jcore.Jaxpr)]
    if len(found) != 1:
        return None
    closed = found[0]
    jaxpr = closed.jaxpr if isinstance(closed, jcore.ClosedJaxpr) else closed
    # A plain call sees its operands unchanged: same count, same shapes.
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    for inner, outer in zip(
        [*jaxpr.invars, *jaxpr.outvars], [*eqn.invars, *eqn.outvars], strict=True
    ):
        if getattr(inner.aval, "shape", None) != getattr(outer.aval, "shape", None):
            return None
    return closed


def _run(g: _Graph, closed, ins: list[int], stack: tuple[tuple[str, str], ...]) -> list[int]:
    """Walk a (closed) jaxpr whose inputs are the values ``ins``; return its output values."""
    if isinstance(closed, jcore.ClosedJaxpr):
        jaxpr, consts = closed.jaxpr, list(closed.consts)
    else:
        jaxpr, consts = closed, [None] * len(closed.constvars)
    env: dict[Any, int] = {}
    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = g.constant(value, var.aval.shape)
    for var, v in zip(jaxpr.invars, ins, strict=True):
        env[var] = v

    def read(atom, use: bool = True) -> int:
        if isinstance(atom, jcore.Literal):
            return g.constant(atom.val, getattr(atom.aval, "shape", ()))
        v = env[atom]
        if use:
            g.first_use.setdefault(v, len(g.first_use))
        return v

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        rule = _RULES.get(name)
        # Operands of a call are used where the call's body uses them.
        in_vals = [read(a, use=rule is not None) for a in eqn.invars]
        if rule is not None:
            out_vals = [g.new(getattr(o.aval, "shape", ())) for o in eqn.outvars]
            rule(g, eqn, in_vals, out_vals)
        else:
            sub = _sub_jaxpr(eqn)
            if sub is None:
                raise UnsupportedPrimitiveError(
                    f"derive_spec has no rule for the primitive {name!r}, used at "
                    f"{_where(eqn, stack)}. Write the spec by hand (spec_from_dict) or add "
                    "a rule to pleas_jax.spec."
                )
            label = f"{name}[{eqn.params['name']}]" if "name" in eqn.params else name
            out_vals = _run(g, sub, in_vals, (*stack, (label, _frame(eqn))))
        for var, v in zip(eqn.outvars, out_vals, strict=True):
            env[var] = v
    return [read(a) for a in jaxpr.outvars]


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
    """
    t = _trace(module, variables, example_input, apply_kwargs or {})
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
    for key, axes in groups.items():
        axes = tuple((parse_path(p), int(ax)) for p, ax in axes)
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
