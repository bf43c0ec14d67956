"""Where each tensor of a torchvision ResNet lives, in torch's names and in Flax's.

Every other converter module works from one list: :func:`layers` walks a
:class:`~pleas_jax.models.ResNet` config (any widths) and gives each conv,
BatchNorm and linear layer with its torchvision module name, its Flax module
path and its torch weight shape; :func:`torch_shapes` expands that into the
``{key: shape}`` of the state_dict torchvision would have. Reading shapes off a
config rather than off a torch model is what lets merged models with free
widths convert. :class:`ConversionError`, the one error every converter
raises, lives here too (with ``_first_and_count``, how its messages name a list
of keys), at the bottom, so that every module above can raise it. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

from pleas_jax.models import ResNet

# The Flax module takes its input channels from the data, so its config does
# not record them: they are read off the stem conv where there is one (a
# state_dict's ``conv1.weight``, the variables' ``conv1/kernel``), else RGB.
IN_CHANNELS = 3

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or shape."""


def _first_and_count(keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"


# --------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv, BatchNorm or linear layer, in both namings.

    Attributes:
      torch_name: torchvision module name, e.g. ``"layer1.0.downsample.0"``.
      flax_name: Flax module path, e.g. ``("layer1_0", "downsample_0")``.
      kind: ``"conv"``, ``"bn"`` or ``"fc"``.
      shape: the torch weight's shape: conv ``[O, I, kh, kw]``, bn ``[C]``, fc ``[O, I]``.
    """

    torch_name: str
    flax_name: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]


def layers(module: ResNet, in_channels: int = IN_CHANNELS) -> list[Layer]:
    """Every conv/bn/fc layer of ``module`` in torchvision's ``state_dict`` order;
    the stem conv reads ``in_channels`` (3 for RGB, 1 for grey images)."""
    out: list[Layer] = []

    def add(torch_name: str, kind: str, shape: tuple[int, ...]) -> None:
        flax_name = tuple(re.sub(r"\.(\d+)$", r"_\1", p) for p in _modules(torch_name))
        out.append(Layer(torch_name, flax_name, kind, shape))

    k = 7 if module.stem == "imagenet" else 3
    add("conv1", "conv", (module.stem_width, in_channels, k, k))
    add("bn1", "bn", (module.stem_width,))
    kernels = (3, 3) if module.block == "basic" else (1, 3, 1)
    width_in, b = module.stem_width, 0
    for s, size in enumerate(module.stage_sizes):
        for j in range(size):
            name = f"layer{s + 1}.{j}"
            widths = (*module.inner_widths[b], module.stream_widths[s])
            c = width_in
            for i, (w, kk) in enumerate(zip(widths, kernels, strict=True)):
                add(f"{name}.conv{i + 1}", "conv", (w, c, kk, kk))
                add(f"{name}.bn{i + 1}", "bn", (w,))
                c = w
            if module.downsample[b]:
                add(f"{name}.downsample.0", "conv", (widths[-1], width_in, 1, 1))
                add(f"{name}.downsample.1", "bn", (widths[-1],))
            width_in, b = widths[-1], b + 1
    if module.num_classes is not None:
        add("fc", "fc", (module.num_classes, width_in))
    return out


def _modules(torch_name: str) -> list[str]:
    # "layer1.0.downsample.1" -> ["layer1.0", "downsample.1"]: an index joins
    # the name before it, as Flax names "layer1_0" and "downsample_1" do.
    parts: list[str] = []
    for p in torch_name.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{p}"
        else:
            parts.append(p)
    return parts


def torch_shapes(
    module: ResNet, in_channels: int = IN_CHANNELS
) -> OrderedDict[str, tuple[int, ...]]:
    """``{torch key: shape}`` of the state_dict torchvision would have for
    ``module`` reading ``in_channels`` image channels."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for layer in layers(module, in_channels):
        if layer.kind == "bn":
            for key in _BN_KEYS:
                shapes[f"{layer.torch_name}.{key}"] = (
                    () if key == "num_batches_tracked" else layer.shape
                )
        else:
            shapes[f"{layer.torch_name}.weight"] = layer.shape
            if layer.kind == "fc":
                shapes[f"{layer.torch_name}.bias"] = layer.shape[:1]
    return shapes
