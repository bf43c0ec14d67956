"""Reading checkpoints as models: how a model reads its images."""

import pytest

from pleas_jax import models
from pleas_jax.data import IMAGENET_NORMALIZATION
from pleas_jax.scoring import Model


@pytest.mark.parametrize("arch", ["resnet18", "resnet20"])
def test_converted_checkpoints_without_input_metadata_read_torchvisions_inputs(arch):
    """Checkpoints converted before ``convert`` recorded their inputs: an ImageNet
    stem reads 224 px ImageNet-normalised images, a CIFAR stem 32 px with the
    data's statistics; recorded values (``None`` included) and trained models win."""
    module = models.resnet(arch, num_classes=10)
    imagenet = arch == "resnet18"
    old = Model(module, {}, metadata={"converted_from": "torch"})
    assert old.image_size == (224 if imagenet else 32)
    expected = (IMAGENET_NORMALIZATION["mean"], IMAGENET_NORMALIZATION["std"]) if imagenet else None
    assert old.normalization == expected
    # torchvision evaluates ImageNet models on the central 224 px of 256 px images.
    assert old.crop == (0.875 if imagenet else None)
    recorded = Model(
        module,
        {},
        metadata={
            "converted_from": "torch",
            "image_size": 64,
            "normalization": None,
            "crop": None if imagenet else 0.5,
        },
    )
    assert recorded.image_size == 64 and recorded.normalization is None
    assert recorded.crop == (None if imagenet else 0.5)
    trained = Model(module, {}, metadata={"normalization": {"mean": [0.5], "std": [0.25]}})
    assert trained.image_size == 32 and trained.normalization == ([0.5], [0.25])
    assert trained.crop is None
