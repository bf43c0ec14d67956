"""Weight matching recovers planted permutations; its costs are in B's coordinates."""

import jax
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.matching.weights import weight_matching
from pleas_jax.permutation import apply_permutation, invert
from pleas_jax.permutation import random as random_perm
from pleas_jax.spec import derive_spec
from pleas_jax.tree import flatten, unflatten
from tests.helpers import init, randomize_norms


def _noisy(variables, scale, seed):
    rng = np.random.default_rng(seed)
    return unflatten(
        {
            p: v + scale * rng.normal(size=v.shape).astype(np.float32) * np.std(v)
            for p, v in flatten(variables).items()
        }
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_recovers_planted_permutation(arch, noise):
    module = models.resnet(arch, num_classes=10, width=16)
    va = randomize_norms(init(module), seed=1)
    spec = derive_spec(module, va, np.zeros((1, 32, 32, 3), np.float32))
    planted = random_perm(spec, jax.random.key(2))
    vb = apply_permutation(va, spec, planted)
    if noise:
        vb = _noisy(vb, noise, seed=3)
    perm, costs = weight_matching(spec, va, vb, seed=0)
    expected = invert(planted)
    for g in spec:
        np.testing.assert_array_equal(perm[g], np.asarray(expected[g]), err_msg=g)
    aligned = apply_permutation(vb, spec, perm)
    if not noise:
        for p, v in flatten(va).items():
            np.testing.assert_array_equal(
                np.asarray(flatten(aligned)[p]), np.asarray(v), err_msg=str(p)
            )


def test_costs_are_in_original_coordinates():
    module = models.resnet20(num_classes=5, width=8)
    va = randomize_norms(init(module, 16), seed=4)
    vb = randomize_norms(init(module, 16, seed=5), seed=6)  # an unrelated model
    spec = derive_spec(module, va, np.zeros((1, 16, 16, 3), np.float32))
    perm, costs = weight_matching(spec, va, vb, seed=1)
    # The matched pair's score, computed independently: align all of B, then
    # take the inner product of A's unit i with aligned B's unit i over every
    # parameter tensor axis of the group.
    aligned = flatten(apply_permutation(vb, spec, perm))
    fa = flatten(va)
    for g, group in spec.items():
        direct = np.zeros(group.size)
        for path, axis in group.axes:
            if path[0] != "params":
                continue
            a = np.moveaxis(np.asarray(fa[tuple(path)], np.float64), axis, 0).reshape(
                group.size, -1
            )
            b = np.moveaxis(np.asarray(aligned[tuple(path)], np.float64), axis, 0).reshape(
                group.size, -1
            )
            direct += (a * b).sum(1)
        rows = np.arange(group.size)
        np.testing.assert_allclose(costs[g][rows, perm[g]], direct, rtol=1e-4, atol=1e-4, err_msg=g)


def test_different_widths_are_rejected_before_work():
    a = models.resnet20(num_classes=5, width=8)
    b = models.resnet20(num_classes=5, width=4)
    va, vb = init(a, 16), init(b, 16)
    spec = derive_spec(a, va, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="has shape"):
        weight_matching(spec, va, vb)


def _plain_coordinate_descent(spec, va, vb, seed, max_iter=100):
    """Reference: every group re-solved from scratch in every sweep, scores in
    float64 numpy from B with all current permutations applied."""
    from pleas_jax.matching import lap

    fa = flatten(va)
    perm = {g: np.arange(group.size) for g, group in spec.items()}
    rng = np.random.default_rng(seed)
    groups = list(spec)
    solves = 0
    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(groups)):
            g = groups[i]
            others = {h: perm[h] if h != g else np.arange(spec[g].size) for h in spec}
            fb = flatten(apply_permutation(vb, spec, others))
            s = np.zeros((spec[g].size, spec[g].size))
            for path, axis in spec[g].axes:
                if path[0] != "params":
                    continue
                a = np.moveaxis(np.asarray(fa[tuple(path)], np.float64), axis, 0).reshape(
                    spec[g].size, -1
                )
                b = np.moveaxis(np.asarray(fb[tuple(path)], np.float64), axis, 0).reshape(
                    spec[g].size, -1
                )
                s += a @ b.T
            new = lap.solve(s)
            solves += 1
            rows = np.arange(len(new))
            if s[rows, new].sum() - s[rows, perm[g]].sum() > 1e-9 * max(
                1.0, abs(s[rows, perm[g]].sum())
            ):
                perm[g] = new
                improved = True
        if not improved:
            break
    return perm, solves


def test_same_result_as_plain_coordinate_descent_with_fewer_assignments():
    # weight_matching skips groups none of whose neighbours moved, keeps
    # per-tensor products until a permutation they read changes and solves
    # independent groups in threads; the result must be that of re-solving
    # everything every sweep, in order.
    from pleas_jax.matching import lap

    module = models.resnet20(num_classes=5, width=8)
    va = randomize_norms(init(module, 16), seed=4)
    vb = randomize_norms(init(module, 16, seed=5), seed=6)  # unrelated: many sweeps
    spec = derive_spec(module, va, np.zeros((1, 16, 16, 3), np.float32))
    solves = []

    def counting(scores):
        solves.append(1)
        return lap.scipy_solver(scores)

    for seed in (0, 1):
        ref, ref_solves = _plain_coordinate_descent(spec, va, vb, seed)
        # Groups sharing no tensor are solved concurrently: same result.
        for threads in (1, 4):
            solves.clear()
            perm, _ = weight_matching(spec, va, vb, seed=seed, solver=counting, threads=threads)
            for g in spec:
                np.testing.assert_array_equal(perm[g], ref[g], err_msg=f"seed {seed} {g} {threads}")
        print(f"seed {seed}: {len(solves)} assignments, plain coordinate descent {ref_solves}")
        assert ref_solves > 2 * len(spec)  # the pair needs several sweeps
        assert len(solves) < ref_solves


def test_bad_threads_is_an_error():
    module = models.resnet20(num_classes=5, width=4)
    va = init(module, 16)
    spec = derive_spec(module, va, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        weight_matching(spec, va, va, threads=0)


@pytest.mark.parametrize("scale", [1e-6, 1e3])
def test_weights_of_any_scale_match_alike(scale):
    """Costs scale with the weights squared; the stopping rule must not take a
    gain as rounding because the scores are small (it once kept the identity
    below weights of ~3e-6)."""
    module = models.resnet20(num_classes=10, width=4)
    va = randomize_norms(init(module, 16), seed=1)
    spec = derive_spec(module, va, np.zeros((1, 16, 16, 3), np.float32))
    planted = random_perm(spec, jax.random.key(2))
    vb = apply_permutation(va, spec, planted)
    sa, sb = (unflatten({p: x * scale for p, x in flatten(v).items()}) for v in (va, vb))
    perm, _ = weight_matching(spec, sa, sb, seed=0)
    expected = invert(planted)
    for g in spec:
        np.testing.assert_array_equal(perm[g], np.asarray(expected[g]), err_msg=g)
