"""Inferring and checking the ResNet a state_dict holds, and the messages when it does not fit."""

import pytest
import torch
import torchvision

from converters import (
    ConversionError,
    infer_module,
    state_dict_to_flax,
)
from pleas_jax import models
from tests.converters.helpers import resnet20_torch


# ------------------------------------------------------------------- inference
def test_infer_resnet50_37_classes():
    sd = torchvision.models.resnet50(weights=None, num_classes=37).state_dict()
    module = infer_module(sd)
    assert module.config() == models.resnet("resnet50", 37).config()
    with pytest.raises(ConversionError, match="37 classes but num_classes=10"):
        infer_module(sd, num_classes=10)


def test_backbone_without_fc():
    sd = {k: v for k, v in resnet20_torch().state_dict().items() if not k.startswith("fc.")}
    module, variables = state_dict_to_flax(sd)
    assert module.num_classes is None
    assert "fc" not in variables["params"]


def test_requested_arch_accepts_width_multiplier():
    sd = resnet20_torch(width=64).state_dict()
    module, _ = state_dict_to_flax(sd, arch="resnet20")
    assert module.config() == models.resnet("resnet20", 10, width=64).config()


@pytest.mark.parametrize(
    "edit, arch, message",
    [
        (lambda sd: sd.pop("layer2.0.bn1.running_var"), "auto", "lacks 'layer2.0.bn1.running_var'"),
        (lambda sd: sd.update(extra=torch.ones(3)), "auto", "unexpected key 'extra'"),
        (
            lambda sd: sd.update({"layer2.1.conv1.weight": torch.ones(32, 32, 1, 1)}),
            "resnet20",
            r"'layer2.1.conv1.weight' has shape \(32, 32, 1, 1\); a resnet20 .* expects \(32, 32, 3, 3\)",
        ),
        (
            lambda sd: sd["layer1.0.conv2.weight"].view(-1)[5].fill_(float("nan")),
            "auto",
            "'layer1.0.conv2.weight' is not finite: 1 NaN",
        ),
        (
            lambda sd: sd["fc.bias"].fill_(float("inf")),
            "auto",
            "'fc.bias' is not finite: 0 NaN and 10 inf",
        ),
        (lambda sd: None, "resnet18", "holds a resnet20 .*not the requested resnet18"),
        (lambda sd: None, "resnet21", "unknown architecture 'resnet21'"),
    ],
    ids=["missing", "unexpected", "shape", "nan", "inf", "other-arch", "unknown-arch"],
)
def test_state_dict_errors(r20, edit, arch, message):
    sd = {k: v.clone() for k, v in r20.items()}
    edit(sd)
    with pytest.raises(ConversionError, match=message):
        state_dict_to_flax(sd, arch=arch)


def test_a_shortcut_without_parameters_is_a_conversion_error():
    """CIFAR ResNets with zero-padding shortcuts ('option A') have no
    downsample tensors: the widths change with no conv to change them."""
    sd = {k: v for k, v in resnet20_torch().state_dict().items() if ".downsample." not in k}
    with pytest.raises(
        ConversionError, match=r"inconsistent state_dict: .*no downsample.*option A"
    ):
        infer_module(sd)
    with pytest.raises(ConversionError, match="inconsistent state_dict"):
        state_dict_to_flax(sd)


def test_grouped_convolutions_are_named():
    sd = torchvision.models.resnext50_32x4d(weights=None).state_dict()
    with pytest.raises(ConversionError, match=r"layer1.0.conv2 reads 4 of 128 .*ResNeXt"):
        infer_module(sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_state_dicts_convert_exactly(dtype):
    sd = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in resnet20_torch().state_dict().items()
    }
    _, variables = state_dict_to_flax(sd)
    kernel = variables["params"]["conv1"]["kernel"]
    want = sd["conv1.weight"].float().permute(2, 3, 1, 0).numpy()
    assert kernel.dtype == "float32"
    assert (kernel == want).all()
