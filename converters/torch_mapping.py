"""torch state_dict <-> Flax variables: the per-tensor transposes and renames.

:func:`state_dict_to_flax` picks the module (inferred, named or given; see
:mod:`converters.torch_architecture`), checks the state_dict against it and
moves each tensor to its Flax path, conv kernels ``[O, I, kh, kw] -> [kh, kw,
I, O]`` and the fc kernel ``[O, I] -> [I, O]``; :func:`flax_to_state_dict` is
its exact inverse, with torch's ``num_batches_tracked`` counters (which Flax
does not keep) given back through :func:`num_batches_tracked`. Only
transposes, so torch -> Flax -> torch is bit-exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from converters.torch_architecture import (
    _requested,
    check_state_dict,
    infer_module,
    stem_channels,
)
from converters.torch_layout import IN_CHANNELS, ConversionError, layers
from pleas_jax.models import ResNet


# -------------------------------------------------------------- torch -> flax
def _numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16; float32 holds bf16 and fp16 values exactly.
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def state_dict_to_flax(
    state_dict: Mapping[str, torch.Tensor],
    arch: str | ResNet = "auto",
    num_classes: int | None = None,
) -> tuple[ResNet, dict]:
    """Convert a torchvision-layout ``state_dict`` (canonical keys) to Flax.

    Args:
      state_dict: ``{"conv1.weight": [O, C, k, k], ...}`` (any image channels
        ``C``) with no ``module.``
        or other prefix (see :func:`load_state_dict` for files).
      arch: ``"auto"`` (infer everything from shapes), a name from
        :data:`pleas_jax.models.ARCHITECTURES` (standard widths; the base width
        follows the stem conv), or a :class:`ResNet` to convert into.
      num_classes: classifier size; by default read off ``fc.weight``.

    Returns:
      ``(module, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
      holding float32 arrays (conv kernels ``[kh, kw, I, O]``, fc kernel ``[I, O]``).

    Raises:
      ConversionError: another architecture, missing/unexpected keys, shape
        mismatch, non-float or non-finite tensors.
    """
    if isinstance(arch, ResNet):
        module = arch
        try:
            module.validate()
        except ValueError as e:
            raise ConversionError(f"inconsistent architecture: {e}") from None
    elif arch == "auto":
        module = infer_module(state_dict, num_classes)
    else:
        module = _requested(state_dict, arch, num_classes)
    check_state_dict(state_dict, module)

    params: dict = {}
    stats: dict = {}

    def put(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        # Half-precision files are upcast exactly; parameters are float32 throughout.
        node[path[-1]] = jnp.asarray(value.astype(np.float32, copy=False))

    for layer in layers(module, stem_channels(state_dict)):
        t = layer.torch_name
        weight = _numpy(state_dict[f"{t}.weight"])
        if layer.kind == "conv":
            put(params, (*layer.flax_name, "kernel"), weight.transpose(2, 3, 1, 0))
        elif layer.kind == "fc":
            put(params, (*layer.flax_name, "kernel"), weight.T)
            put(params, (*layer.flax_name, "bias"), _numpy(state_dict[f"{t}.bias"]))
        else:
            put(params, (*layer.flax_name, "scale"), weight)
            put(params, (*layer.flax_name, "bias"), _numpy(state_dict[f"{t}.bias"]))
            put(stats, (*layer.flax_name, "mean"), _numpy(state_dict[f"{t}.running_mean"]))
            put(stats, (*layer.flax_name, "var"), _numpy(state_dict[f"{t}.running_var"]))
    return module, {"params": params, "batch_stats": stats}


def num_batches_tracked(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{bn module name: count}`` of a torch ``state_dict``; Flax keeps no such counter."""
    suffix = ".num_batches_tracked"
    return {k[: -len(suffix)]: int(v) for k, v in state_dict.items() if k.endswith(suffix)}


# -------------------------------------------------------------- flax -> torch
def input_channels(variables: Mapping[str, Any]) -> int:
    """The image channels Flax ``variables`` read: their stem kernel ``params/conv1/kernel
    [k, k, C, O]`` fixes them (:data:`IN_CHANNELS` when there is none: a shape check then
    names it)."""
    try:
        shape = tuple(np.shape(variables["params"]["conv1"]["kernel"]))
    except (KeyError, TypeError):
        return IN_CHANNELS
    return int(shape[2]) if len(shape) == 4 else IN_CHANNELS


def flax_to_state_dict(
    module: ResNet,
    variables: Mapping[str, Any],
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> OrderedDict[str, torch.Tensor]:
    """The torchvision ``state_dict`` of Flax ``variables`` (inverse of :func:`state_dict_to_flax`).

    Args:
      module: the Flax ResNet the variables belong to (any widths).
      variables: ``{"params": ..., "batch_stats": ...}``, for images of any
        number of channels (:func:`input_channels`).
      num_batches_tracked: torch's per-BN step counter, one value for all BN
        layers or ``{bn module name: count}`` (e.g. from :func:`num_batches_tracked`),
        for a bit-exact round trip; Flax does not keep it.

    Returns:
      An ordered ``{key: tensor}`` with torchvision's keys in its order,
      ``num_batches_tracked`` included (int64 scalars).
    """

    def get(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        node: Any = variables
        for k in (collection, *path):
            if not isinstance(node, Mapping) or k not in node:
                raise ConversionError(f"variables lack {'/'.join((collection, *path))!r}")
            node = node[k]
        arr = np.asarray(jax.device_get(node))
        if arr.shape != shape:
            raise ConversionError(
                f"{'/'.join((collection, *path))!r} has shape {arr.shape}; the module expects {shape}"
            )
        return arr

    def tensor(arr: np.ndarray) -> torch.Tensor:
        # An owned, writable copy: arrays from JAX are read-only views of its buffers.
        return torch.from_numpy(np.array(arr, order="C", copy=True))

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer in layers(module, input_channels(variables)):
        t, f, shape = layer.torch_name, layer.flax_name, layer.shape
        if layer.kind == "conv":
            hwio = (shape[2], shape[3], shape[1], shape[0])
            out[f"{t}.weight"] = tensor(get("params", (*f, "kernel"), hwio).transpose(3, 2, 0, 1))
        elif layer.kind == "fc":
            out[f"{t}.weight"] = tensor(get("params", (*f, "kernel"), shape[::-1]).T)
            out[f"{t}.bias"] = tensor(get("params", (*f, "bias"), shape[:1]))
        else:
            out[f"{t}.weight"] = tensor(get("params", (*f, "scale"), shape))
            out[f"{t}.bias"] = tensor(get("params", (*f, "bias"), shape))
            out[f"{t}.running_mean"] = tensor(get("batch_stats", (*f, "mean"), shape))
            out[f"{t}.running_var"] = tensor(get("batch_stats", (*f, "var"), shape))
            if isinstance(num_batches_tracked, Mapping):
                count = num_batches_tracked.get(t, 0)
            else:
                count = num_batches_tracked
            out[f"{t}.num_batches_tracked"] = torch.tensor(int(count), dtype=torch.long)
    return out
