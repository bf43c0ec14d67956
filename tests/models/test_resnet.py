"""Shapes, parameter counts and feature capture of the Flax ResNet family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.tree import flatten, path_str
from tests.helpers import apply, init, randomize_norms

# Parameter counts of torchvision's models (sum of numel over parameters, fc
# included, 1000 classes), as printed by torchvision itself.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}


def _n_params(module, size):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(arch):
    assert _n_params(models.resnet(arch), 64) == TORCHVISION_PARAMS[arch]


def test_resnet20_parameter_count():
    # 3 stages x 3 basic blocks, widths 16/32/64, 1x1 conv shortcuts: 0.27M.
    assert _n_params(models.resnet20(num_classes=10), 32) == 272_474


def test_torchvision_names():
    shapes = jax.eval_shape(models.resnet50().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    paths = {path_str(p) for p in flatten(shapes)}
    for expected in [
        "params/conv1/kernel",
        "params/bn1/scale",
        "params/layer1_0/conv3/kernel",
        "params/layer1_0/downsample_0/kernel",
        "params/layer1_0/downsample_1/bias",
        "batch_stats/layer4_2/bn2/mean",
        "batch_stats/layer4_2/bn2/var",
        "params/fc/kernel",
        "params/fc/bias",
    ]:
        assert expected in paths
    assert not any(p.startswith("features") for p in paths)


def test_inference_is_default_and_training_updates_stats():
    m = models.resnet20(num_classes=3)
    v = m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    y = apply(m, v, x)
    assert y.shape == (4, 3)
    _, state = m.apply(v, x, train=True, mutable=["batch_stats"])
    before = v["batch_stats"]["bn1"]["mean"]
    after = state["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(before, after)


def _odd_resnet50():
    """A resnet50 whose every group has a non-standard width."""
    ref = models.resnet50(num_classes=7)
    rng = np.random.default_rng(0)
    stem = 40
    stream = tuple(int(w) for w in rng.integers(8, 40, size=4))
    inner = tuple(tuple(int(w) for w in rng.integers(4, 30, size=2)) for _ in ref.inner_widths)
    return models.ResNet("bottleneck", ref.stage_sizes, stem, stream, inner, ref.downsample, 7)


def test_nonstandard_widths_expose_every_layer():
    m = _odd_resnet50()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = randomize_norms(init(m, 32))
    # One compiled function gives both the plain output and the recorded one.
    both = jax.jit(lambda v, x: (m.apply(v, x), m.apply(v, x, mutable=["features"])))
    y_plain, (y, state) = both(v, x)
    assert y.shape == (2, 7)
    np.testing.assert_array_equal(np.asarray(y_plain), np.asarray(y))
    feats = state["features"]
    # Every conv/dense records its input and output with the kernel's widths.
    kernels = {p[:-1]: k for p, k in flatten(v["params"]).items() if p[-1] == "kernel"}
    recorded = flatten(feats)
    assert len(kernels) == 54  # 53 convs + fc
    for path, kernel in kernels.items():
        x_in, x_out = recorded[(*path, "in")], recorded[(*path, "out")]
        assert x_in.shape[0] == 2 and x_out.shape[0] == 2
        assert x_in.shape[-1] == kernel.shape[-2], path
        assert x_out.shape[-1] == kernel.shape[-1], path
    assert recorded[("layer4_0", "conv2", "out")].shape == (2, 1, 1, m.inner_widths[13][1])
    assert recorded[("fc", "in")].shape == (2, m.stream_widths[-1])


def test_inconsistent_widths_are_rejected():
    ref = models.resnet18()
    bad = models.ResNet(
        "basic", ref.stage_sizes, 32, ref.stream_widths, ref.inner_widths, ref.downsample, 10
    )
    with pytest.raises(ValueError, match="layer1_0 has no downsample"):
        bad.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_config_round_trip():
    m = _odd_resnet50()
    assert models.from_config(m.config()) == m
    with pytest.raises(ValueError, match="stem_width"):
        models.from_config({k: v for k, v in m.config().items() if k != "stem_width"})


def test_arch_name_reads_the_strides_too():
    m = models.resnet18(num_classes=4)
    assert models.arch_name(m) == "resnet18"
    assert models.arch_name(m.clone(stage_strides=(1, 1, 1, 1))) is None


def test_backbone_without_classifier():
    m = models.resnet18(num_classes=None)
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert "fc" not in v["params"]
    assert jax.eval_shape(m.apply, v, jnp.zeros((3, 32, 32, 3))).shape == (3, 512)
