"""torch state_dict <-> Flax variables: logit and feature parity, exact round trip."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from converters import (
    ConversionError,
    flax_to_state_dict,
    input_channels,
    num_batches_tracked,
    state_dict_to_flax,
    stem_channels,
    verify,
)
from pleas_jax import models
from tests.converters.helpers import TOLERANCE, resnet20_torch, torchvision_model


def _flax_logits(module, variables, x_nchw):
    with jax.default_matmul_precision("highest"):
        return np.asarray(module.apply(variables, jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())))


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_logits_match_torchvision(arch, resnet18):
    net = resnet18 if arch == "resnet18" else torchvision_model(arch)
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd, arch="auto")
    assert models.arch_name(module) == arch
    assert module.config() == models.resnet(arch, 1000).config()
    # Two random 224x224 inputs, fp32, eval mode.
    report = verify(module, variables, sd, batch_size=2, image_size=224, seed=1)
    print(f"{arch}: max abs {report.max_abs:.3e}, max rel {report.max_rel:.3e}")
    assert report.reference == f"torchvision.models.{arch}"
    assert report.shape == (2, 1000)
    assert report.max_rel <= TOLERANCE


def test_every_conv_output_matches_resnet18(resnet18):
    module, variables = state_dict_to_flax(resnet18.state_dict())
    want = {}

    def hook(name):
        def record(_module, _inputs, output):
            want[name] = output.detach().permute(0, 2, 3, 1).numpy()

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in resnet18.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        resnet18(x)
    for h in handles:
        h.remove()
    with jax.default_matmul_precision("highest"):
        _, state = module.apply(
            variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), mutable=["features"]
        )
    assert len(want) == 20  # stem + 16 block convs + 3 downsample convs
    for name, out in want.items():
        path = tuple(re.sub(r"\.(\d+)", r"_\1", name).split("."))
        node = state["features"]
        for k in path:
            node = node[k]
        got = np.asarray(node["out"])
        assert got.shape == out.shape, name
        rel = np.max(np.abs(got - out)) / np.max(np.abs(out))
        assert rel <= TOLERANCE, f"{name}: relative difference {rel:.3e}"


@pytest.mark.parametrize("width", [16, 32])
def test_logits_match_resnet20(width):
    net = resnet20_torch(num_classes=10, width=width)
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd, arch="auto")
    assert module.config() == models.resnet("resnet20", 10, width=width).config()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = net(x).numpy()
    got = _flax_logits(module, variables, x)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= TOLERANCE
    # The converter's own torch mirror agrees with the hand-written ResNet-20.
    report = verify(module, variables, sd, batch_size=4)
    assert report.reference.endswith("TorchResNet")
    assert report.max_rel <= TOLERANCE


# ------------------------------------------------------------------ round trip
def test_round_trip_is_exact(resnet18):
    sd = resnet18.state_dict()
    module, variables = state_dict_to_flax(sd)
    back = flax_to_state_dict(module, variables, num_batches_tracked(sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_round_trip_resnet20_and_default_counter():
    net = resnet20_torch(width=16)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked is not None  # BN tracks running statistics by default
            m.num_batches_tracked.zero_()
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd)
    back = flax_to_state_dict(module, variables)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())


def test_flax_to_state_dict_names_a_bad_leaf():
    module, variables = state_dict_to_flax(resnet20_torch().state_dict())
    del variables["batch_stats"]["layer2_0"]["bn1"]["var"]
    with pytest.raises(ConversionError, match="batch_stats/layer2_0/bn1/var"):
        flax_to_state_dict(module, variables)


def test_a_grey_resnet20_converts_both_ways():
    # One input channel (MNIST): the config does not record it, the stem's weights do.
    net = resnet20_torch(num_classes=10, width=8, in_channels=1)
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd)
    assert input_channels(variables) == 1 and stem_channels(sd) == 1
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = net(x).numpy()
    got = _flax_logits(module, variables, x)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= TOLERANCE
    back = flax_to_state_dict(module, variables, num_batches_tracked(sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    # The converter's mirror reads one channel too, and agrees.
    report = verify(module, variables, image_size=12)
    assert report.reference.endswith("TorchResNet") and report.max_rel <= TOLERANCE
