"""The conv/dense layer table read from a traced forward pass."""

import pytest

from pleas_jax import accounting, layer_shapes, models
from pleas_jax.tree import flatten
from tests.helpers import source_table


def test_layer_table_reads_taps_padding_and_bias():
    _, _, _, table = source_table("resnet18", 64)
    layers = {la.name: la for la in table.layers}
    assert len(layers) == 21  # 20 convs + fc
    stem = layers["conv1"]
    assert (stem.kernel_size, stem.positions, stem.in_group, stem.c_in) == (
        (7, 7),
        32 * 32,
        None,
        3,
    )
    # 3x3 pad 1 on a 2x2 map: each output position sees 2x2 real input taps.
    last = layers["layer4_1/conv2"]
    assert (last.positions, last.taps, last.valid_taps) == (4, 36, 16)
    down = layers["layer4_0/downsample_0"]
    assert down.taps == down.valid_taps == 4
    fc = layers["fc"]
    assert (fc.kernel_size, fc.positions, fc.out_group, fc.bias) == ((), 1, None, True)
    assert not any(la.bias for la in table.layers if la.name != "fc")


def test_table_is_per_image():
    model, v, spec, table = source_table("resnet18", 64)
    batched = layer_shapes.layer_table(model, v, spec, (8, 64, 64, 3))
    assert batched == table
    assert flatten(v)  # variables untouched


def test_bad_input_shape_is_an_error():
    _, _, spec, _ = source_table("resnet18", 64)
    for bad in ((32, 32), (1, 2, 32, 32, 3), (0, 32, 3)):
        with pytest.raises(ValueError, match="input_shape"):
            layer_shapes.layer_table(models.resnet20(), {}, spec, bad)
    assert layer_shapes.image_shape((4, 32, 16, 3)) == (32, 16, 3)


def test_accounting_re_exports_the_table():
    for name in layer_shapes.__all__:
        assert getattr(accounting, name) is getattr(layer_shapes, name)


def test_layers_inside_loops_are_refused_not_counted_once():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Looped(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), padding="SAME")
            x = conv(x)  # created outside, run three more times in a loop
            x = jax.lax.fori_loop(0, 3, lambda i, h: conv(h), x)
            return x.mean(axis=(1, 2))

    m = Looped()
    x = jnp.zeros((1, 8, 8, 3))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"enter a (while|scan).*cannot be counted; unroll"):
        layer_shapes.layer_table(m, variables, {}, (8, 8, 3))
