"""Reading a PyTorch checkpoint file safely and finding the ResNet state_dict inside.

Checkpoints arrive saved bare, inside ``{'model': ...}`` / ``{'state_dict': ...}``
and similar containers, with ``module.`` (DataParallel) or other key prefixes,
beside EMA copies, as ``.pth``/``.pt`` or ``.safetensors``. :func:`load_state_dict`
reads any of them (``torch.load(weights_only=True)`` always: no code from the
file runs), unwraps the containers, picks the plain or the EMA copy and returns
the state_dict with canonical keys; every failure is a :class:`ConversionError`
naming the file and, where it applies, the container or key.
:func:`sha256_file` fingerprints the source for the checkpoint metadata.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from converters.torch_layout import ConversionError

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
