"""Flax ResNet family with torchvision-compatible names and free widths."""

from pleas_jax.models.layers import FEATURES, BatchNorm, Conv, Dense, Splits, block_apply
from pleas_jax.models.resnet import (
    ARCHITECTURES,
    Block,
    ResNet,
    arch_name,
    from_config,
    resnet,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    with_widths_of,
)

__all__ = [
    "ARCHITECTURES",
    "FEATURES",
    "BatchNorm",
    "Block",
    "Conv",
    "Dense",
    "ResNet",
    "Splits",
    "arch_name",
    "block_apply",
    "from_config",
    "resnet",
    "resnet18",
    "resnet20",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "with_widths_of",
]
