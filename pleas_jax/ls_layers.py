"""The merged model's conv/dense layers as regressions: geometry and matrices.

A :class:`Layer` is one conv or dense layer of the merged model as least
squares sees it (kind, kernel geometry read from the Flax modules while
tracing, spec groups and ``[merged | A-only | B-only]`` channel splits).
A kernel ``[*kernel_size, C_in, C_out]`` (+ bias) is the matrix
``[C_in * taps (+1), C_out]`` with channel-major rows
(:func:`weights_to_matrix`), matching the patch rows of :func:`layer_rows`;
:func:`layer_apply` applies the layer itself, and :func:`channel_mask` /
:func:`matrix_mask` say which inputs each output may read. The statistics
(:mod:`pleas_jax.ls_statistics`), gradient descent (:mod:`pleas_jax.ls_descent`)
and the solve (:mod:`pleas_jax.least_squares`) all work over these.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from pleas_jax import tracing
from pleas_jax.partial import GroupBlocks
from pleas_jax.tree import flatten, path_str, to_dict, unflatten

Weights = dict[str, dict[str, Any]]  # layer name -> {"kernel": ..., "bias": ...}
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv/dense layer of the merged model, as least squares sees it.

    Attributes:
      name: the layer's path, ``"layer1_0/conv1"`` (its parameters live under
        ``params/<name>`` and its features under ``features/<name>``).
      kind: ``"conv"`` or ``"dense"``.
      kernel_size: spatial kernel shape, ``()`` for a dense layer.
      strides, dilation: per spatial axis (``()`` for dense).
      padding: explicit ``(low, high)`` per spatial axis.
      bias: whether the layer adds a bias.
      in_group, out_group: spec groups of the kernel's input and output axes
        (``None`` for an axis outside every group, which counts as merged).
      in_splits, out_splits: ``(merged, A-only, B-only)`` channel counts.
    """

    name: str
    kind: str
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    bias: bool
    in_group: str | None
    out_group: str | None
    in_splits: tuple[int, int, int]
    out_splits: tuple[int, int, int]

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("/"))

    @property
    def c_in(self) -> int:
        return sum(self.in_splits)

    @property
    def c_out(self) -> int:
        return sum(self.out_splits)

    @property
    def taps(self) -> int:
        """Kernel positions per input channel (1 for dense)."""
        return math.prod(self.kernel_size)

    @property
    def dim(self) -> int:
        """Columns of X̃: ``C_in * taps`` (+1 for the bias)."""
        return self.c_in * self.taps + int(self.bias)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The merged kernel, ``[*kernel_size, C_in, C_out]``."""
        return (*self.kernel_size, self.c_in, self.c_out)

    @property
    def gram_bytes(self) -> int:
        """Memory of the fp32 Gram ``[dim, dim]``."""
        return 4 * self.dim * self.dim


def statistics_bytes(layer: Layer, *, init: bool = True, target_gram: bool = False) -> int:
    """Device memory of one layer's accumulated sums (fp32), as
    :func:`pleas_jax.ls_statistics.layer_statistics` returns them.

    ``gram [dim, dim]``, ``cross [dim, C_out]``, ``target_sq [C_out]`` and
    ``count []``; with ``init`` also ``init``, ``init_grad [dim, C_out]`` and
    ``init_sq [C_out]``; with ``target_gram`` also ``[C_out, C_out]``.
    """
    d, k = layer.dim, layer.c_out
    n = d * d + d * k + k + 1
    if init:
        n += 2 * d * k + k
    if target_gram:
        n += k * k
    return 4 * n


def _tup(v, n: int, default: int = 1) -> tuple[int, ...]:
    if v is None:
        return (default,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(i) for i in v)


def _trace_layers(module, variables, x) -> dict[tuple[str, ...], dict[str, Any]]:
    """Geometry of every ``nn.Conv`` / ``nn.Dense`` call in the forward pass."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        path = tuple(mod.path)
        if context.method_name == "__call__" and path not in found:
            if isinstance(mod, nn.Conv):
                found[path] = _conv_geometry(mod, args[0].shape, path)
            elif isinstance(mod, nn.Dense):
                found[path] = {
                    "kind": "dense",
                    "kernel_size": (),
                    "strides": (),
                    "padding": (),
                    "dilation": (),
                    "bias": bool(mod.use_bias),
                }
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: module.apply(v, x), variables, x)
    return found


def _conv_geometry(mod: nn.Conv, in_shape, path) -> dict[str, Any]:
    where = f"layer {path_str(path)}"
    ks = _tup(mod.kernel_size, 1)
    nd = len(ks)
    if len(in_shape) != nd + 2:
        raise ValueError(f"{where}: least squares needs inputs [N, *spatial, C], got {in_shape}")
    if mod.feature_group_count != 1 or mod.mask is not None:
        raise ValueError(f"{where}: grouped or masked convolutions are not supported")
    if any(d != 1 for d in _tup(mod.input_dilation, nd)):
        raise ValueError(f"{where}: input (transposed) dilation is not supported")
    strides = _tup(mod.strides, nd)
    dilation = _tup(mod.kernel_dilation, nd)
    pad = canonicalize_padding(mod.padding, nd)
    if isinstance(pad, str):
        if pad.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"{where}: padding {pad!r} is not supported")
        window = [(k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True)]
        pad = jax.lax.padtype_to_pads(in_shape[1:-1], window, strides, pad.upper())
    return {
        "kind": "conv",
        "kernel_size": ks,
        "strides": strides,
        "padding": tuple((int(lo), int(hi)) for lo, hi in pad),
        "dilation": dilation,
        "bias": bool(mod.use_bias),
    }


def _group_splits(group: str | None, blocks: Mapping[str, GroupBlocks], n: int, where: str):
    if group is None:
        return (int(n), 0, 0)
    if group not in blocks:
        raise ValueError(f"{where}: no blocks for group {group!r}")
    m, a, b = blocks[group].sizes
    if m + a != n:
        raise ValueError(
            f"{where}: group {group!r} has {m + a} units in its blocks, the kernel {n}"
        )
    return (m, a, b)


def find_layers(
    module,
    variables: Mapping[str, Any],
    spec: Mapping[str, Any],
    blocks: Mapping[str, GroupBlocks],
    example_input: Any,
) -> dict[str, Layer]:
    """Every conv/dense layer of a source model, sized for the merged model.

    Args:
      module, variables: a source model (A); its forward pass on
        ``example_input [N, H, W, C]`` is traced (shapes only).
      spec, blocks: the permutation spec and the merge blocks per group.

    Returns:
      layer name -> :class:`Layer`, in forward order.

    Raises:
      ValueError: a kernel belongs to a module other than ``nn.Conv`` /
        ``nn.Dense``, or a geometry least squares cannot express.
    """
    variables = to_dict(variables)
    flat = flatten(variables.get("params", {}))
    traced = tracing.cached(
        "ls_layers",
        tracing.signature(module, variables, example_input),
        lambda: _trace_layers(module, variables, example_input),
    )
    axis_group = {(tuple(p), ax): g for g, grp in spec.items() for p, ax in grp.axes}
    layers: dict[str, Layer] = {}
    for path, geo in traced.items():
        kernel = flat.get((*path, "kernel"))
        if kernel is None:
            continue
        where = f"layer {path_str(path)}"
        shape = np.shape(kernel)
        nd = len(shape)
        if shape[:-2] != tuple(geo["kernel_size"]):
            raise ValueError(
                f"{where}: kernel {shape} does not match kernel_size {geo['kernel_size']}"
            )
        if geo["bias"] and (*path, "bias") not in flat:
            raise ValueError(f"{where} uses a bias but params/{path_str(path)}/bias is missing")
        kp = ("params", *path, "kernel")
        gin, gout = axis_group.get((kp, nd - 2)), axis_group.get((kp, nd - 1))
        layers[path_str(path)] = Layer(
            name=path_str(path),
            in_group=gin,
            out_group=gout,
            in_splits=_group_splits(gin, blocks, shape[-2], where),
            out_splits=_group_splits(gout, blocks, shape[-1], where),
            **geo,
        )
    seen = {tuple(layer.path) for layer in layers.values()}
    for p in flat:
        if p[-1] == "kernel" and p[:-1] not in seen:
            raise ValueError(
                f"layer {path_str(p[:-1])} has a kernel but is not an nn.Conv or nn.Dense used in the "
                "forward pass; least squares cannot refit it"
            )
    return layers


# ---------------------------------------------------------- rows and matrices
def conv_patches(x, kernel_size, strides, padding, dilation):
    """The input patch seen by every output position of a conv.

    Args:
      x: ``[N, *spatial, C]``.
      kernel_size, strides, dilation: per spatial axis.
      padding: ``(low, high)`` per spatial axis (negative crops).

    Returns:
      ``[N, *out_spatial, C * prod(kernel_size)]``, column ``c * taps + t``
      with ``t`` the row-major kernel offset: ``patches @ weights_to_matrix(k)``
      equals ``conv_general_dilated(x, k)``. Exact (slices, no matmul).
    """
    zero = jnp.zeros((), x.dtype)
    x = jax.lax.pad(x, zero, [(0, 0, 0), *[(int(lo), int(hi), 0) for lo, hi in padding], (0, 0, 0)])
    spatial = x.shape[1:-1]
    out = [
        (s - d * (k - 1) - 1) // st + 1
        for s, k, st, d in zip(spatial, kernel_size, strides, dilation, strict=True)
    ]
    if any(o <= 0 for o in out):
        raise ValueError(f"input {x.shape} is too small for kernel {kernel_size} (after padding)")
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel_size)):
        start = (0, *(o * d for o, d in zip(offs, dilation, strict=True)), 0)
        limit = (
            x.shape[0],
            *(s + st * (n - 1) + 1 for s, st, n in zip(start[1:-1], strides, out, strict=True)),
            x.shape[-1],
        )
        cols.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
    p = jnp.stack(cols, axis=-1)  # [N, *out, C, taps]: channel-major columns
    return p.reshape(*p.shape[:-2], -1)


def layer_rows(layer: Layer, x):
    """Regression inputs X̃ of ``layer`` from its merged input features.

    ``x [N, ..., C_in] -> [rows, dim]`` (rows: examples times output
    positions, example-major; a ones column last when the layer has a bias).
    """
    if layer.kind == "conv":
        x = conv_patches(x, layer.kernel_size, layer.strides, layer.padding, layer.dilation)
    rows = x.reshape(-1, x.shape[-1])
    if layer.bias:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows


_CONV_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def layer_apply(layer: Layer, x, weights: Mapping[str, Any]):
    """The merged layer on its merged input ``x [N, ..., C_in] -> [N, ..., C_out]`` (fp32)."""
    k = weights["kernel"]
    if layer.kind == "conv":
        y = jax.lax.conv_general_dilated(
            x,
            k,
            layer.strides,
            layer.padding,
            rhs_dilation=layer.dilation,
            dimension_numbers=_CONV_DIMS[len(layer.kernel_size)],
            precision=_HI,
        )
    else:
        y = jnp.matmul(x, k, precision=_HI)
    if layer.bias:
        y = y + weights["bias"]
    return y


def weights_to_matrix(layer: Layer, kernel, bias=None):
    """``kernel [*k, C_in, C_out]`` (+ ``bias [C_out]``) -> ``[dim, C_out]``."""
    kernel = jnp.asarray(kernel, jnp.float32)
    if kernel.shape != layer.kernel_shape:
        raise ValueError(
            f"layer {layer.name}: kernel {kernel.shape}, expected {layer.kernel_shape}"
        )
    w = jnp.moveaxis(kernel, -2, 0).reshape(layer.c_in * layer.taps, layer.c_out)
    if layer.bias:
        b = (
            jnp.zeros((layer.c_out,), jnp.float32)
            if bias is None
            else jnp.asarray(bias, jnp.float32)
        )
        w = jnp.concatenate([w, b[None]], axis=0)
    return w


def matrix_to_weights(layer: Layer, w) -> dict[str, Any]:
    """Inverse of :func:`weights_to_matrix`: ``{"kernel": ..., "bias": ...}``."""
    n = layer.c_in * layer.taps
    kernel = jnp.moveaxis(w[:n].reshape(layer.c_in, *layer.kernel_size, layer.c_out), 0, -2)
    out = {"kernel": kernel}
    if layer.bias:
        out["bias"] = w[n]
    return out


def channel_mask(layer: Layer) -> np.ndarray:
    """``[C_in, C_out]`` bool: which input channels each output may read."""
    mi, ai, _ = layer.in_splits
    mo, ao, _ = layer.out_splits
    mask = np.ones((layer.c_in, layer.c_out), bool)
    mask[mi + ai :, mo : mo + ao] = False  # A-only outputs never read B-only inputs
    mask[mi : mi + ai, mo + ao :] = False  # and B-only outputs never read A-only inputs
    return mask


def matrix_mask(layer: Layer) -> np.ndarray:
    """``[dim, C_out]`` bool: :func:`channel_mask` over patch columns, bias allowed."""
    m = np.repeat(channel_mask(layer), layer.taps, axis=0)
    if layer.bias:
        m = np.concatenate([m, np.ones((1, layer.c_out), bool)])
    return m


def weights_of(variables: Mapping[str, Any], layers: Mapping[str, Layer]) -> Weights:
    """The kernels (and biases) of ``layers`` in a merged variables tree."""
    params = to_dict(variables)["params"]
    out: Weights = {}
    for name, layer in layers.items():
        node = params
        for k in layer.path:
            if k not in node:
                raise ValueError(f"the merged variables have no layer params/{name}")
            node = node[k]
        shape = np.shape(node["kernel"])
        if shape != layer.kernel_shape:
            raise ValueError(
                f"params/{name}/kernel has shape {shape}, the blocks give {layer.kernel_shape}"
            )
        out[name] = {"kernel": jnp.asarray(node["kernel"], jnp.float32)}
        if layer.bias:
            if "bias" not in node:
                raise ValueError(f"the merged variables have no params/{name}/bias")
            out[name]["bias"] = jnp.asarray(node["bias"], jnp.float32)
    return out


def apply_solution(merged_variables: Mapping[str, Any], solution: Mapping[str, Mapping[str, Any]]):
    """``merged_variables`` with the kernels (and biases) of ``solution`` written in.

    ``solution``: layer name -> ``{"kernel": [*k, C_in, C_out], "bias": [C_out]}``
    (other keys are ignored). Shapes must match the merged model's params.
    """
    flat = flatten(to_dict(merged_variables))
    for name, w in solution.items():
        for leaf in ("kernel", "bias"):
            if leaf not in w:
                continue
            path = ("params", *name.split("/"), leaf)
            if path not in flat:
                raise ValueError(f"the merged variables have no {path_str(path)}")
            if np.shape(flat[path]) != np.shape(w[leaf]):
                raise ValueError(
                    f"{path_str(path)} has shape {np.shape(flat[path])}, the solution {np.shape(w[leaf])}"
                )
            flat[path] = jnp.asarray(w[leaf], jnp.asarray(flat[path]).dtype)
    return unflatten(flat)
