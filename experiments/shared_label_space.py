"""The paper's shared-label-space experiment: DomainNet.

Two ResNets fine-tuned on two DomainNet domains (345 classes each, one label
space) are merged with every method at every budget; each merged model keeps
one classifier (refit by least squares for PLeaS) and is scored on the test
splits of all four domains (clipart, infograph, painting, real). The source
models and their ensemble (mean logits) are scored alike. A pair's matchings are
computed once and shared across budgets and ratio allocations.

The merge sees ``--images`` training images, half from each model's domain, or,
for PLeaS-free, from ``--matching-data SPEC``.

Example::

    python -m experiments.shared_label_space --checkpoints pretrained_models \\
        --model-type rn50 --domains clipart,painting --variants v1a,v1b \\
        --output-dir runs/dn/rn50/clipart-painting/v1a-v1b

writes ``result.json``: settings, source and ensemble accuracies per test domain,
and one row per (budget, method, ratios) with the merged model's accuracy per
domain and their mean (``accuracy``), achieved budget, MACs and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from experiments import common
from experiments.common import ExperimentError
from pleas_jax import train as train_lib
from pleas_jax import workflow as wf

EXPERIMENT = "shared_label_space"


def parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.shared_label_space",
        description="Merge two DomainNet models (shared label space) with every method at every "
                    "budget and score them on the four test domains.",
    )
    p.add_argument("--domains", type=common.csv_list, required=True, metavar="DA,DB",
                   help=f"domains of models A and B, among {', '.join(common.DOMAINS)}")
    p.add_argument("--eval-domains", type=common.csv_list, default=list(common.DOMAINS),
                   metavar="D[,D...]", help="test domains (default all four)")
    common.add_common_arguments(p)
    return p


def _test_only(ds):
    # The training split is needed only for merge images; drop it to save memory.
    return dataclasses.replace(ds, x_train=ds.x_train[:0], y_train=ds.y_train[:0])


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the experiment for one pair and model order; write and return its JSON.

    Raises:
      ExperimentError, RunError, DataError, CheckpointError: bad options,
        missing checkpoints or data (messages say how to get them).
    """
    common.check_common(args)
    timer = common.Timer()
    if len(args.domains) != 2 or any(d not in common.DOMAINS for d in args.domains):
        raise ExperimentError(f"--domains needs two of {', '.join(common.DOMAINS)}, got "
                              f"{','.join(args.domains)}")
    bad = [d for d in args.eval_domains if d not in common.DOMAINS]
    if bad:
        raise ExperimentError(f"unknown domain {bad[0]}; choose from {', '.join(common.DOMAINS)}")
    da, db = args.domains
    pa, pb = common.source_paths(args, da, db, log)
    a, b = common.load_source(pa, args.image_size), common.load_source(pb, args.image_size)
    wf.check_pair(a, b)
    k = a.module.num_classes
    if b.module.num_classes != k:
        raise ExperimentError(f"{pa} predicts {k} classes but {pb} {b.module.num_classes}; "
                              "a shared label space needs the same classes")
    same_input = a.normalization == b.normalization and a.image_size == b.image_size
    spec = lambda d: common.dataset_spec(d, dict(args.spec), args.data_dir)  # noqa: E731

    with common.maybe_mock_data(args.mock_data):
        tests_a, tests_b, train_sets = {}, {}, {}
        for d in dict.fromkeys([da, db, *args.eval_domains]):
            log(f"reading {spec(d)}")
            ds = common.load_data(a, spec(d), args.data_dir, k)
            if d in (da, db) and args.matching_data is None:
                train_sets[d] = ds
            tests_a[d] = _test_only(ds)
            if not same_input:
                tests_b[d] = _test_only(common.load_data(b, spec(d), args.data_dir, k))
        tests_b = tests_b or tests_a
        if args.matching_data is not None:
            sets = [common.load_data(a, args.matching_data, args.data_dir)]
        else:
            sets = [train_sets[da], train_sets[db]]
        batches = common.merge_images(sets, args.images, args.batch_size, args.seed)
    del train_sets, sets

    evals = list(args.eval_domains)
    sources: dict[str, Any] = {"a": {}, "b": {}, "ensemble": {}}
    for d in evals:
        la = wf.predict(a, tests_a[d].x_test, batch_size=args.batch_size)
        lb = wf.predict(b, tests_b[d].x_test, batch_size=args.batch_size)
        y = tests_a[d].y_test
        for who, logits in (("a", la), ("b", lb), ("ensemble", (la + lb) / 2)):
            sources[who][d] = train_lib.accuracy(logits, y)
    sources = {who: {"accuracy": float(np.mean(list(acc.values()))), "accuracies": acc}
               for who, acc in sources.items()}
    log(f"sources: A {sources['a']['accuracy']:.4f}, B {sources['b']['accuracy']:.4f}, "
        f"ensemble {sources['ensemble']['accuracy']:.4f}")

    def score(merged: wf.Model) -> dict[str, Any]:
        acc = {d: wf.evaluate(merged, tests_a[d], batch_size=args.batch_size) for d in evals}
        return {"accuracy": float(np.mean(list(acc.values()))), "accuracies": acc}

    cache_key = {"data": args.matching_data or [spec(da), spec(db)], "images": args.images,
                 "batch_size": args.batch_size, "seed": args.seed, "image_size": a.image_size,
                 "mock_data": args.mock_data, "data_dir": args.data_dir}
    rows, matching_seconds = common.merge_grid(
        args, a, b, batches, heads="shared", cache_key=cache_key, score=score, log=log
    )
    result = {
        "experiment": EXPERIMENT,
        "status": "done",
        "model_type": args.model_type,
        "pair": [da, db],
        "variants": list(args.variants),
        "checkpoints": {"a": str(pa), "b": str(pb)},
        "eval_sets": evals,
        "metric": "top-1 accuracy, mean over the test domains",
        "settings": common.settings(args, image_size=a.image_size, domains=[da, db]),
        "command": getattr(args, "command", None),
        "sources": sources,
        "results": rows,
        "matching_seconds": matching_seconds,
        "merge_images": int(sum(len(x) for x in batches)),
        "seconds": timer(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    common.write_result(args.output_dir, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints progress and the result file's path."""
    p = parser()

    def go(args):
        args.command = common.command_line(argv, "experiments.shared_label_space")
        result = run(args, log=lambda s: print(s, flush=True))
        print(f"wrote {args.output_dir}/{common.RESULT_FILE} ({len(result['results'])} merges, "
              f"{result['seconds']:.0f} s)", flush=True)

    return common.run_main(go, p, argv)


if __name__ == "__main__":
    sys.exit(main())
