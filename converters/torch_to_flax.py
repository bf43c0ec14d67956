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

Example::

    conv = convert_file("resnet50.pth", arch="auto")       # or state_dict_to_flax(sd)
    logits = conv.module.apply(conv.variables, images)     # images [N, H, W, 3]
    report = verify(conv.module, conv.variables, conv.state_dict)
    print(report.max_abs, report.max_rel)
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torch import nn

from pleas_jax import models
from pleas_jax.models import ResNet

# Only RGB models: the Flax module takes its input channels from the data, so
# checkpoints and shape checks everywhere assume 3.
IN_CHANNELS = 3

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Where checkpoints keep their state_dict. Tried in order; the EMA names only
# when an EMA copy is asked for.
_CONTAINERS = ("state_dict", "model", "model_state_dict", "net", "network", "module")
_EMA_CONTAINERS = (
    "state_dict_ema",
    "model_ema",
    "ema",
    "ema_state_dict",
    "ema_model",
    "module_ema",
)
_EMA_PREFIX = re.compile(r"(^|[._])ema([._]|$)", re.IGNORECASE)
# torch.optim.swa_utils.AveragedModel stores its averaging count beside the weights.
_BOOKKEEPING = ("n_averaged",)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or shape."""


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


def layers(module: ResNet) -> list[Layer]:
    """Every conv/bn/fc layer of ``module`` in torchvision's ``state_dict`` order."""
    out: list[Layer] = []

    def add(torch_name: str, kind: str, shape: tuple[int, ...]) -> None:
        flax_name = tuple(re.sub(r"\.(\d+)$", r"_\1", p) for p in _modules(torch_name))
        out.append(Layer(torch_name, flax_name, kind, shape))

    k = 7 if module.stem == "imagenet" else 3
    add("conv1", "conv", (module.stem_width, IN_CHANNELS, k, k))
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


def torch_shapes(module: ResNet) -> OrderedDict[str, tuple[int, ...]]:
    """``{torch key: shape}`` of the state_dict torchvision would have for ``module``."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for layer in layers(module):
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


# -------------------------------------------------------------- torch -> flax
def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


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


def _first_and_count(keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"


def check_state_dict(state_dict: Mapping[str, Any], module: ResNet) -> None:
    """Raise :class:`ConversionError` unless ``state_dict`` fits ``module`` exactly.

    Checks, in order: missing keys, unexpected keys, shapes, floating dtypes,
    and that every tensor is finite (the message names the tensor). A missing
    ``num_batches_tracked`` is allowed (torch itself fills it in for old files).
    """
    expected = torch_shapes(module)
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
    from the tensors. Stage strides are the standard ``(1, 2, 2, ...)``: shapes
    cannot show strides. ``num_classes`` (if given) must agree with ``fc``.
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
    if stem_shape[1] != IN_CHANNELS:
        raise ConversionError(
            f"stem 'conv1.weight' reads {stem_shape[1]} input channels; only RGB (3) is supported"
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
            widths = [shape(f"{p}.conv{i}.weight", 4)[0] for i in range(1, n_convs + 1)]
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
        return ResNet(
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
    except ValueError as e:
        raise ConversionError(f"inconsistent state_dict: {e}") from None


def state_dict_to_flax(
    state_dict: Mapping[str, torch.Tensor],
    arch: str | ResNet = "auto",
    num_classes: int | None = None,
) -> tuple[ResNet, dict]:
    """Convert a torchvision-layout ``state_dict`` (canonical keys) to Flax.

    Args:
      state_dict: ``{"conv1.weight": [O, 3, k, k], ...}`` with no ``module.``
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

    for layer in layers(module):
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
def flax_to_state_dict(
    module: ResNet,
    variables: Mapping[str, Any],
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> OrderedDict[str, torch.Tensor]:
    """The torchvision ``state_dict`` of Flax ``variables`` (inverse of :func:`state_dict_to_flax`).

    Args:
      module: the Flax ResNet the variables belong to (any widths).
      variables: ``{"params": ..., "batch_stats": ...}``.
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
    for layer in layers(module):
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


# ---------------------------------------------------------------------- files
def _first_sentence(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    # torch files start with "PK" (zip) or a pickle opcode, never this.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32


def _read(path: Path) -> Any:
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, expected a .pth/.pt or .safetensors file")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if m:
            raise ConversionError(
                f"{path}: torch.load(weights_only=True) refuses to unpickle code (the file needs "
                f"{m.group(1)}); it is not a plain state_dict. Re-save it where its code is "
                "trusted with torch.save(model.state_dict(), ...)"
            ) from None
        raise ConversionError(f"{path}: cannot unpickle ({_first_sentence(e)})") from None
    except Exception as e:
        raise ConversionError(
            f"{path}: cannot read it as a PyTorch checkpoint (truncated, corrupted or not a "
            f"torch file?): {_first_sentence(e)}"
        ) from None


def _is_state_dict(obj: Mapping) -> bool:
    return any(
        isinstance(k, str) and k.endswith("conv1.weight") and isinstance(v, torch.Tensor)
        for k, v in obj.items()
    )


def _unwrap(obj: Any, ema: bool, where: str, in_ema: bool) -> dict[str, torch.Tensor]:
    at = where or "the top level"
    if not isinstance(obj, Mapping):
        raise ConversionError(f"found a {type(obj).__name__} at {at}, expected a state_dict")
    if _is_state_dict(obj):
        return _select(obj, ema, where, in_ema)
    names = _EMA_CONTAINERS + _CONTAINERS if ema and not in_ema else _CONTAINERS
    for key in names:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key], ema, f"{where}[{key!r}]", in_ema or key in _EMA_CONTAINERS)
    if not ema:
        for key in _EMA_CONTAINERS:
            if isinstance(obj.get(key), Mapping):
                raise ConversionError(
                    f"{at} holds only an EMA copy (under {key!r}); convert it with ema=True (--ema)"
                )
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise ConversionError(f"no ResNet state_dict found at {at} (keys: {keys})")


def _select(sd: Mapping, ema: bool, where: str, in_ema: bool) -> dict[str, torch.Tensor]:
    # A model's stem is "<prefix>conv1.weight"; block convs end in "layerS.J.".
    prefixes = {
        k[: -len("conv1.weight")]
        for k in sd
        if isinstance(k, str)
        and k.endswith("conv1.weight")
        and (k == "conv1.weight" or k.endswith(".conv1.weight"))
        and not re.search(r"(^|\.)layer\d+\.\d+\.$", k[: -len("conv1.weight")])
    }
    at = f" in {where}" if where else ""
    if not prefixes:
        raise ConversionError(f"no ResNet stem '<prefix>conv1.weight' found{at}")
    if in_ema:
        candidates = prefixes
    else:
        candidates = {p for p in prefixes if bool(_EMA_PREFIX.search(p)) == ema}
    if not candidates:
        found = ", ".join(repr(p) for p in sorted(prefixes))
        if ema:
            raise ConversionError(f"no EMA copy found{at} (model prefixes: {found}); drop --ema")
        raise ConversionError(
            f"only an EMA copy found{at} (prefixes {found}); convert it with ema=True (--ema)"
        )
    if len(candidates) > 1:
        found = ", ".join(repr(p) for p in sorted(candidates))
        raise ConversionError(
            f"several models{at} (key prefixes {found}); cannot tell which to use"
        )
    (prefix,) = candidates
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        owner = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if owner is not None and owner != prefix:
            continue  # the other copy (EMA or not)
        name = key[len(prefix) :] if owner == prefix else key
        if name in _BOOKKEEPING:
            continue
        out[name] = value
    return out


def load_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its ResNet state_dict with canonical keys.

    Accepts ``.pth``/``.pt`` (loaded with ``torch.load(weights_only=True)``:
    no code from the file ever runs) and ``.safetensors``; a bare state_dict or
    one inside ``{'model': ...}``, ``{'state_dict': ...}`` and similar; keys
    with ``module.`` (DataParallel) or other prefixes. ``ema=True`` picks the
    EMA copy (``{'model_ema': ...}``, ``{'state_dict_ema': ...}``, ``{'ema': ...}``
    or keys under ``ema.``, ``module.ema_model.`` ...); ``ema=False`` the plain one.

    Returns:
      ``{"conv1.weight": tensor, ...}`` (torch tensors on the CPU).

    Raises:
      ConversionError: missing/unreadable/truncated file, a pickle that needs
        code, no (or an ambiguous) state_dict inside.
    """
    path = Path(path)
    obj = _read(path)
    try:
        return _unwrap(obj, ema, "", False)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ------------------------------------------------------------ torch reference
class _TorchBlock(nn.Module):
    def __init__(self, block: str, width_in: int, widths, stride: int, downsample: bool):
        super().__init__()
        kernels = (3, 3) if block == "basic" else (1, 3, 1)
        c = width_in
        for i, (w, k) in enumerate(zip(widths, kernels, strict=True)):
            st = stride if k == 3 and i == kernels.index(3) else 1
            setattr(self, f"conv{i + 1}", nn.Conv2d(c, w, k, st, k // 2, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(w))
            c = w
        self.n = len(kernels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(width_in, widths[-1], 1, stride, bias=False), nn.BatchNorm2d(widths[-1])
            )

    def forward(self, x):
        y = x
        for i in range(1, self.n + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.n:
                y = self.relu(y)
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """A torch twin of any :class:`ResNet` config, with torchvision's module names.

    torchvision cannot express free widths (merged models) nor ResNet-20; this
    mirror can, and for standard configs its ``state_dict`` keys, shapes and
    function equal torchvision's (tested). Input ``[N, 3, H, W]``.
    """

    def __init__(self, module: ResNet):
        super().__init__()
        k, stride = (7, 2) if module.stem == "imagenet" else (3, 1)
        self.conv1 = nn.Conv2d(IN_CHANNELS, module.stem_width, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(module.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if module.stem == "imagenet" else nn.Identity()
        width_in, b = module.stem_width, 0
        for s, size in enumerate(module.stage_sizes):
            blocks = []
            for j in range(size):
                widths = (*module.inner_widths[b], module.stream_widths[s])
                stride = module.stage_strides[s] if j == 0 else 1
                blocks.append(
                    _TorchBlock(module.block, width_in, widths, stride, module.downsample[b])
                )
                width_in, b = widths[-1], b + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.n_stages = len(module.stage_sizes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = (
            nn.Identity() if module.num_classes is None else nn.Linear(width_in, module.num_classes)
        )

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_model(module: ResNet) -> tuple[nn.Module, str]:
    """A freshly initialised torch model with ``module``'s structure, and its name.

    torchvision's own ``resnetNN`` for the standard ImageNet configs, else
    :class:`TorchResNet`.
    """
    arch = models.arch_name(module)
    if arch is not None and arch != "resnet20":
        if module.config() == models.resnet(arch, module.num_classes).config():
            net = getattr(torchvision.models, arch)(
                weights=None, num_classes=module.num_classes or 1
            )
            if module.num_classes is None:
                net.fc = nn.Identity()
            return net, f"torchvision.models.{arch}"
    return TorchResNet(module), "converters.torch_to_flax.TorchResNet"


def randomize_batch_norm(net: nn.Module, seed: int = 0, image_size: int = 64) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    A fresh BN is the identity (scale 1, bias 0, mean 0, var 1), which would hide
    a swapped or dropped BN tensor in a parity check; and in eval mode an
    untrained deep ResNet's activations then grow by orders of magnitude per
    stage. So: random affine parameters, running statistics measured on one
    train-mode pass over random images ``[8, 3, image_size, image_size]`` (as
    a trained net would have, keeping logits O(1)), then perturbed per channel,
    and random ``num_batches_tracked``. Returns ``net`` (modified, mode kept).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    training, momenta = net.training, [m.momentum for m in bns]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.reset_running_stats()
            m.momentum = None  # a plain average over the pass
        net.train()
        net(torch.randn(8, IN_CHANNELS, image_size, image_size, generator=g))
        for m, momentum in zip(bns, momenta, strict=True):
            c = m.num_features
            m.momentum = momentum
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(c, generator=g))
            m.running_var.mul_(0.7 + 0.7 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=g)))
    net.train(training)
    return net


@dataclasses.dataclass
class Verification:
    """Torch vs Flax on one random batch.

    Attributes:
      max_abs: max |torch - flax| over all outputs.
      max_rel: ``max_abs`` divided by the largest |torch output|.
      scale: the largest |torch output|.
      reference: which torch model was run.
      shape: the output shape ``[N, num_classes]``.
    """

    max_abs: float
    max_rel: float
    scale: float
    reference: str
    shape: tuple[int, ...]


def verify(
    module: ResNet,
    variables: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 2,
    image_size: int | None = None,
    seed: int = 0,
) -> Verification:
    """Run torch and Flax in eval mode, fp32, on the same random batch and compare.

    Args:
      module, variables: the Flax model.
      state_dict: the torch weights to run; by default ``flax_to_state_dict(module, variables)``.
      batch_size, image_size: the batch ``[N, 3, S, S]``; ``S`` defaults to 224
        for the ImageNet stem and 32 for the CIFAR one.
      seed: seed of the random batch.

    Returns:
      A :class:`Verification` with the max absolute and relative logit differences.
    """
    net, reference = torch_model(module)
    if state_dict is None:
        state_dict = flax_to_state_dict(module, variables)
    net.load_state_dict(dict(state_dict), strict=False)
    missing = set(net.state_dict()) - set(state_dict)
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise ConversionError(
            f"state_dict lacks {_first_and_count(sorted(missing))} for {reference}"
        )
    net.eval()
    size = image_size or (224 if module.stem == "imagenet" else 32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, IN_CHANNELS, size, size, generator=g)
    with torch.no_grad():
        want = net(x).numpy()
    # TPU/GPU default to bf16/tf32 passes in matmuls and convs; parity needs full fp32.
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy())))
    # A NaN must not compare as "within tolerance": count it as an infinite difference.
    diff = np.abs(got - want)
    max_abs = float(np.max(np.where(np.isnan(diff), np.inf, diff)))
    scale = float(np.max(np.abs(want)))
    return Verification(
        max_abs, max_abs / scale if scale > 0 else max_abs, scale, reference, got.shape
    )
