"""Which ResNet a torchvision-style state_dict is: inferred from, or checked against, its shapes.

:func:`infer_module` reads block type, blocks per stage, stem and every width
off the tensors (``arch="auto"``); ``_requested`` builds a named architecture
whose base width follows the stem and names both architectures when the
tensors hold another one; :func:`check_state_dict` then demands that the
state_dict fit the module exactly (keys, shapes, float dtypes, finite values),
with messages that name the key. Works on canonical keys (no ``module.``
prefix; :mod:`converters.torch_checkpoint` strips those).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from converters.torch_layout import IN_CHANNELS, ConversionError, _first_and_count, torch_shapes
from pleas_jax import models
from pleas_jax.models import ResNet


def _describe(module: ResNet) -> str:
    name = models.arch_name(module) or "custom ResNet"
    sizes = "-".join(str(n) for n in module.stage_sizes)
    return f"{name} ({module.block} blocks {sizes}, {module.stem} stem)"


def _requested(state_dict: Mapping[str, torch.Tensor], arch: str, num_classes: int | None):
    if arch not in models.ARCHITECTURES:
        raise ConversionError(
            f"unknown architecture {arch!r}; choose from auto, {', '.join(models.ARCHITECTURES)}"
        )
    # A state_dict of another architecture shows up as dozens of missing keys;
    # naming both architectures is the useful message.
    try:
        found = infer_module(state_dict)
    except ConversionError:
        found = None
    want = models.resnet(arch)
    if found is not None and models.arch_name(found) != arch:
        got = (found.block, found.stage_sizes, found.stem)
        if got != (want.block, want.stage_sizes, want.stem):
            raise ConversionError(
                f"the state_dict holds a {_describe(found)}, not the requested {_describe(want)}"
            )
    # The base width follows the stem (ResNet-20 checkpoints come in x1..x16);
    # every other width must then be the standard multiple of it.
    stem = state_dict.get("conv1.weight")
    width = int(stem.shape[0]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else None
    if num_classes is None:
        fc = state_dict.get("fc.weight")
        num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.ndim == 2 else None
    return models.resnet(arch, num_classes, width=width)


def stem_channels(state_dict: Mapping[str, Any]) -> int:
    """The image channels a state_dict's stem ``conv1.weight [O, C, k, k]`` reads
    (:data:`IN_CHANNELS` when it has no such tensor: the shape check then names it)."""
    stem = state_dict.get("conv1.weight")
    return int(stem.shape[1]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else IN_CHANNELS


def check_state_dict(
    state_dict: Mapping[str, Any], module: ResNet, in_channels: int | None = None
) -> None:
    """Raise :class:`ConversionError` unless ``state_dict`` fits ``module`` exactly.

    Checks, in order: missing keys, unexpected keys, shapes, floating dtypes,
    and that every tensor is finite (the message names the tensor). A missing
    ``num_batches_tracked`` is allowed (torch itself fills it in for old files).
    ``in_channels`` (image channels of the stem) defaults to what the stem
    reads: the module's config does not fix them.
    """
    if in_channels is None:
        in_channels = stem_channels(state_dict)
    expected = torch_shapes(module, in_channels)
    what = _describe(module)
    missing = [
        k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")
    ]
    if missing:
        raise ConversionError(f"state_dict lacks {_first_and_count(missing)} that a {what} needs")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ConversionError(
            f"state_dict has unexpected key {_first_and_count(unexpected)} that a {what} does not have"
        )
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != expected[key]:
            raise ConversionError(
                f"tensor {key!r} has shape {tuple(t.shape)}; a {what} expects {expected[key]}"
            )
        if key.endswith(".num_batches_tracked"):
            continue
        if not t.is_floating_point():
            raise ConversionError(f"tensor {key!r} has dtype {t.dtype}, expected a float dtype")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ConversionError(
                f"tensor {key!r} is not finite: {n_nan} NaN and {n_inf} inf of {t.numel()} values"
            )


def infer_module(state_dict: Mapping[str, Any], num_classes: int | None = None) -> ResNet:
    """The ResNet a torchvision-style ``state_dict`` describes, read off its shapes.

    Basic vs bottleneck blocks from the presence of ``conv3``; blocks per stage
    from the ``layerS.J`` indices; ImageNet (7x7) vs CIFAR (3x3) stem from
    ``conv1``'s kernel; every width, the downsample shortcuts and the classes
    from the tensors. Any number of image channels (the module does not fix
    them; :func:`stem_channels`). Stage strides are the standard ``(1, 2, 2,
    ...)``: shapes cannot show strides. ``num_classes`` (if given) must agree
    with ``fc``.
    """

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        t = state_dict.get(key)
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"cannot infer the architecture: no tensor {key!r}")
        if t.ndim != ndim:
            raise ConversionError(
                f"tensor {key!r} has shape {tuple(t.shape)}, expected {ndim} dims"
            )
        return tuple(t.shape)

    if "conv1.weight" not in state_dict:
        sample = ", ".join(list(state_dict)[:3])
        raise ConversionError(
            f"not a torchvision-style ResNet state_dict: no 'conv1.weight' (keys: {sample}, ...)"
        )
    stem_shape = shape("conv1.weight", 4)
    stems = {7: "imagenet", 3: "cifar"}
    if stem_shape[2] not in stems:
        raise ConversionError(
            f"stem 'conv1.weight' has a {stem_shape[2]}x{stem_shape[3]} kernel; "
            "expected 7x7 (ImageNet) or 3x3 (CIFAR)"
        )

    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        m = re.fullmatch(r"layer(\d+)\.(\d+)\.conv1\.weight", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise ConversionError("cannot infer the architecture: no residual blocks 'layerS.J.conv1'")
    n_stages = max(blocks)
    for s in range(1, n_stages + 1):
        js = blocks.get(s, set())
        if js != set(range(len(js))) or not js:
            raise ConversionError(
                f"cannot infer the architecture: blocks of layer{s} are {sorted(js)}, "
                "expected 0, 1, 2, ..."
            )
    bottleneck = any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", k) for k in state_dict)
    n_convs = 3 if bottleneck else 2

    stage_sizes, stream, inner, down = [], [], [], []
    for s in range(1, n_stages + 1):
        stage_sizes.append(len(blocks[s]))
        for j in range(len(blocks[s])):
            p = f"layer{s}.{j}"
            shapes = [shape(f"{p}.conv{i}.weight", 4) for i in range(1, n_convs + 1)]
            widths = [sh[0] for sh in shapes]
            for i in range(1, n_convs):
                if shapes[i][1] != widths[i - 1] and widths[i - 1] % shapes[i][1] == 0:
                    raise ConversionError(
                        f"{p}.conv{i + 1} reads {shapes[i][1]} of {widths[i - 1]} channels per "
                        "output: grouped convolutions (ResNeXt) are not supported"
                    )
            inner.append(tuple(widths[:-1]))
            down.append(f"{p}.downsample.0.weight" in state_dict)
            if j == 0:
                stream.append(widths[-1])

    fc = state_dict.get("fc.weight")
    if fc is None:
        if num_classes is not None:
            raise ConversionError(
                f"num_classes={num_classes} was asked for but there is no 'fc.weight'"
            )
    else:
        classes = shape("fc.weight", 2)[0]
        if num_classes is not None and num_classes != classes:
            raise ConversionError(
                f"'fc.weight' has {classes} classes but num_classes={num_classes} was asked for"
            )
        num_classes = classes
    try:
        module = ResNet(
            block="bottleneck" if bottleneck else "basic",
            stage_sizes=tuple(stage_sizes),
            stem_width=stem_shape[0],
            stream_widths=tuple(stream),
            inner_widths=tuple(inner),
            downsample=tuple(down),
            num_classes=num_classes,
            stem=stems[stem_shape[2]],
            stage_strides=(1,) + (2,) * (n_stages - 1),
        )
        module.validate()
    except ValueError as e:
        hint = (
            " (a shortcut without parameters, such as the CIFAR ResNets' zero-padding "
            "'option A', is not supported: only 1x1 conv + BatchNorm shortcuts)"
            if "has no downsample" in str(e)
            else ""
        )
        raise ConversionError(f"inconsistent state_dict: {e}{hint}") from None
    return module
