"""A torch reference for any ResNet config, and the torch-vs-Flax parity check.

:func:`torch_model` gives torchvision's own ``resnetNN`` for standard ImageNet
configs and :class:`TorchResNet` (a torch twin with torchvision's module names)
for what torchvision cannot express: free widths of merged models, ResNet-20.
:func:`randomize_batch_norm` makes BatchNorm non-trivial so a swapped tensor
cannot hide, and :func:`verify` runs torch and Flax on one random batch in fp32
and reports the largest logit differences. This is what "verified" means for
a conversion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torch import nn

from converters.torch_layout import IN_CHANNELS, ConversionError, _first_and_count
from converters.torch_mapping import flax_to_state_dict, input_channels
from pleas_jax import models
from pleas_jax.models import ResNet


# ------------------------------------------------------------ torch reference
class _TorchBlock(nn.Module):
    def __init__(self, block: str, width_in: int, widths, stride: int, downsample: bool):
        super().__init__()
        kernels = (3, 3) if block == "basic" else (1, 3, 1)
        c = width_in
        for i, (w, k) in enumerate(zip(widths, kernels, strict=True)):
            st = stride if k == 3 and i == kernels.index(3) else 1
            setattr(self, f"conv{i + 1}", nn.Conv2d(c, w, k, st, k // 2, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(w))
            c = w
        self.n = len(kernels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(width_in, widths[-1], 1, stride, bias=False), nn.BatchNorm2d(widths[-1])
            )

    def forward(self, x):
        y = x
        for i in range(1, self.n + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.n:
                y = self.relu(y)
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """A torch twin of any :class:`ResNet` config, with torchvision's module names.

    torchvision cannot express free widths (merged models) nor ResNet-20; this
    mirror can, and for standard configs its ``state_dict`` keys, shapes and
    function equal torchvision's (tested). Input ``[N, in_channels, H, W]``.
    """

    def __init__(self, module: ResNet, in_channels: int = IN_CHANNELS):
        super().__init__()
        k, stride = (7, 2) if module.stem == "imagenet" else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, module.stem_width, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(module.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if module.stem == "imagenet" else nn.Identity()
        width_in, b = module.stem_width, 0
        for s, size in enumerate(module.stage_sizes):
            blocks = []
            for j in range(size):
                widths = (*module.inner_widths[b], module.stream_widths[s])
                stride = module.stage_strides[s] if j == 0 else 1
                blocks.append(
                    _TorchBlock(module.block, width_in, widths, stride, module.downsample[b])
                )
                width_in, b = widths[-1], b + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.n_stages = len(module.stage_sizes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = (
            nn.Identity() if module.num_classes is None else nn.Linear(width_in, module.num_classes)
        )

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_model(module: ResNet, in_channels: int = IN_CHANNELS) -> tuple[nn.Module, str]:
    """A freshly initialised torch model with ``module``'s structure, and its name.

    torchvision's own ``resnetNN`` for the standard ImageNet configs on RGB
    images, else :class:`TorchResNet` (merged widths, ResNet-20, a stem that
    reads ``in_channels`` other than 3: torchvision's reads 3).
    """
    arch = models.arch_name(module)
    if arch is not None and arch != "resnet20" and in_channels == IN_CHANNELS:
        if module.config() == models.resnet(arch, module.num_classes).config():
            net = getattr(torchvision.models, arch)(
                weights=None, num_classes=module.num_classes or 1
            )
            if module.num_classes is None:
                net.fc = nn.Identity()
            return net, f"torchvision.models.{arch}"
    return TorchResNet(module, in_channels), "converters.torch_to_flax.TorchResNet"


def randomize_batch_norm(net: nn.Module, seed: int = 0, image_size: int = 64) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    A fresh BN is the identity (scale 1, bias 0, mean 0, var 1), which would hide
    a swapped or dropped BN tensor in a parity check; and in eval mode an
    untrained deep ResNet's activations then grow by orders of magnitude per
    stage. So: random affine parameters, running statistics measured on one
    train-mode pass over random images ``[8, C, image_size, image_size]`` (``C``:
    what its first conv reads), as a trained net would have, keeping logits
    O(1), then perturbed per channel, and random ``num_batches_tracked``.
    Returns ``net`` (modified, mode kept).
    """
    g = torch.Generator().manual_seed(seed)
    stem = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    training, momenta = net.training, [m.momentum for m in bns]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.reset_running_stats()
            m.momentum = None  # a plain average over the pass
        net.train()
        net(torch.randn(8, stem.in_channels, image_size, image_size, generator=g))
        for m, momentum in zip(bns, momenta, strict=True):
            c = m.num_features
            m.momentum = momentum
            mean, var, seen = m.running_mean, m.running_var, m.num_batches_tracked
            if mean is None or var is None or seen is None:
                raise ValueError(f"{m} keeps no running statistics to randomise")
            mean.add_(0.1 * var.sqrt() * torch.randn(c, generator=g))
            var.mul_(0.7 + 0.7 * torch.rand(c, generator=g))
            seen.fill_(int(torch.randint(1, 10_000, (), generator=g)))
    net.train(training)
    return net


@dataclasses.dataclass
class Verification:
    """Torch vs Flax on one random batch.

    Attributes:
      max_abs: max |torch - flax| over all outputs.
      max_rel: ``max_abs`` divided by the largest |torch output|.
      scale: the largest |torch output|.
      reference: which torch model was run.
      shape: the output shape ``[N, num_classes]``.
    """

    max_abs: float
    max_rel: float
    scale: float
    reference: str
    shape: tuple[int, ...]


def verify(
    module: ResNet,
    variables: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    batch_size: int = 2,
    image_size: int | None = None,
    seed: int = 0,
) -> Verification:
    """Run torch and Flax in eval mode, fp32, on the same random batch and compare.

    Args:
      module, variables: the Flax model.
      state_dict: the torch weights to run; by default ``flax_to_state_dict(module, variables)``.
      batch_size, image_size: the batch ``[N, C, S, S]``, ``C`` the channels the
        stem reads (:func:`converters.torch_mapping.input_channels`); ``S``
        defaults to 224 for the ImageNet stem and 32 for the CIFAR one.
      seed: seed of the random batch.

    Returns:
      A :class:`Verification` with the max absolute and relative logit differences.
    """
    channels = input_channels(variables)
    net, reference = torch_model(module, channels)
    if state_dict is None:
        state_dict = flax_to_state_dict(module, variables)
    net.load_state_dict(dict(state_dict), strict=False)
    missing = set(net.state_dict()) - set(state_dict)
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise ConversionError(
            f"state_dict lacks {_first_and_count(sorted(missing))} for {reference}"
        )
    net.eval()
    size = image_size or (224 if module.stem == "imagenet" else 32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, size, size, generator=g)
    with torch.no_grad():
        want = net(x).numpy()
    # TPU/GPU default to bf16/tf32 passes in matmuls and convs; parity needs full fp32.
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy())))
    # A NaN must not compare as "within tolerance": count it as an infinite difference.
    diff = np.abs(got - want)
    max_abs = float(np.max(np.where(np.isnan(diff), np.inf, diff)))
    scale = float(np.max(np.abs(want)))
    return Verification(
        max_abs, max_abs / scale if scale > 0 else max_abs, scale, reference, got.shape
    )
