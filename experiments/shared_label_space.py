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
domain and their mean (``accuracy``), how often it predicts what the ensemble
predicts (``ensemble_agreement``), achieved budget, MACs and seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import common, streams
from experiments.common import ExperimentError
from pleas_jax import workflow as wf

EXPERIMENT = "shared_label_space"


def parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.shared_label_space",
        description="Merge two DomainNet models (shared label space) with every method at every "
        "budget and score them on the four test domains.",
    )
    p.add_argument(
        "--domains",
        type=common.csv_list,
        required=True,
        metavar="DA,DB",
        help=f"domains of models A and B, among {', '.join(common.DOMAINS)}",
    )
    p.add_argument(
        "--eval-domains",
        type=common.csv_list,
        default=list(common.DOMAINS),
        metavar="D[,D...]",
        help="test domains (default all four)",
    )
    common.add_common_arguments(p)
    return p


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the experiment for one pair and model order; write and return its JSON.

    Raises:
      ExperimentError, RunError, DataError, CheckpointError: bad options,
        missing checkpoints or data (messages say how to get them).
    """
    common.check_common(args)
    timer = common.Timer()
    if len(args.domains) != 2 or any(d not in common.DOMAINS for d in args.domains):
        raise ExperimentError(
            f"--domains needs two of {', '.join(common.DOMAINS)}, got {','.join(args.domains)}"
        )
    bad = [d for d in args.eval_domains if d not in common.DOMAINS]
    if bad:
        raise ExperimentError(f"unknown domain {bad[0]}; choose from {', '.join(common.DOMAINS)}")
    da, db = args.domains
    pa, pb = common.source_paths(args, da, db, log)
    a, b = common.load_source(pa, args.image_size), common.load_source(pb, args.image_size)
    wf.check_pair(a, b)
    model_type = common.model_type(a)  # A and B have one architecture (check_pair)
    k = a.module.num_classes
    if b.module.num_classes != k:
        raise ExperimentError(
            f"{pa} predicts {k} classes but {pb} {b.module.num_classes}; "
            "a shared label space needs the same classes"
        )
    spec = lambda d: common.dataset_spec(d, dict(args.spec), args.data_dir)  # noqa: E731
    evals = list(args.eval_domains)
    size = a.image_size
    sets = {
        d: streams.Images(spec(d), size, args.data_dir, k, a.crop)
        for d in dict.fromkeys([da, db, *evals])
    }
    bs = args.batch_size

    with common.maybe_mock_data(args.mock_data):
        if args.matching_data is not None:
            raw = streams.Images(args.matching_data, size, args.data_dir, crop=a.crop).sample(
                "train", args.images, args.seed
            )
        else:
            raw = streams.merge_sample([sets[da], sets[db]], args.images, args.seed)
        a, b = streams.with_normalization(a, raw), streams.with_normalization(b, raw)
        batches = streams.to_batches(streams.prepare(a, raw), bs)
        del raw

        sources: dict[str, Any] = {"a": {}, "b": {}, "ensemble": {}}
        ensemble_pred = {}  # how often a merged model predicts what the ensemble does
        for d in evals:
            log(f"scoring the sources on {spec(d)}")
            out, y = streams.collect(
                sets[d],
                "test",
                {
                    "a": lambda x: wf.predict(a, streams.prepare(a, x), batch_size=bs),
                    "b": lambda x: wf.predict(b, streams.prepare(b, x), batch_size=bs),
                },
            )
            for who, logits in (
                ("a", out["a"]),
                ("b", out["b"]),
                ("ensemble", (out["a"] + out["b"]) / 2),
            ):
                sources[who][d] = streams.accuracy(logits, y)
            ensemble_pred[d] = np.argmax(out["a"] + out["b"], axis=-1)
        sources = {
            who: {"accuracy": float(np.mean(list(acc.values()))), "accuracies": acc}
            for who, acc in sources.items()
        }
        log(
            f"sources: A {sources['a']['accuracy']:.4f}, B {sources['b']['accuracy']:.4f}, "
            f"ensemble {sources['ensemble']['accuracy']:.4f}"
        )

        def score(merged: wf.Model) -> dict[str, Any]:
            acc, agree = {}, {}
            for d in evals:
                out, y = streams.collect(
                    sets[d],
                    "test",
                    {"m": lambda x: wf.predict(merged, streams.prepare(a, x), batch_size=bs)},
                )
                acc[d] = streams.accuracy(out["m"], y)
                agree[d] = float(np.mean(np.argmax(out["m"], axis=-1) == ensemble_pred[d]))
            return {
                "accuracy": float(np.mean(list(acc.values()))),
                "accuracies": acc,
                "ensemble_agreement": float(np.mean(list(agree.values()))),
                "ensemble_agreements": agree,
            }

        cache_key = {
            "data": args.matching_data or [spec(da), spec(db)],
            "images": args.images,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "image_size": a.image_size,
            "mock_data": args.mock_data,
            "data_dir": args.data_dir,
        }
        rows, matching_seconds = common.merge_grid(
            args, a, b, batches, heads="shared", cache_key=cache_key, score=score, log=log
        )
    return common.finish_run(
        args,
        EXPERIMENT,
        model_type=model_type,
        pair=[da, db],
        paths=(pa, pb),
        batches=batches,
        seconds=timer(),
        eval_sets=evals,
        metric="top-1 accuracy, mean over the test domains",
        settings=common.settings(
            args, model_type=model_type, image_size=a.image_size, domains=[da, db]
        ),
        sources=sources,
        results=rows,
        matching_seconds=matching_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints progress and the result file's path."""
    return common.experiment_main(run, parser(), "experiments.shared_label_space", argv)


if __name__ == "__main__":
    sys.exit(main())
