"""Path-keyed views of pytrees of nested dicts.

A *path* is a tuple of string keys from the root of a variables pytree, e.g.
``("params", "layer1_0", "conv1", "kernel")``; its readable form joins them
with ``/``. Permutation specs, partial merges and conversion are all surgery
on leaves by path, so they share these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Path = tuple[str, ...]


def path_str(path: Path) -> str:
    """``("params", "fc", "kernel") -> "params/fc/kernel"``."""
    return "/".join(path)


def parse_path(path: str | Path) -> Path:
    """Inverse of :func:`path_str`; tuples pass through."""
    if isinstance(path, tuple):
        return path
    return tuple(p for p in path.split("/") if p)


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    """Nested mappings -> ``{path: leaf}`` in insertion order."""
    out: dict[Path, Any] = {}

    def visit(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, (*prefix, str(k)))
        else:
            out[prefix] = node

    visit(tree, ())
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten` (plain nested dicts)."""
    root: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return root


def get(tree: Mapping[str, Any], path: str | Path) -> Any:
    """The leaf (or subtree) at ``path``; ``KeyError`` names the full path."""
    node = tree
    for k in parse_path(path):
        try:
            node = node[k]
        except (KeyError, TypeError, IndexError):  # IndexError: a string into a numpy leaf
            raise KeyError(f"no entry {path_str(parse_path(path))!r} in the tree") from None
    return node


def map_with_path(fn: Callable[[Path, Any], Any], tree: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``fn(path, leaf)`` to every leaf; returns plain nested dicts."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def to_dict(tree: Any) -> Any:
    """FrozenDicts and other mappings -> plain nested dicts."""
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def check_same_structure(a: Mapping[str, Any], b: Mapping[str, Any], what=("A", "B")) -> None:
    """Raise ``ValueError`` naming the first path where ``a`` and ``b`` differ
    in presence or shape (two models of different architectures or widths)."""
    fa, fb = flatten(a), flatten(b)
    for path in fa.keys() - fb.keys():
        raise ValueError(f"{path_str(path)} exists in model {what[0]} but not in model {what[1]}")
    for path in fb.keys() - fa.keys():
        raise ValueError(f"{path_str(path)} exists in model {what[1]} but not in model {what[0]}")
    for path, x in fa.items():
        sa, sb = tuple(getattr(x, "shape", ())), tuple(getattr(fb[path], "shape", ()))
        if sa != sb:
            raise ValueError(
                f"{path_str(path)} has shape {sa} in model {what[0]} but {sb} in model {what[1]}"
            )
