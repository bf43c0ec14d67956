"""Merging a pair with every method, ratio allocation and budget of a run.

:func:`merge_grid` merges and scores the (method, ratios) recipes of a run
(:func:`~experiments.release.method_runs`) at every budget, computing each kind of
matching once per pair and keeping it in a :class:`MatchingCache` (on disk with
``--matching-cache``), so that runs at other budgets and methods reuse it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.release import METHODS, _pleas, method_runs
from experiments.runs import Timer

if TYPE_CHECKING:
    from pleas_jax import workflow as wf


# ---------------------------------------------------------------- caching
def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_key(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint's content for caches: its resolved path and
    the metadata file's modification time."""
    checkpoint = _pleas()[0]
    meta = Path(path) / checkpoint.METADATA_FILE
    return {"path": str(Path(path).resolve()), "mtime": meta.stat().st_mtime_ns}


class MatchingCache:
    """Matchings ``(perm, costs)`` of a pair, in memory and, with a directory, on
    disk (one ``.npz`` per key), so that runs at other budgets reuse them."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = None if directory is None else Path(directory)
        self.memory: dict[str, tuple[dict, dict]] = {}

    def _file(self, digest: str) -> Path | None:
        return None if self.directory is None else self.directory / f"matching-{digest}.npz"

    def get(self, key: Mapping[str, Any]) -> tuple[dict, dict] | None:
        digest = _digest(key)
        if digest in self.memory:
            return self.memory[digest]
        file = self._file(digest)
        if file is None or not file.is_file():
            return None
        with np.load(file) as f:
            groups = json.loads(str(f["groups"]))
            perm = {g: f[f"perm_{i}"] for i, g in enumerate(groups)}
            costs = {g: f[f"costs_{i}"] for i, g in enumerate(groups)}
        self.memory[digest] = (perm, costs)
        return perm, costs

    def put(self, key: Mapping[str, Any], perm: Mapping, costs: Mapping) -> None:
        digest = _digest(key)
        perm = {g: np.asarray(p) for g, p in perm.items()}
        costs = {g: np.asarray(costs[g]) for g in perm}
        self.memory[digest] = (perm, costs)
        file = self._file(digest)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        groups = list(perm)
        arrays: dict[str, Any] = {"groups": np.asarray(json.dumps(groups))}
        for i, g in enumerate(groups):
            arrays[f"perm_{i}"], arrays[f"costs_{i}"] = perm[g], costs[g]
        # Another run may read the file while this one writes: rename into place.
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, file)


# ----------------------------------------------------------------- merges
def merge_grid(
    args: argparse.Namespace,
    a: wf.Model,
    b: wf.Model,
    batches: Sequence[np.ndarray],
    *,
    heads: str,
    cache_key: Mapping[str, Any],
    score: Callable[[wf.Model], dict[str, Any]],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Merge A and B with every method and ratio allocation at every budget of
    ``args`` and score each merged model.

    A pair's matchings depend on neither the budget nor the ratios: each kind
    (activation, weight) is computed once, or read from ``--matching-cache``;
    so are its least-squares sums when several merges fit them.

    Args:
      batches: the merge images, ``[batch, H, W, C]`` each.
      heads: ``"shared"`` or ``"separate"`` (see :func:`pleas_jax.merge.merge`).
      cache_key: what else identifies the matchings (data, images, seed, ...).
      score: merged model (with heads ``a``/``b`` when separate) -> metrics.

    Returns:
      ``(rows, matching_seconds)``: one row per (budget, method, ratios) with
      ``method``, ``ratios``, ``budget``, ``achieved_budget``, ``macs``,
      ``params``, ``seconds`` and the metrics; seconds spent per matching kind.
    """
    wf = _pleas()[2]
    from pleas_jax.merge import merge

    cache = MatchingCache(args.matching_cache)
    rows, matching_seconds = [], {}
    runs = method_runs(args.methods, args.ratios)
    # With several closed-form merges in this process, the pair's sums are taken
    # once and projected for each budget and matching; for one, per-merge sums are
    # cheaper (see pleas_jax.merge.merge's ``statistics``). The two give the same
    # closed form; gradient descent is another procedure on the pair's sums
    # (full batch) than over the data (mini-batches, the release's), so GD runs
    # always take the latter: a by-hand grid then fits as the launcher's runs do.
    fits = len(args.budgets) * sum(METHODS[m].least_squares for m, _ in runs)
    statistics: Any = "pair" if fits > 1 and args.least_squares != "gd" else "per_merge"
    for budget in args.budgets:
        for name, ratios in runs:
            method = METHODS[name]
            key = {
                **cache_key,
                "matching": method.matching,
                "heads": heads,
                "a": checkpoint_key(Path(a.name)),
                "b": checkpoint_key(Path(b.name)),
            }
            cached = cache.get(key)
            timer = Timer()
            result = merge(
                (a.module, a.variables),
                (b.module, b.variables),
                batches,
                float(budget),
                matching=method.matching,
                ratios=ratios,
                least_squares=args.least_squares if method.least_squares else None,
                heads=heads,
                gd_steps=args.gd_steps,
                seed=args.seed,
                precomputed_matching=cached,
                count_xla_flops=False,
                progress=args.progress,
                **({"statistics": statistics} if method.least_squares else {}),
            )
            if getattr(result, "pair_statistics", None) is not None:
                statistics = result.pair_statistics
            if cached is None:
                cache.put(key, result.perm, result.costs)
                matching_seconds[method.matching] = result.report["seconds"]["matching"]
            merged = wf.Model(
                result.module, result.variables, result.heads, name=f"{name}/{ratios}@{budget:g}"
            )
            metrics = score(merged)
            rep = result.report
            rows.append(
                {
                    "method": name,
                    "ratios": ratios,
                    "budget": float(budget),
                    "matching": method.matching,
                    "least_squares": args.least_squares if method.least_squares else None,
                    "achieved_budget": rep["achieved_budget"],
                    "macs": rep["macs"],
                    "macs_source": rep["macs_source"],
                    "params": rep["params"],
                    **metrics,
                    "merge_seconds": rep["seconds"],
                    "seconds": timer(),
                }
            )
            log(
                f"{name} ({ratios}) @ {budget:g}: accuracy {metrics['accuracy']:.4f} "
                f"({timer():.0f} s)"
            )
    return rows, matching_seconds
