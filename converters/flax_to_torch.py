"""pleas-jax models -> PyTorch: a state_dict file and the facts needed to run it.

The inverse of :mod:`converters.torch_to_flax`, for checkpoints trained,
converted or merged here. :func:`to_torch` gives the torchvision-layout
``state_dict`` of a model: a merged model's block-sparse layers become dense
convs whose forbidden blocks are exact zeros, so the torch model computes the
same function. A merged backbone with separate label spaces is exported with
one of its heads as ``fc``. :func:`save` writes the ``state_dict`` with
``torch.save`` and, beside it, a JSON file that says how to build the torch
model and feed it (config, input channels, size and normalisation, classes);
:func:`load` reads both back as ``(torch nn.Module in eval mode, that JSON's
facts)``, and :func:`read_info` reads the JSON alone.

For the standard ImageNet configs the file loads straight into torchvision's
``resnetNN`` (``torchvision.models.resnet50(num_classes=K)``); merged widths,
ResNet-20 and stems that read other than 3 channels (grey images) need
:class:`converters.TorchResNet`, which :func:`load` builds.

Example::

    sd, info = to_torch(module, variables)                 # or head="a" for a merged pair
    save("merged.pth", sd, info)                           # merged.pth + merged.pth.json
    net, info = load("merged.pth")                         # net(x), x [N, C, S, S]
    info["in_channels"], info["image_size"]                # C, S
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from converters.torch_architecture import stem_channels
from converters.torch_layout import ConversionError
from converters.torch_mapping import flax_to_state_dict, input_channels
from converters.torch_reference import torch_model
from pleas_jax import models
from pleas_jax.models import ResNet

FORMAT = "pleas-jax-torch-export"
FORMAT_VERSION = 1


def info_path(path: str | os.PathLike) -> Path:
    """The JSON file that goes with an exported ``state_dict`` file: ``X.pth`` -> ``X.pth.json``
    (the whole name, so that it cannot take the place of a ``X.json`` of the user's)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def with_head(
    module: ResNet, variables: Mapping[str, Any], head: Mapping[str, Any]
) -> tuple[ResNet, dict[str, Any]]:
    """A merged backbone and one routed head as one classifier.

    Args:
      module, variables: a backbone (``num_classes=None``) returning pooled
        features ``[N, C]``.
      head: ``{"kernel": [C, K], "bias": [K]}`` (:func:`pleas_jax.heads.route_heads`).

    Returns:
      ``(module, variables)`` whose ``fc`` is the head: logits ``[N, K]``.
    """
    if module.num_classes is not None:
        raise ConversionError("the model already has a classifier; a head needs a backbone")
    kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ConversionError(
            f"a head needs kernel [C, K] and bias [K]; got {kernel.shape} and {bias.shape}"
        )
    params = {**variables["params"], "fc": {"kernel": kernel, "bias": bias}}
    return module.clone(num_classes=int(kernel.shape[1])), {**variables, "params": params}


def to_torch(
    module: ResNet,
    variables: Mapping[str, Any],
    *,
    num_batches_tracked: int | Mapping[str, int] = 0,
    **info: Any,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """The torch ``state_dict`` of a model, and what :func:`save` records beside it.

    Args:
      module, variables: the Flax ResNet (any widths; block-structured merged
        layers are written dense) and its ``{"params", "batch_stats"}``.
      num_batches_tracked: torch's BN step counters, for a bit-exact round trip
        of a converted checkpoint (see :func:`converters.flax_to_state_dict`).
      **info: JSON-able facts to record (``image_size``, ``normalization``,
        ``classes``, ``source``, ...).

    Returns:
      ``(state_dict, info)``: torchvision's keys in its order; ``info`` holds
      ``format``, ``config`` (:meth:`ResNet.config`, without block splits),
      ``in_channels`` (image channels the stem reads, which the config does
      not say), ``torch_class`` (what :func:`load` builds) and the given facts.
    """
    dense = module.clone(splits=()) if module.splits else module
    state_dict = flax_to_state_dict(dense, variables, num_batches_tracked)
    channels = input_channels(variables)
    _, torch_class = torch_model(dense, channels)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": models.arch_name(dense),
        "torch_class": torch_class,
        "config": dense.config(),
        "in_channels": channels,
        **info,
    }
    return state_dict, record


def save(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``state_dict`` to ``path`` (``torch.save``) and ``info`` to its JSON file.

    Both are written under temporary names and renamed into place, the
    weights first: a failure leaves neither half-written, and a JSON file
    (which :func:`load` needs) never stands beside other weights than its own.

    Returns:
      ``(path, json_path)``.

    Raises:
      FileExistsError: either file exists and ``overwrite`` is false.
      ConversionError: a bad file name, or a directory in the way.
    """
    path, meta = Path(path), info_path(path)
    if path.suffix not in (".pth", ".pt"):
        raise ConversionError(f"{path}: name the state_dict file .pth or .pt")
    for p in (path, meta):
        if p.is_dir():
            raise ConversionError(f"{p}: is a directory")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace it)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    try:
        torch.save(OrderedDict(state_dict), tmp)
        tmp_meta.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # An overwritten export's old JSON goes first, so no step leaves new
        # weights described by old facts or the reverse.
        meta.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_meta, meta)
    finally:
        for p in (tmp, tmp_meta):
            p.unlink(missing_ok=True)
    return path, meta


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The facts :func:`save` recorded beside the exported file ``path`` (its
    :func:`info_path` JSON), checked to be an export's.

    Returns:
      The JSON object: ``format``, ``config``, ``torch_class``, ``in_channels``
      (absent from files exported before it was recorded) and the facts given to
      :func:`to_torch` (``image_size``, ``normalization``, ``crop``, ``classes``, ...).

    Raises:
      ConversionError: the JSON file is missing, unreadable or not an export's.
    """
    path, meta = Path(path), info_path(path)
    if not meta.is_file():
        raise ConversionError(f"{path}: no {meta.name} beside it; was it written by save()?")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConversionError(f"{meta}: not a pleas-jax torch export (format {got!r})")
    return info


def load(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """An exported model as a torch module, and the facts recorded beside it.

    Reads ``path`` (``torch.load(weights_only=True)``) and its JSON file
    (:func:`read_info`), builds the torch model the JSON names (torchvision's
    ``resnetNN`` or :class:`converters.TorchResNet`) for as many image channels
    as the weights' stem reads, and loads the weights strictly.

    Returns:
      ``(net, info)``, a pair (not the module alone: ``net, info = load(path)``):
      ``net`` the ``torch.nn.Module`` in eval mode, mapping images ``[N, C, S, S]``
      (``C = info["in_channels"]``, ``S = info["image_size"]``, normalised with
      ``info["normalization"]`` when that is recorded) to logits ``[N, K]``
      (pooled features ``[N, W]`` for a backbone); ``info`` the JSON object of
      :func:`read_info`.

    Raises:
      ConversionError: the JSON file is missing, unreadable or not an
        export's; the weights file is missing or unreadable, or its weights
        do not fit the model the JSON describes.
    """
    path, meta = Path(path), info_path(path)
    info = read_info(path)
    try:
        module = models.from_config(info["config"])
        module.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(
            f"{meta}: no usable architecture config ({type(e).__name__}: {e})"
        ) from None
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (its {meta.name} is there)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ConversionError(
            f"{path}: cannot read the weights ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    # The config does not fix the image channels; the stem's weights do.
    net, _ = torch_model(module, stem_channels(state_dict))
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ConversionError(
            f"{path}: the weights do not fit {info['torch_class']}: {e}"
        ) from None
    return net.eval(), info
