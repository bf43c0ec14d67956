"""The paper's different-label-spaces experiment: fine-grained classification.

Two ResNets fine-tuned on two fine-grained datasets (CUB-200, Oxford-IIIT Pets,
Stanford Dogs, NABirds; different classes) are merged with every method at every
budget. The merged backbone is scored on each task two ways:

- **own heads**: each source model's classifier, routed to the merged channel
  order, reads the merged features (``accuracies``; their mean is ``accuracy``;
  ``source_agreement``: how often a head predicts what its source model does);
- **linear probes**: a linear classifier per task trained on frozen merged
  features of the task's training split, as the paper does (Adam, lr 1e-3,
  ``--probe-epochs`` epochs, cosine to lr/10) (``probe_accuracies``,
  ``probe_accuracy``).

The sources are scored on their own tasks; the ensemble's own-head score is
their mean, and its probe reads both models' features side by side (what a
merge at budget 2 keeps). The merge sees ``--images`` training images, half
from each task, or, for PLeaS-free, from ``--matching-data SPEC`` (probes and
evaluation still use the tasks' data).

Datasets: ``cub`` (tfds ``caltech_birds2011``), ``oxford_pets``
(``oxford_iiit_pet``), ``stanford_dogs`` (``stanford_dogs``) and ``nabird``
(an image folder: ``--spec nabird=folder:PATH``, ``$NABIRDS_DIR`` or
``--data-dir``/nabirds/images). ``--spec NAME=SPEC`` reads any other data in a
name's place (``--spec cub=mnist5k[0-4]``): the record keeps the name as the
key of its scores and the spec under ``specs``; the report names the dataset
``cub=mnist5k[0-4]``. The record's ``model_type`` is the checkpoints'
architecture (``resnet20`` for a user's ResNet-20s given with ``--a/--b``).

Example::

    python -m experiments.different_label_space --checkpoints pretrained_models \\
        --model-type rn50 --datasets cub,oxford_pets --variants v1a,v1b \\
        --output-dir runs/fg/rn50/cub-oxford_pets/v1a-v1b
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import common, streams
from experiments.common import ExperimentError
from pleas_jax import heads as heads_lib
from pleas_jax import workflow as wf

EXPERIMENT = "different_label_space"


def parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.different_label_space",
        description="Merge two fine-grained models (different label spaces) with every method at "
        "every budget; score the merged backbone with each model's own head and with "
        "linear probes.",
    )
    p.add_argument(
        "--datasets",
        type=common.csv_list,
        required=True,
        metavar="DA,DB",
        help=f"datasets of models A and B, among {', '.join(common.FINE_GRAINED)}",
    )
    p.add_argument(
        "--probe-epochs",
        type=int,
        default=50,
        help="linear-probe epochs (the paper: 50; 0 skips the probes)",
    )
    p.add_argument("--probe-lr", type=float, default=1e-3, help="linear-probe learning rate")
    p.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe batch size")
    common.add_common_arguments(p)
    return p


def _probe(train_x, train_y, test_x, test_y, k, args) -> float:
    head = heads_lib.train_linear_probe(
        train_x,
        train_y,
        k,
        epochs=args.probe_epochs,
        learning_rate=args.probe_lr,
        batch_size=args.probe_batch_size,
        seed=args.seed,
    )
    return streams.accuracy(np.asarray(heads_lib.apply_head(head, test_x)), test_y)


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the experiment for one pair and model order; write and return its JSON.

    Raises:
      ExperimentError, RunError, DataError, CheckpointError: bad options,
        missing checkpoints or data (messages say how to get them).
    """
    common.check_common(args)
    timer = common.Timer()
    if (
        len(args.datasets) != 2
        or any(d not in common.FINE_GRAINED for d in args.datasets)
        or args.datasets[0] == args.datasets[1]
    ):
        raise ExperimentError(
            f"--datasets needs two different of "
            f"{', '.join(common.FINE_GRAINED)}, got {','.join(args.datasets)}"
        )
    if args.probe_epochs < 0:
        raise ExperimentError("--probe-epochs must be 0 (no probes) or more")
    ta, tb = args.datasets
    pa, pb = common.source_paths(args, ta, tb, log)
    a, b = common.load_source(pa, args.image_size), common.load_source(pb, args.image_size)
    wf.check_pair(a, b)
    model_type = common.model_type(a)  # A and B have one architecture (check_pair)
    specs = {t: common.dataset_spec(t, dict(args.spec), args.data_dir) for t in (ta, tb)}

    size, bs = a.image_size, args.batch_size
    ks = {ta: a.module.num_classes, tb: b.module.num_classes}
    sets = {t: streams.Images(specs[t], size, args.data_dir, ks[t], a.crop) for t in (ta, tb)}

    with common.maybe_mock_data(args.mock_data):
        if args.matching_data is not None:
            raw = streams.Images(args.matching_data, size, args.data_dir, crop=a.crop).sample(
                "train", args.images, args.seed
            )
        else:
            raw = streams.merge_sample([sets[ta], sets[tb]], args.images, args.seed)
        a, b = streams.with_normalization(a, raw), streams.with_normalization(b, raw)
        batches = streams.to_batches(streams.prepare(a, raw), bs)
        del raw

        def run_a(model, **kw):
            """A predictor of ``model`` on raw images normalised as model A reads them."""
            return lambda x: wf.predict(model, streams.prepare(a, x), batch_size=bs, **kw)

        log(f"scoring the sources on {specs[ta]} and {specs[tb]}")
        out, y = streams.collect(sets[ta], "test", {"a": run_a(a)})
        acc = {ta: streams.accuracy(out["a"], y)}
        # How often a merged model's heads predict what the source models do.
        source_pred = {ta: np.argmax(out["a"], axis=-1)}
        out, y = streams.collect(
            sets[tb], "test", {"b": lambda x: wf.predict(b, streams.prepare(b, x), batch_size=bs)}
        )
        acc[tb] = streams.accuracy(out["b"], y)
        source_pred[tb] = np.argmax(out["b"], axis=-1)
        ensemble: dict[str, Any] = {
            "accuracy": float(np.mean(list(acc.values()))),
            "accuracies": acc,
        }
        if args.probe_epochs:
            # The ensemble's probe reads both models' features side by side, each
            # model reading its inputs its own way.
            fa, fb = common.features_model(a), common.features_model(b)
            both = {
                "a": run_a(fa),
                "b": lambda x: wf.predict(fb, streams.prepare(b, x), batch_size=bs),
            }
            probes = {}
            for t in (ta, tb):
                feats = {}
                for split in ("train", "test"):
                    out, y = streams.collect(sets[t], split, both)
                    feats[split] = (np.concatenate([out["a"], out["b"]], axis=1), y)
                probes[t] = _probe(*feats["train"], *feats["test"], ks[t], args)
            ensemble.update(
                probe_accuracy=float(np.mean(list(probes.values()))), probe_accuracies=probes
            )
        sources = {
            "a": {"accuracy": acc[ta], "accuracies": {ta: acc[ta]}},
            "b": {"accuracy": acc[tb], "accuracies": {tb: acc[tb]}},
            "ensemble": ensemble,
        }
        log(f"sources: A on {ta} {acc[ta]:.4f}, B on {tb} {acc[tb]:.4f}")

        def score(merged: wf.Model) -> dict[str, Any]:
            own, agree = {}, {}
            for t, head in ((ta, "a"), (tb, "b")):
                out, y = streams.collect(sets[t], "test", {"m": run_a(merged, head=head)})
                own[t] = streams.accuracy(out["m"], y)
                agree[t] = float(np.mean(np.argmax(out["m"], axis=-1) == source_pred[t]))
            result = {
                "accuracy": float(np.mean(list(own.values()))),
                "accuracies": own,
                "source_agreement": float(np.mean(list(agree.values()))),
                "source_agreements": agree,
            }
            if args.probe_epochs:
                backbone = run_a(dataclasses.replace(merged, heads=None))
                probes = {}
                for t in (ta, tb):
                    tr, y_tr = streams.collect(sets[t], "train", {"f": backbone})
                    te, y_te = streams.collect(sets[t], "test", {"f": backbone})
                    probes[t] = _probe(tr["f"], y_tr, te["f"], y_te, ks[t], args)
                result.update(
                    probe_accuracy=float(np.mean(list(probes.values()))), probe_accuracies=probes
                )
            return result

        cache_key = {
            "data": args.matching_data or [specs[ta], specs[tb]],
            "images": args.images,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "image_size": a.image_size,
            "mock_data": args.mock_data,
            "data_dir": args.data_dir,
        }
        rows, matching_seconds = common.merge_grid(
            args, a, b, batches, heads="separate", cache_key=cache_key, score=score, log=log
        )
    return common.finish_run(
        args,
        EXPERIMENT,
        model_type=model_type,
        pair=[ta, tb],
        paths=(pa, pb),
        batches=batches,
        seconds=timer(),
        eval_sets=[ta, tb],
        specs=specs,
        metric="top-1 accuracy of each source model's own head on its task, mean over the "
        "two tasks (probe_accuracy: linear probes on the merged features)",
        settings=common.settings(
            args,
            model_type=model_type,
            image_size=a.image_size,
            datasets=[ta, tb],
            probe_epochs=args.probe_epochs,
            probe_lr=args.probe_lr,
            probe_batch_size=args.probe_batch_size,
        ),
        sources=sources,
        results=rows,
        matching_seconds=matching_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints progress and the result file's path."""
    return common.experiment_main(run, parser(), "experiments.different_label_space", argv)


if __name__ == "__main__":
    sys.exit(main())
