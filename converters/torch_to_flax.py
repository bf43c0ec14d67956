"""PyTorch (torchvision layout) ResNet checkpoints <-> Flax variables, verified.

Users arrive with torchvision-style ResNet checkpoints, saved bare, inside
``{'model': ...}`` / ``{'state_dict': ...}``, from ``DataParallel`` (``module.``
prefixes) or with EMA copies. This module reads them safely
(``torch.load(weights_only=True)`` always), finds the state_dict, infers or
validates the architecture from the tensor shapes, and maps it onto the Flax
ResNet of :mod:`pleas_jax.models`:

- ``layer1.0.conv1.weight [O, I, kh, kw]`` -> ``params/layer1_0/conv1/kernel [kh, kw, I, O]``
- ``layer1.0.bn1.weight`` / ``bias`` -> ``params/layer1_0/bn1/scale`` / ``bias``
- ``layer1.0.bn1.running_mean`` / ``running_var`` -> ``batch_stats/layer1_0/bn1/mean`` / ``var``
- ``layer1.0.bn1.num_batches_tracked`` -> not kept (give it back to :func:`flax_to_state_dict`)
- ``fc.weight [O, I]``, ``fc.bias`` -> ``params/fc/kernel [I, O]``, ``params/fc/bias``

The mapping is a transpose per tensor, so torch -> Flax -> torch is bit-exact.

This module is the entry point: :func:`convert_file` and :class:`Converted`
live here, and every public name of the modules below is re-exported: import
from here (or from :mod:`converters`), not from those modules. One concept per
module, each importing only those listed before it:

- :mod:`converters.torch_layout`: each layer's torch and Flax names and shapes;
  :class:`ConversionError`;
- :mod:`converters.torch_architecture`: the ResNet a state_dict holds,
  inferred from or checked against its shapes;
- :mod:`converters.torch_mapping`: state_dict <-> Flax variables;
- :mod:`converters.torch_checkpoint`: reading checkpoint files (containers,
  ``module.`` prefixes, EMA copies);
- :mod:`converters.torch_reference`: a torch twin of any config and :func:`verify`.

Example::

    conv = convert_file("resnet50.pth", arch="auto")       # or state_dict_to_flax(sd)
    logits = conv.module.apply(conv.variables, images)     # images [N, H, W, C]
    report = verify(conv.module, conv.variables, conv.state_dict)
    print(report.max_abs, report.max_rel)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from converters.torch_architecture import check_state_dict, infer_module, stem_channels
from converters.torch_checkpoint import load_state_dict, sha256_file
from converters.torch_layout import IN_CHANNELS, ConversionError, Layer, layers, torch_shapes
from converters.torch_mapping import (
    flax_to_state_dict,
    input_channels,
    num_batches_tracked,
    state_dict_to_flax,
)
from converters.torch_reference import (
    TorchResNet,
    Verification,
    randomize_batch_norm,
    torch_model,
    verify,
)
from pleas_jax.models import ResNet

__all__ = [
    "IN_CHANNELS",
    "ConversionError",
    "Converted",
    "Layer",
    "TorchResNet",
    "Verification",
    "check_state_dict",
    "convert_file",
    "flax_to_state_dict",
    "infer_module",
    "input_channels",
    "layers",
    "load_state_dict",
    "num_batches_tracked",
    "randomize_batch_norm",
    "sha256_file",
    "state_dict_to_flax",
    "stem_channels",
    "torch_model",
    "torch_shapes",
    "verify",
]


@dataclasses.dataclass
class Converted:
    """A converted checkpoint.

    Attributes:
      module: the Flax ResNet.
      variables: ``{"params": ..., "batch_stats": ...}``.
      state_dict: the torch state_dict it came from (canonical keys).
      num_batches_tracked: torch's BN counters, for :func:`flax_to_state_dict`.
      source_sha256: SHA-256 of the source file.
    """

    module: ResNet
    variables: dict
    state_dict: dict[str, torch.Tensor]
    num_batches_tracked: dict[str, int]
    source_sha256: str | None = None


def convert_file(
    path: str | Path,
    arch: str = "auto",
    num_classes: int | None = None,
    ema: bool = False,
) -> Converted:
    """:func:`load_state_dict` then :func:`state_dict_to_flax`; errors name the file."""
    path = Path(path)
    sd = load_state_dict(path, ema=ema)
    try:
        module, variables = state_dict_to_flax(sd, arch, num_classes)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    return Converted(module, variables, sd, num_batches_tracked(sd), sha256_file(path))
