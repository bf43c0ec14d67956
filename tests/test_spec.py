"""Permutation specs derived by tracing, checked by permuting each group at random."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.spec import (
    Group,
    check_spec,
    derive_spec,
    drop_groups,
    merge_groups,
    rename_groups,
    spec_from_dict,
    spec_to_dict,
    validate_spec,
)
from pleas_jax.tree import map_with_path, path_str


def _setup(module, shape, seed=0):
    """Random variables and input, drawn on the host (no compilation).

    Kernels are He-scaled; BatchNorm and LayerNorm parameters and statistics
    are random so that no two channels are alike (a fresh init has all-equal
    BatchNorm layers, which would hide a BatchNorm missing from a group).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x[:1])

    def leaf(path, s):
        if len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
        if path[-1] in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0.0, 0.2, s.shape).astype(np.float32)

    return map_with_path(leaf, shapes), x


def _sizes(spec):
    return [g.size for g in spec.values()]


# ------------------------------------------------------------ ResNet groups
# stem (own group unless layer1_0 has no shortcut conv, then it is layer1's
# stream) + one stream per stage + the inner convs of every block; the last
# stream is fixed when it reaches the output (no classifier).
EXPECTED = {
    # arch: (with classifier, backbone only)
    "resnet18": (4 + 8, 4 + 8 - 1),
    "resnet34": (4 + 16, 4 + 16 - 1),
    "resnet50": (1 + 4 + 2 * 16, 1 + 4 + 2 * 16 - 1),
    "resnet101": (1 + 4 + 2 * 33, 1 + 4 + 2 * 33 - 1),
    "resnet20": (3 + 9, 3 + 9 - 1),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_resnet_group_counts(arch):
    x = jnp.zeros((1, 32, 32, 3))
    counts = []
    for num_classes in (10, None):
        m = models.resnet(arch, num_classes)
        spec = derive_spec(m, jax.eval_shape(m.init, jax.random.key(0), x), x)
        counts.append(len(spec))
        print(f"{arch} num_classes={num_classes}: {len(spec)} groups, sizes {_sizes(spec)}")
    assert tuple(counts) == EXPECTED[arch]
    assert EXPECTED["resnet50"] == (37, 36) and EXPECTED["resnet18"] == (12, 11)


def test_resnet18_groups_in_detail():
    m = models.resnet18(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    spec = derive_spec(m, jax.eval_shape(m.init, jax.random.key(0), x), x)
    keys = list(spec)
    # Stem joins layer1's stream: layer1_0 has an identity shortcut.
    assert keys[:3] == [
        "params/conv1/kernel:3",
        "params/layer1_0/conv1/kernel:3",
        "params/layer1_1/conv1/kernel:3",
    ]
    stream1 = {(path_str(p), ax) for p, ax in spec["params/conv1/kernel:3"].axes}
    assert {
        ("params/bn1/scale", 0),
        ("batch_stats/bn1/var", 0),
        ("params/layer1_1/conv2/kernel", 3),
        ("params/layer2_0/conv1/kernel", 2),
        ("params/layer2_0/downsample_0/kernel", 2),
    } <= stream1
    inner = spec["params/layer1_0/conv1/kernel:3"]
    assert inner.size == 64
    # Ordered by first use in the forward pass.
    assert [(path_str(p), ax) for p, ax in inner.axes] == [
        ("params/layer1_0/conv1/kernel", 3),
        ("batch_stats/layer1_0/bn1/mean", 0),
        ("batch_stats/layer1_0/bn1/var", 0),
        ("params/layer1_0/bn1/scale", 0),
        ("params/layer1_0/bn1/bias", 0),
        ("params/layer1_0/conv2/kernel", 2),
    ]
    stream4 = spec["params/layer4_0/conv2/kernel:3"]
    assert (("params", "fc", "kernel"), 0) in stream4.axes
    # The classifier's outputs are fixed; its bias is in no group.
    assert not any(p == ("params", "fc", "bias") for g in spec.values() for p, _ in g.axes)


def test_keys_and_order_do_not_depend_on_dict_order():
    # eval_shape (like jax.tree.map) returns dicts with sorted keys.
    m = models.resnet50(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(m.init, jax.random.key(0), x)
    assert list(shapes) == ["batch_stats", "params"]

    def reverse(tree):
        return (
            {k: reverse(tree[k]) for k in reversed(list(tree))} if isinstance(tree, dict) else tree
        )

    sorted_keys = derive_spec(m, shapes, x)
    assert derive_spec(m, reverse(shapes), x) == sorted_keys
    assert list(sorted_keys)[:4] == [
        "params/conv1/kernel:3",
        "params/layer1_0/conv1/kernel:3",
        "params/layer1_0/conv2/kernel:3",
        "params/layer1_0/conv3/kernel:3",
    ]


def test_resnet50_stem_is_its_own_group():
    m = models.resnet50(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    spec = derive_spec(m, jax.eval_shape(m.init, jax.random.key(0), x), x)
    stem = spec["params/conv1/kernel:3"]
    paths = {path_str(p) for p, _ in stem.axes}
    assert "params/layer1_0/conv1/kernel" in paths
    assert "params/layer1_0/downsample_0/kernel" in paths
    assert "params/layer1_0/conv3/kernel" not in paths
    assert spec["params/layer1_0/conv3/kernel:3"].size == 256


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet20"])
def test_check_spec_passes_on_resnets(arch):
    m = models.resnet(arch, 10)
    v, x = _setup(m, (2, 32, 32, 3))
    spec = derive_spec(m, v, x[:1])
    check_spec(m, v, spec, x)


def test_resnet101_trace_and_cheap_check():
    m = models.resnet101(num_classes=10)
    v, x = _setup(m, (2, 32, 32, 3))
    spec = derive_spec(m, v, x[:1])
    assert len(spec) == 71
    keys = list(spec)
    check_spec(m, v, spec, x, groups=keys[::10])


def _odd_resnet50():
    """A resnet50 whose every group has a non-standard width (as in tests/models)."""
    ref = models.resnet50(num_classes=7)
    rng = np.random.default_rng(0)
    stream = tuple(int(w) for w in rng.integers(8, 40, size=4))
    inner = tuple(tuple(int(w) for w in rng.integers(4, 30, size=2)) for _ in ref.inner_widths)
    return models.ResNet("bottleneck", ref.stage_sizes, 40, stream, inner, ref.downsample, 7)


def test_check_spec_passes_on_nonstandard_widths():
    m = _odd_resnet50()
    v, x = _setup(m, (2, 32, 32, 3))
    spec = derive_spec(m, v, x[:1])
    assert len(spec) == 37
    assert spec["params/conv1/kernel:3"].size == 40
    assert spec["params/layer4_0/conv3/kernel:3"].size == m.stream_widths[3]
    print("odd resnet50 sizes", _sizes(spec))
    check_spec(m, v, spec, x)


def test_free_output_backbone():
    m = models.resnet20(num_classes=None)
    v, x = _setup(m, (2, 16, 16, 3))
    fixed = derive_spec(m, v, x[:1])
    free = derive_spec(m, v, x[:1], free_output=True)
    assert len(fixed) == 11 and len(free) == 12
    check_spec(m, v, free, x, free_output=True)
    with pytest.raises(AssertionError, match="layer3_0/conv2"):
        check_spec(m, v, free, x)  # the output moves with the last stream


def test_train_mode_with_mutable_batch_stats():
    m = models.resnet20(num_classes=10)
    v, x = _setup(m, (4, 16, 16, 3))
    kw = {"train": True, "mutable": ["batch_stats"]}
    spec = derive_spec(m, v, x, apply_kwargs=kw)
    assert spec == derive_spec(m, v, x[:1])
    check_spec(m, v, spec, x, apply_kwargs=kw)


# ------------------------------------------------------------ other models
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.LayerNorm()(x)
        x = nn.gelu(nn.Dense(24)(x))
        x = jnp.tanh(nn.Dense(12)(x))
        return nn.Dense(3)(x)


def test_mlp():
    m = MLP()
    v, x = _setup(m, (5, 10))
    spec = derive_spec(m, v, x[:1])
    assert _sizes(spec) == [16, 24, 12]
    assert {path_str(p) for p, _ in spec["params/Dense_0/kernel:1"].axes} == {
        "params/Dense_0/kernel",
        "params/Dense_0/bias",
        "params/LayerNorm_0/scale",
        "params/LayerNorm_0/bias",
        "params/Dense_1/kernel",
    }
    check_spec(m, v, spec, x)


class VGG(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(12, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(5)(x)


@pytest.mark.parametrize("size, expected", [(8, [8, 8, 16, 12, 32]), (16, [8, 8, 16, 32])])
def test_vgg(size, expected):
    # At 8 px the last map is 1x1 and the flatten keeps the channel axis; at
    # 16 px it merges 2x2x12 positions and channels, which no single group can
    # permute, so the last conv's channels are fixed.
    m = VGG()
    v, x = _setup(m, (2, size, size, 3))
    spec = derive_spec(m, v, x[:1])
    assert _sizes(spec) == expected
    check_spec(m, v, spec, x)


@jax.custom_vjp
def _swish(x):
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    return _swish(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s + x * s * (1 - s)),)


_swish.defvjp(_swish_fwd, _swish_bwd)


class Zoo(nn.Module):
    """Depthwise, grouped, concatenated, rematerialised, gated and einsum'd layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        x = nn.LayerNorm(name="ln")(x)
        x = _swish(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x)
        n, h, w, c = x.shape
        x = x.reshape((n, h * w, c)).reshape((n, h, w, c))  # tokens and back
        a = nn.remat(nn.Conv)(6, (1, 1), name="branch_a")(x)
        b = nn.Conv(4, (1, 1), name="branch_b")(x)
        x = jnp.concatenate([a, b], axis=-1)
        x = nn.Conv(6, (3, 3), feature_group_count=2, name="grouped")(x)
        x = nn.relu(nn.Conv(7, (1, 1), name="expand")(x))
        x = x + np.ones(7, np.float32)  # uniform along channels: no constraint
        gate = jax.nn.sigmoid(nn.Dense(7, name="gate")(x.mean(axis=(1, 2))))
        x = x * gate[:, None, None, :]
        proj = self.param("proj", nn.initializers.lecun_normal(), (7, 5))
        x = jnp.einsum("nhwc,cd->nhwd", x, proj)
        x = x + np.arange(5, dtype=np.float32)  # varies along channels: pins them
        return nn.Dense(3, name="head")(x.max(axis=(1, 2)))


def test_zoo_of_primitives():
    m = Zoo()
    v, x = _setup(m, (2, 8, 8, 3))
    spec = derive_spec(m, v, x[:1])
    assert list(spec) == ["params/stem/kernel:3", "params/expand/kernel:3"]
    stem = {(path_str(p), ax) for p, ax in spec["params/stem/kernel:3"].axes}
    assert stem == {
        ("params/stem/kernel", 3),
        ("params/stem/bias", 0),
        ("params/ln/scale", 0),
        ("params/ln/bias", 0),
        ("params/depthwise/kernel", 3),
        ("params/depthwise/bias", 0),
        ("params/branch_a/kernel", 2),
        ("params/branch_b/kernel", 2),
    }
    expand = {(path_str(p), ax) for p, ax in spec["params/expand/kernel:3"].axes}
    assert expand == {
        ("params/expand/kernel", 3),
        ("params/expand/bias", 0),
        ("params/gate/kernel", 0),
        ("params/gate/kernel", 1),
        ("params/gate/bias", 0),
        ("params/proj", 0),
    }
    check_spec(m, v, spec, x)


# ------------------------------------------------------------ errors
def test_wrong_spec_is_caught_and_named():
    m = models.resnet18(num_classes=10)
    v, x = _setup(m, (2, 32, 32, 3))
    spec = derive_spec(m, v, x[:1])
    key = "params/layer1_0/conv1/kernel:3"
    group = spec[key]
    broken = dict(spec)
    broken[key] = dataclasses.replace(
        group, axes=tuple(a for a in group.axes if path_str(a[0]) != "params/layer1_0/bn1/scale")
    )
    with pytest.raises(AssertionError, match="layer1_0/conv1/kernel:3"):
        check_spec(m, v, broken, x, groups=[key])


def test_validation_names_the_path():
    m = MLP()
    v, _ = _setup(m, (1, 10))
    with pytest.raises(ValueError, match="params/Dense_9/kernel is not in the variables"):
        spec_from_dict({"h": [("params/Dense_9/kernel", 1)]}, v)
    with pytest.raises(ValueError, match="params/Dense_1/kernel axis 0 has length 16, the group"):
        spec_from_dict({"h": [("params/Dense_1/kernel", 1), ("params/Dense_1/kernel", 0)]}, v)
    with pytest.raises(ValueError, match="no axis 2"):
        spec_from_dict({"h": [("params/Dense_1/bias", 0), ("params/Dense_1/bias", 2)]}, v)
    bad = {"h": Group(16, ((("params", "Dense_0", "bias"), 0), (("params", "Dense_0", "bias"), 0)))}
    with pytest.raises(ValueError, match="also in group 'h'"):
        validate_spec(bad, v)
    with pytest.raises(ValueError, match="params/Dense_9/bias is not in the variables"):
        check_spec(m, v, {"h": Group(16, ((("params", "Dense_9", "bias"), 0),))}, jnp.ones((1, 10)))


def test_hand_written_spec_and_editing():
    m = MLP()
    v, x = _setup(m, (3, 10))
    derived = derive_spec(m, v, x[:1])
    hand = spec_from_dict(
        {
            "hidden0": [
                ("params/Dense_0/kernel", 1),
                ("params/Dense_0/bias", 0),
                ("params/LayerNorm_0/scale", 0),
                ("params/LayerNorm_0/bias", 0),
                ("params/Dense_1/kernel", 0),
            ],
            "hidden1": [("params/Dense_1/kernel", 1), ("params/Dense_1/bias", 0)],
        },
        v,
    )
    assert hand["hidden0"] == derived["params/Dense_0/kernel:1"]
    check_spec(m, v, hand, x, groups=["hidden0"])
    with pytest.raises(AssertionError, match="hidden1"):
        check_spec(m, v, hand, x)  # Dense_2's input is missing from hidden1

    assert spec_from_dict(spec_to_dict(derived), v) == derived
    renamed = rename_groups(derived, {"params/Dense_1/kernel:1": "h1"})
    assert list(renamed) == ["params/Dense_0/kernel:1", "h1", "params/Dense_2/kernel:1"]
    assert list(drop_groups(derived, ["params/Dense_0/kernel:1"])) == list(derived)[1:]
    with pytest.raises(ValueError, match="sizes"):
        merge_groups(derived, ["params/Dense_0/kernel:1", "params/Dense_1/kernel:1"])
    with pytest.raises(KeyError):
        drop_groups(derived, ["nope"])


def test_merge_groups():
    m = models.resnet18(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    spec = derive_spec(m, jax.eval_shape(m.init, jax.random.key(0), x), x)
    a, b = "params/layer1_0/conv1/kernel:3", "params/layer1_1/conv1/kernel:3"
    merged = merge_groups(spec, [a, b], "layer1_inner")
    assert len(merged) == len(spec) - 1
    assert list(merged)[1] == "layer1_inner"
    assert merged["layer1_inner"].axes == spec[a].axes + spec[b].axes
