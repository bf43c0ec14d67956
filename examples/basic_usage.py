"""Basic usage: the PLeaS pipeline step by step, with pleas-jax's lower-level functions.

The original PyTorch release's README shows the flow as: load two models, build the
permutation spec, match activations, choose per-group merging ratios, partially merge,
then optimise the merged model by least squares. Here is that flow in pleas-jax, on two
ResNet-20s (width 16) trained on the bundled MNIST images at 16x16 with different seeds
(the checkpoints shipped in ``demo/checkpoints``), merged into one model of 1.5x the
compute of either source. ``pleas_jax.merge(...)`` runs the same steps in one call.

Run from the repository root (about 50 s of CPU time, most of it compiling and
accumulating the least-squares statistics)::

    python examples/basic_usage.py
    python examples/basic_usage.py --budget 1.25 --images 1000

It prints the test accuracy of both source models, of the partial merge before least
squares, and of the PLeaS merge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import pleas_jax
from pleas_jax import budget as budget_lib
from pleas_jax import workflow

CHECKPOINTS = Path(__file__).resolve().parents[1] / "demo" / "checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    same = "trained on the same classes as the other: this example merges into one shared head"
    parser.add_argument("--a", default=str(CHECKPOINTS / "mnist5k_seed0"), help=f"model A, {same}")
    parser.add_argument("--b", default=str(CHECKPOINTS / "mnist5k_seed1"), help=f"model B, {same}")
    parser.add_argument(
        "--budget",
        type=float,
        default=1.5,
        help="merged compute relative to one model, in [1, 2] (default 1.5)",
    )
    parser.add_argument(
        "--images", type=int, default=400, help="training images the merge sees (default 400)"
    )
    args = parser.parse_args()

    # 1. Load two models of the same architecture: (module, variables) pairs plus the
    #    metadata that says how their inputs were prepared.
    a, b = workflow.load_model(args.a), workflow.load_model(args.b)
    if workflow.heads_mode(a, b) != "shared":
        parser.error(
            "A and B were trained on different classes; this example merges them into one "
            "shared head (pleas-jax merge gives each its own head)"
        )
    module_a, va = a.module, a.variables
    module_b, vb = b.module, b.variables
    # The task's data at the models' image size and normalisation (a Dataset with
    # x_train [N, 16, 16, 1], y_train [N], x_test, y_test).
    dataset = workflow.dataset_for(a, a.metadata["data"])
    print(f"model A ({Path(args.a).name}): test accuracy {workflow.evaluate(a, dataset):.4f}")
    # Each source model reads the data with its own training normalisation.
    acc_b = workflow.evaluate(b, workflow.dataset_for(b, a.metadata["data"]))
    print(f"model B ({Path(args.b).name}): test accuracy {acc_b:.4f}")

    # Unlabelled training images for matching, least squares and BatchNorm statistics:
    # a list of batches [200, 16, 16, 1] (re-iterable: every step reads them again).
    # 400 images keep the least-squares statistics cheap; more help little here.
    batches = workflow.merge_batches(dataset, args.images, 200)

    # 2. The permutation spec, traced from A's apply function on one image: group ->
    #    Group(size, ((param path, axis), ...)), the axes each permutation moves together.
    spec = pleas_jax.derive_spec(module_a, va, batches[0][:1])
    print(f"permutation spec: {len(spec)} groups, sizes {sorted({g.size for g in spec.values()})}")

    # 3. Activation matching: perm[g][i] is B's unit matched with A's unit i; costs[g]
    #    [n, n] scores every pair (higher is better).
    perm, costs = pleas_jax.activation_matching(module_a, va, module_b, vb, spec, batches)

    # 4. Per-group ratios: a ratio of 0 merges every unit of the group, 1 keeps all of
    #    A's and B's units separate. Here the same ratio for every group, solved so the
    #    merged model costs the budget ("zip" and "optimized" spread it unevenly).
    table = budget_lib.layer_table(module_a, va, spec, batches[0].shape[1:])
    ratios = budget_lib.ratios_for_budget("uniform", table, spec, args.budget)
    achieved = budget_lib.relative_compute(table, spec, ratios)
    print(
        f"ratios: {np.mean(list(ratios.values())):.3f} on average for budget "
        f"{args.budget} (achieved {achieved:.3f})"
    )

    # 5. Partial merge: per group the best-matched pairs are averaged, the rest kept
    #    from A and from B; channels are laid out [merged | A-only | B-only].
    blocks = pleas_jax.make_blocks(spec, perm, costs, ratios)
    merged_module, merged = pleas_jax.partial_merge(module_a, spec, blocks, va, vb)
    zipped = pleas_jax.recompute_batch_norm(merged_module, merged, batches)
    acc = workflow.evaluate(workflow.Model(merged_module, zipped, name="partial"), dataset)
    print(f"partial merge, no least squares: test accuracy {acc:.4f}")

    # 6. Least squares: every conv/linear layer is refit (closed form) so the merged
    #    model reproduces both source models' features; then BatchNorm statistics.
    merged, _ = pleas_jax.least_squares(
        module_a,
        va,
        module_b,
        vb,
        spec,
        blocks,
        merged_module,
        merged,
        batches,
        mode="closed_form",
    )
    merged = pleas_jax.recompute_batch_norm(merged_module, merged, batches)
    acc = workflow.evaluate(workflow.Model(merged_module, merged, name="merged"), dataset)
    print(f"merged model (PLeaS, budget {args.budget}): test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
