"""Tables and plots across experiment runs: markdown, CSV and accuracy-against-budget PNGs.

Reads every finished ``result.json`` under the given directories (what
:mod:`experiments.launch` or the experiment scripts write) and

- flattens them into one CSV row per (run, method, ratios, budget), plus rows for
  the source models and their ensemble (``results.csv``);
- prints and writes markdown tables (``report.md``): per experiment, model type
  and dataset pair, one line per method and ratio allocation, one column per
  budget, accuracy in % averaged over the runs of that cell (both model orders);
  the model type is the merged models' architecture as the run recorded it
  (``rn18``, ``resnet20``, ...; :func:`experiments.sources.model_type`), and a
  dataset that ``--spec`` replaced is named ``NAME=SPEC`` (``cub=mnist5k[0-4]``:
  the scores are keyed ``cub``, but the images were MNIST's);
- plots accuracy against budget, one PNG per experiment and model type, one
  panel per pair, the ensemble as a dashed line.

Example::

    python -m experiments.report runs --out runs/report
    python -m experiments.report runs --metric probe_accuracy --out runs/report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common

METRICS = ("accuracy", "probe_accuracy")
SOURCES = ("a", "b", "ensemble")


def collect(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every finished run JSON found in ``paths`` (files or directories searched
    recursively), sorted by path; unfinished or unreadable files are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob(common.RESULT_FILE)))
    out = []
    for f in sorted(set(files)):
        try:
            result = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and result.get("status") == "done":
            result["_file"] = str(f)
            out.append(result)
    return out


# Settings that change a run's numbers but are not a table's rows or columns:
# runs that differ in them are tabulated apart, never averaged together.
SETUP_SETTINGS = (
    "images",
    "batch_size",
    "seed",
    "image_size",
    "mock_data",
    "specs",
    "probe_epochs",
    "probe_lr",
    "probe_batch_size",
)


def _label(method: str, ratios: str | None, least_squares: str | None, gd_steps: Any = None) -> str:
    m = common.METHODS.get(method)
    base = m.label if m else method
    if m is not None and m.ratios is None and ratios:
        base += f", {ratios} ratios"
    if least_squares == "gd":
        base += ", GD" if gd_steps is None else f", GD ({gd_steps} steps)"
    return base


def _setup(settings: Mapping[str, Any]) -> str:
    """The run's :data:`SETUP_SETTINGS` as a canonical JSON text."""
    return json.dumps(
        {k: settings[k] for k in SETUP_SETTINGS if k in settings}, sort_keys=True, default=str
    )


def _dataset(name: str, specs: Mapping[str, str]) -> str:
    """``name``, or ``NAME=SPEC`` where the run read another source for it."""
    spec = specs.get(name)
    return name if spec is None or common.is_papers_source(name, spec) else f"{name}={spec}"


def _datasets(result: Mapping[str, Any]) -> str:
    """The run's pair as the tables name it, ``"cub + oxford_pets"``, with every
    dataset that a ``--spec`` replaced as ``NAME=SPEC`` (test sets beyond the
    pair too): a table must not claim CUB for a run that read MNIST."""
    specs = result.get("settings", {}).get("specs") or {}
    text = " + ".join(_dataset(d, specs) for d in result["pair"])
    others = [
        _dataset(d, specs)
        for d in result.get("eval_sets") or []
        if d not in result["pair"] and _dataset(d, specs) != d
    ]
    return text + (f" (test: {', '.join(others)})" if others else "")


def flatten(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per merged model and per source/ensemble of each run.

    Columns: ``file, experiment, model_type, pair, datasets, variants,
    matching_data, setup, method, label, ratios, least_squares, budget,
    achieved_budget, accuracy, probe_accuracy, macs, seconds`` and
    ``accuracy:{set}`` / ``probe_accuracy:{set}`` per evaluation set.
    ``datasets`` is the pair as the tables name it (:func:`_datasets`);
    ``setup`` holds the :data:`SETUP_SETTINGS` (JSON). Source rows have
    ``method`` ``source_a``, ``source_b`` or ``ensemble`` and no budget.
    """
    rows = []
    for res in results:
        settings = res.get("settings", {})
        base = {
            "file": res.get("_file"),
            "experiment": res["experiment"],
            "model_type": res["model_type"],
            "pair": "-".join(res["pair"]),
            "datasets": _datasets(res),
            "variants": "-".join(res["variants"]),
            "matching_data": settings.get("matching_data"),
            "setup": _setup(settings),
        }
        for who in SOURCES:
            s = res["sources"][who]
            name = "ensemble" if who == "ensemble" else f"source_{who}"
            row = {
                **base,
                "method": name,
                "label": {"a": "model A", "b": "model B"}.get(who, "ensemble"),
                "budget": None,
            }
            row.update(_metrics(s))
            rows.append(row)
        for r in res["results"]:
            row = {
                **base,
                "method": r["method"],
                "ratios": r["ratios"],
                "least_squares": r["least_squares"],
                "label": _label(
                    r["method"], r["ratios"], r["least_squares"], settings.get("gd_steps")
                ),
                "budget": r["budget"],
                "achieved_budget": r["achieved_budget"],
                "macs": r.get("macs"),
                "seconds": r.get("seconds"),
            }
            row.update(_metrics(r))
            rows.append(row)
    return rows


def _metrics(scores: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for m in METRICS:
        if m in scores:
            out[m] = scores[m]
        for k, v in (scores.get(f"{m[:-8]}accuracies") or {}).items():
            out[f"{m}:{k}"] = v
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """All rows as CSV (columns: the union of the rows' keys, first-seen order)."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _groups(rows, metric):
    """``{(experiment, model_type, datasets, matching_data, setup): {label: {budget:
    {variants: [values]}}}}`` (budget ``None`` for the sources and ensemble)."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in rows:
        if r.get(metric) is None:
            continue
        key = (
            r["experiment"],
            r["model_type"],
            r["datasets"],
            r.get("matching_data"),
            r.get("setup"),
        )
        groups[key][r["label"]][r["budget"]][r["variants"]].append(r[metric])
    return groups


def _mean(by_order: Mapping[str, Sequence[float]]) -> float:
    """The mean over model orders of each order's mean: every run re-scores the
    sources, and an order with more finished runs must not weigh more."""
    return float(np.mean([np.mean(v) for v in by_order.values()]))


def _setup_notes(keys) -> dict:
    """Per group key, the setup fields that differ from the other groups of its
    table (same experiment, model type, pair and merge data), as ``k=v`` text."""
    tables: dict = defaultdict(list)
    for key in keys:
        tables[key[:4]].append(key)
    notes = {}
    for same in tables.values():
        setups = {k: json.loads(k[4]) if k[4] else {} for k in same}
        fields = sorted({f for st in setups.values() for f in st})
        differ = [f for f in fields if len({json.dumps(st.get(f)) for st in setups.values()}) > 1]
        for k, st in setups.items():
            notes[k] = ", ".join(f"{f}={st.get(f)}" for f in differ)
    return notes


def markdown(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> str:
    """Markdown tables of ``metric`` (%): one per experiment, model type and pair
    (and PLeaS-free data, and setup where runs of other settings, such as
    ``--images``, lie in the same tree); cells average the model orders they
    hold, with the number of orders in brackets when it differs across a table."""
    groups = _groups(rows, metric)
    if not groups:
        return f"(no runs with {metric})\n"
    notes = _setup_notes(groups)
    lines = []
    for key, methods in sorted(groups.items(), key=lambda kv: str(kv[0])):
        exp, mt, pair, free, _ = key
        budgets = sorted({b for per in methods.values() for b in per if b is not None})
        title = f"### {exp}, {mt}, {pair}: {metric.replace('_', ' ')} (%)"
        if free:
            title += f", PLeaS-free (merge data {free})"
        if notes[key]:
            title += f" [{notes[key]}]"
        lines += [
            title,
            "",
            "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        counts = {len(v) for per in methods.values() for b, v in per.items() if b is not None}
        for label, per in methods.items():
            if None in per:
                continue
            cells = []
            for b in budgets:
                orders = per.get(b)
                cell = "—" if not orders else f"{100 * _mean(orders):.2f}"
                if orders and len(counts) > 1:
                    cell += f" ({len(orders)})"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        refs = [
            f"{label} {100 * _mean(per[None]):.2f}" for label, per in methods.items() if None in per
        ]
        lines += ["", "References: " + ", ".join(refs) + ".", ""]
    return "\n".join(lines)


def plot(
    rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, metric: str = "accuracy"
) -> list[Path]:
    """Accuracy (%) against budget: one PNG per experiment and model type, one
    panel per pair, one line per method; the ensemble dashed.

    Returns:
      the PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows, metric)
    notes = _setup_notes(groups)
    by_figure: dict = defaultdict(dict)
    for key, methods in groups.items():
        exp, mt, pair, free, _ = key
        panel = pair + (f" (merge data {free})" if free else "")
        by_figure[(exp, mt)][panel + (f" [{notes[key]}]" if notes[key] else "")] = methods
    paths = []
    markers = "osD^vP*X"
    for (exp, mt), panels in sorted(by_figure.items()):
        n = len(panels)
        cols = min(n, 3)
        nrows = -(-n // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, (pair, methods) in zip(axes.flat, sorted(panels.items()), strict=False):
            i = 0
            for label, per in methods.items():
                if None in per:
                    if label == "ensemble":
                        ax.axhline(
                            100 * _mean(per[None]), color="black", ls="--", lw=1, label="ensemble"
                        )
                    continue
                budgets = sorted(per)
                ax.plot(
                    budgets,
                    [100 * _mean(per[b]) for b in budgets],
                    marker=markers[i % len(markers)],
                    label=label,
                )
                i += 1
            ax.set_title(pair, fontsize=10)
            ax.set_xlabel("budget (compute relative to one model)")
            ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.suptitle(f"{exp}, {mt}")
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = Path(out_dir) / f"{metric}_vs_budget_{exp}_{mt}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def report(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, metrics: Sequence[str] = METRICS
) -> dict[str, Any]:
    """Write ``results.csv``, ``report.md`` and the plots into ``out`` (created).

    Returns:
      ``{"runs": n, "markdown": text, "files": [paths]}``.

    Raises:
      common.ExperimentError: no finished runs under ``paths``.
    """
    results = collect(paths)
    if not results:
        raise common.ExperimentError(
            f"no finished {common.RESULT_FILE} under {', '.join(map(str, paths))}"
        )
    rows = flatten(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(rows, out / "results.csv")]
    text = ""
    for m in metrics:
        if any(r.get(m) is not None for r in rows):
            text += markdown(rows, m) + "\n"
            files += plot(rows, out, m)
    (out / "report.md").write_text(text)
    files.insert(1, out / "report.md")
    return {"runs": len(results), "markdown": text, "files": [str(f) for f in files]}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: prints the markdown tables and the files written."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.report", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("paths", nargs="+", help="run directories or result.json files")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: report/ in PATHS[0], or beside it for a file)",
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        action="append",
        default=None,
        help="metric(s) to tabulate and plot (default: every metric present)",
    )
    args = p.parse_args(argv)
    first = Path(args.paths[0])
    out = args.out or (first.parent if first.is_file() else first) / "report"
    try:
        rep = report(args.paths, out, args.metric or METRICS)
    except common.ExperimentError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"])
    print(f"{rep['runs']} runs; wrote " + ", ".join(rep["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
