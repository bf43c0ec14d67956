"""How each primitive joins axes: the graph behind :func:`pleas_jax.spec.derive_spec`.

``derive_spec`` traces ``module.apply`` to a jaxpr and walks it here
(:func:`_run`). Nodes are ``(value, axis)`` pairs; a union-find (:class:`_Graph`)
joins the nodes that must carry the same permutation, equation by equation, by
the primitive's rule in ``_RULES`` (a conv joins its input channels to the
kernel's and fixes its spatial axes, which it cannot permute). Plain calls
(``pjit``, ``remat``, ``custom_jvp`` ...) are walked into; control flow and
primitives without a rule raise :class:`UnsupportedPrimitiveError`, naming the
user's source line. Nothing here knows of variables, groups or specs (those are
:mod:`pleas_jax.spec`'s), so a new primitive's rule is added here, beside the
others, without touching the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax.extend.core as jcore
import numpy as np

__all__ = ["Rule", "UnsupportedPrimitiveError"]


class UnsupportedPrimitiveError(NotImplementedError):
    """:func:`~pleas_jax.spec.derive_spec` met a primitive it has no rule for."""


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
NOT_CALLS = frozenset(
    {"cond", "while", "scan", "shard_map", "xla_pmap", "pmap", "custom_transpose"}
)


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
    if eqn.primitive.name in NOT_CALLS:
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
                    "a rule to pleas_jax.spec_rules."
                )
            label = f"{name}[{eqn.params['name']}]" if "name" in eqn.params else name
            out_vals = _run(g, sub, in_vals, (*stack, (label, _frame(eqn))))
        for var, v in zip(eqn.outvars, out_vals, strict=True):
            env[var] = v
    return [read(a) for a in jaxpr.outvars]
