"""Fixtures of the converter tests: a randomised torchvision ResNet-18 and ResNet-20 weights."""

import pytest

from tests.converters.helpers import resnet20_torch, torchvision_model


@pytest.fixture(scope="module")
def resnet18():
    return torchvision_model("resnet18")


@pytest.fixture(scope="module")
def r20():
    return resnet20_torch(seed=7).state_dict()
