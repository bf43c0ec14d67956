"""The torch reference (torchvision or the TorchResNet twin) and the parity check itself."""

import numpy as np
import torch
import torchvision

from converters import (
    TorchResNet,
    randomize_batch_norm,
    state_dict_to_flax,
    verify,
)
from pleas_jax import models
from tests.converters.helpers import TOLERANCE, resnet20_torch


def test_parity_check_catches_a_misplaced_bn_tensor():
    # Negative control: one misplaced BN tensor is far outside the tolerance.
    net = resnet20_torch()
    module, variables = state_dict_to_flax(net.state_dict())
    bn = variables["params"]["layer2_1"]["bn1"]
    bn["scale"], bn["bias"] = bn["bias"], bn["scale"]
    assert verify(module, variables, net.state_dict(), batch_size=2).max_rel > 100 * TOLERANCE
    # A swapped mean/var gives negative variances, NaN outputs: never "within tolerance".
    bn["scale"], bn["bias"] = bn["bias"], bn["scale"]
    stats = variables["batch_stats"]["layer2_1"]["bn1"]
    stats["mean"], stats["var"] = stats["var"], stats["mean"]
    assert verify(module, variables, net.state_dict(), batch_size=2).max_rel == np.inf


def test_torch_mirror_equals_torchvision(resnet18):
    # TorchResNet stands in for torchvision wherever torchvision cannot express
    # the widths; for a standard config it must be torchvision, name for name.
    mirror = TorchResNet(models.resnet("resnet18")).eval()
    sd = resnet18.state_dict()
    assert [(k, v.shape) for k, v in mirror.state_dict().items()] == [
        (k, v.shape) for k, v in sd.items()
    ]
    mirror.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mirror(x), resnet18(x), rtol=0, atol=0)
    r50 = torchvision.models.resnet50(weights=None)
    assert [(k, v.shape) for k, v in r50.state_dict().items()] == [
        (k, v.shape) for k, v in TorchResNet(models.resnet("resnet50")).state_dict().items()
    ]


def test_odd_widths_verify_against_mirror():
    # Fewer blocks than resnet50 keep the op-by-op CPU run short; widths all odd.
    module = models.ResNet(
        block="bottleneck",
        stage_sizes=(2, 1, 1, 1),
        stem_width=24,
        stream_widths=(70, 90, 130, 150),
        inner_widths=((20, 22), (17, 21), (33, 35), (41, 39), (57, 61)),
        downsample=(True, False, True, True, True),
        num_classes=5,
    )
    net = randomize_batch_norm(TorchResNet(module), 5).eval()
    inferred, variables = state_dict_to_flax(net.state_dict())
    report = verify(inferred, variables, net.state_dict(), batch_size=1, image_size=64)
    assert report.reference.endswith("TorchResNet")
    assert report.max_rel <= TOLERANCE
