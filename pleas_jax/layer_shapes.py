"""The conv and dense layers of a source model, read from one traced forward pass.

:func:`layer_table` traces ``module.apply`` to a jaxpr (nothing is compiled or
run) and records, for every ``conv_general_dilated`` and ``dot_general`` whose
kernel is a parameter leaf, the kernel's feature sizes and groups and the taps
its strides, padding and dilation give per image, padding included or not.
:mod:`pleas_jax.accounting` turns this table into exact compute and parameter
counts of a merged model at any ratios.

Example::

    table = layer_table(model, variables, spec, (224, 224, 3))
    [(la.name, la.c_in, la.c_out, la.taps) for la in table.layers]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from pleas_jax import tracing
from pleas_jax.spec_rules import NOT_CALLS
from pleas_jax.tree import Path, flatten, path_str, unflatten

__all__ = ["Layer", "LayerTable", "layer_table"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv or dense layer of the source model.

    Attributes:
      name: the layer's module path, e.g. ``"layer1_0/conv1"``.
      kernel: path of its kernel in the variables, e.g.
        ``("params", "layer1_0", "conv1", "kernel")``.
      in_group, out_group: the groups of the kernel's input and output feature
        axes, ``None`` for an axis outside every group.
      c_in, c_out: input and output features of the source layer.
      kernel_size: spatial size of the kernel (``()`` for a dense layer).
      positions: output positions per image (``H_out * W_out``; 1 for a dense
        layer on pooled features).
      taps: kernel taps summed over output positions, padding included
        (``prod(kernel_size) * positions``).
      valid_taps: the taps that read real input rather than padding.
      bias: whether the layer adds a bias.
    """

    name: str
    kernel: Path
    in_group: str | None
    out_group: str | None
    c_in: int
    c_out: int
    kernel_size: tuple[int, ...]
    positions: int
    taps: int
    valid_taps: int
    bias: bool


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """Everything the accounting needs about a source model at one input size.

    Attributes:
      layers: the conv/dense layers in execution order.
      params: ``(path, shape, {axis: group})`` for every leaf of the ``params``
        collection.
      input_shape: one image, ``(H, W, C)``.
    """

    layers: tuple[Layer, ...]
    params: tuple[tuple[Path, tuple[int, ...], dict[int, str]], ...]
    input_shape: tuple[int, ...]


def image_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``(H, W, C)`` of one image from ``(H, W, C)`` or ``(N, H, W, C)``; a
    ``ValueError`` for any other shape."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C), got {tuple(input_shape)}")
    return shape


def _axis_groups(spec: Mapping[str, Any]) -> dict[Path, dict[int, str]]:
    out: dict[Path, dict[int, str]] = {}
    for g, group in spec.items():
        for path, axis in group.axes:
            out.setdefault(tuple(path), {})[int(axis)] = g
    return out


def _valid_taps_1d(size_in, size_out, k, stride, pad_lo, lhs_dil, rhs_dil) -> int:
    """``(output, tap)`` pairs of one spatial axis that read an input element."""
    o = np.arange(size_out)[:, None]
    t = np.arange(k)[None, :]
    pos = o * stride + t * rhs_dil - pad_lo  # in the lhs-dilated input
    extent = (size_in - 1) * lhs_dil + 1
    ok = (pos >= 0) & (pos < extent) & (pos % lhs_dil == 0)
    return int(ok.sum())


# Primitives that pass a kernel on unchanged (up to dtype).
_PASS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "device_put"}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        if isinstance(value, jcore.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jcore.Jaxpr):
            yield value


def _walk(jaxpr, env: dict, found: list, stack: tuple[str, ...]) -> None:
    """Collect conv / dot_general equations whose kernel is a parameter leaf.

    ``env`` maps variables of ``jaxpr`` to the parameter path they carry.
    """

    def path_of(atom):
        return None if isinstance(atom, jcore.Literal) else env.get(atom)

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [path_of(v) for v in eqn.invars]
        if name in _PASS and ins and ins[0] is not None:
            env[eqn.outvars[0]] = ins[0]
        elif name == "conv_general_dilated":
            found.append((eqn, ins[1], 1, stack))
        elif name == "dot_general":
            # Flax's Dense puts the kernel on the right.
            idx = 1 if ins[1] is not None else 0
            found.append((eqn, ins[idx], idx, stack))
        elif name in NOT_CALLS:
            # A loop body runs many times and a branch maybe never: a layer in
            # one has no single count (derive_spec refuses them too).
            carried = [p for p in ins if p is not None]
            if carried:
                raise ValueError(
                    f"parameters {path_str(carried[0])} enter a {name}: layers inside loops, "
                    "branches or mapped calls cannot be counted; unroll them"
                )
        else:
            for sub in _sub_jaxprs(eqn):
                # Calls (jit, custom_jvp, remat) map operands to inputs one to one.
                if len(sub.invars) != len(eqn.invars):
                    continue
                inner = {iv: p for iv, p in zip(sub.invars, ins, strict=True) if p is not None}
                _walk(sub, inner, found, (*stack, name))
                for ov, iv in zip(eqn.outvars, sub.outvars, strict=False):
                    if not isinstance(iv, jcore.Literal) and iv in inner:
                        env[ov] = inner[iv]


def _layer_from_conv(eqn, path: Path, axis_groups) -> Layer:
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    dn = p["dimension_numbers"]
    where = path_str(path)
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise ValueError(f"{where}: grouped convolutions are not supported by the accounting")
    ks = tuple(int(rhs[d]) for d in dn.rhs_spec[2:])
    size_in = [int(lhs[d]) for d in dn.lhs_spec[2:]]
    size_out = [int(out[d]) for d in dn.out_spec[2:]]
    positions = math.prod(size_out)
    valid = 1
    for i, k in enumerate(ks):
        valid *= _valid_taps_1d(
            size_in[i],
            size_out[i],
            k,
            p["window_strides"][i],
            p["padding"][i][0],
            p["lhs_dilation"][i],
            p["rhs_dilation"][i],
        )
    in_ax, out_ax = dn.rhs_spec[1], dn.rhs_spec[0]
    groups = axis_groups.get(path, {})
    return Layer(
        name="/".join(path[1:-1]),
        kernel=path,
        in_group=groups.get(in_ax),
        out_group=groups.get(out_ax),
        c_in=int(rhs[in_ax]),
        c_out=int(rhs[out_ax]),
        kernel_size=ks,
        positions=positions,
        taps=math.prod(ks) * positions,
        valid_taps=valid,
        bias=False,
    )


def _layer_from_dot(eqn, path: Path, axis_groups, kernel_is_rhs: bool) -> Layer:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x, k = (v.aval.shape for v in eqn.invars[:2])
    contract, batch = (rc, rb) if kernel_is_rhs else (lc, lb)
    if not kernel_is_rhs:
        x, k = k, x
    where = path_str(path)
    free = [ax for ax in range(len(k)) if ax not in (*contract, *batch)]
    if len(contract) != 1 or len(free) != 1 or batch:
        raise ValueError(f"{where}: only [C_in, C_out] dense kernels are supported")
    in_ax, out_ax = contract[0], free[0]
    groups = axis_groups.get(path, {})
    # Every non-contracted axis of x is a position (batch of 1 while tracing).
    positions = math.prod(x) // int(k[in_ax])
    return Layer(
        name="/".join(path[1:-1]),
        kernel=path,
        in_group=groups.get(in_ax),
        out_group=groups.get(out_ax),
        c_in=int(k[in_ax]),
        c_out=int(k[out_ax]),
        kernel_size=(),
        positions=positions,
        taps=positions,
        valid_taps=positions,
        bias=False,
    )


def layer_table(
    module, variables: Mapping[str, Any], spec: Mapping[str, Any], input_shape: Sequence[int]
) -> LayerTable:
    """The conv/dense layers of ``module`` and its parameter shapes, for accounting.

    Traces ``module.apply(variables, x)`` for one image ``x [1, H, W, C]`` to a
    jaxpr (nothing is computed) and reads every ``conv_general_dilated`` and
    ``dot_general`` whose kernel is a parameter leaf: its strides, padding and
    dilation give the exact taps; the spec gives the groups of the kernel's
    feature axes.

    Args:
      module, variables: a source model (the unmerged one); only the shapes of
        the variables are read, so ``jax.ShapeDtypeStruct`` leaves (from
        ``jax.eval_shape(module.init, ...)``) do.
      spec: its permutation spec.
      input_shape: ``(H, W, C)`` or ``(N, H, W, C)``; counts are per image.

    Returns:
      a :class:`LayerTable`.

    Raises:
      ValueError: a bad ``input_shape``, or parameters used inside a loop,
        branch or mapped call (``scan``, ``fori_loop``, ``cond``, ...), whose
        layers have no single count.
    """
    shape = image_shape(input_shape)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    key = tracing.signature(module, variables, x, spec=tuple(spec.items()))
    return tracing.cached("layer_table", key, lambda: _layer_table(module, variables, spec, x))


def _layer_table(module, variables, spec, x) -> LayerTable:
    flat = flatten(variables)
    paths = list(flat)
    axis_groups = _axis_groups(spec)

    def fn(leaves, x):
        return module.apply(unflatten(dict(zip(paths, leaves, strict=True))), x)

    leaves = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in flat.values()]
    closed = jax.make_jaxpr(fn)(leaves, x)
    jaxpr = closed.jaxpr
    env = {v: p for v, p in zip(jaxpr.invars[: len(paths)], paths, strict=True)}
    found: list = []
    _walk(jaxpr, env, found, ())

    layers = []
    for eqn, path, idx, stack in found:
        if path is None or path[0] != "params":
            if eqn.primitive.name == "conv_general_dilated":
                raise ValueError(
                    f"a convolution (inside {'/'.join(stack) or 'the top level'}) has a kernel "
                    "that is not a parameter leaf; the accounting cannot name it"
                )
            continue  # e.g. a dot of two activations: no kernel, no layer
        if eqn.primitive.name == "conv_general_dilated":
            layers.append(_layer_from_conv(eqn, path, axis_groups))
        else:
            layers.append(_layer_from_dot(eqn, path, axis_groups, idx == 1))

    bias_of = {p[:-1] for p in paths if p[0] == "params" and p[-1] == "bias"}
    layers = [dataclasses.replace(la, bias=la.kernel[:-1] in bias_of) for la in layers]
    param_rows = tuple(
        (p, tuple(int(d) for d in np.shape(v)), dict(axis_groups.get(p, {})))
        for p, v in flat.items()
        if p[0] == "params"
    )
    return LayerTable(tuple(layers), param_rows, tuple(x.shape[1:]))
