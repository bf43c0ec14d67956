"""Torch and Flax names and shapes per layer, against the Flax module's own init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import (
    TorchResNet,
    state_dict_to_flax,
    torch_shapes,
)
from pleas_jax import models
from pleas_jax.tree import flatten, to_dict


def _odd_widths_resnet50(num_classes=7):
    std = models.resnet("resnet50", num_classes)
    rng = np.random.default_rng(0)
    return models.ResNet(
        block="bottleneck",
        stage_sizes=std.stage_sizes,
        stem_width=40,
        stream_widths=tuple(int(w) + int(rng.integers(1, 9)) for w in std.stream_widths),
        inner_widths=tuple(
            tuple(int(v) - int(rng.integers(1, 9)) for v in w) for w in std.inner_widths
        ),
        downsample=std.downsample,
        num_classes=num_classes,
    )


@pytest.mark.parametrize(
    "module",
    [models.resnet("resnet18", 10), models.resnet20(num_classes=None), _odd_widths_resnet50()],
    ids=["resnet18", "resnet20-backbone", "resnet50-odd-widths"],
)
def test_layout_matches_flax_init(module):
    # torch_shapes / the conversion are written from the config; the Flax
    # module's own init is the authority on paths and shapes.
    torch_net = TorchResNet(module)
    assert {k: tuple(v.shape) for k, v in torch_net.state_dict().items()} == dict(
        torch_shapes(module)
    )
    inferred, variables = state_dict_to_flax(torch_net.state_dict())
    assert inferred.config() == module.config()
    init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert {p: tuple(v.shape) for p, v in flatten(to_dict(init)).items()} == {
        p: v.shape for p, v in flatten(variables).items()
    }
