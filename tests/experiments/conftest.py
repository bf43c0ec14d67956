"""Tiny source checkpoints in the release's layout, and mock data, for the experiment tests.

The source models are two-stage ResNets of width 4 on 16 px images with random
weights. Their BatchNorm statistics are recomputed on exactly the images the
experiment's merge sees, so that a merge at budget 2 (which recomputes the
merged model's statistics on those images) computes the same function as the
ensemble: the tests can then compare accuracies exactly.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from experiments import common
from pleas_jax import checkpoint, models, recompute_batch_norm
from pleas_jax import workflow as wf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import init, randomize_norms  # noqa: E402

SIZE = 16
MOCK = 24  # examples per split of each mocked tfds source
IMAGES = 40  # merge images
BATCH = 20
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def tiny(num_classes: int) -> models.ResNet:
    """A two-stage basic-block ResNet with an ImageNet stem: cheap to compile."""
    return models.ResNet("basic", (1, 1), 4, (4, 8), ((4,), (8,)), (False, True), num_classes,
                         "imagenet", (1, 2))


def write_pair(root, model_type, dirs, num_classes, specs, folder_spec=None):
    """Save two tiny models into ``root`` at the release paths ``dirs`` (a, b),
    with BN statistics of the merge images the experiment draws from ``specs``."""
    import tensorflow_datasets as tfds

    module = tiny(num_classes)
    wrapped = [
        {"module": module, "vars": randomize_norms(init(module, SIZE, seed), seed)}
        for seed in (0, 1)
    ]
    meta = {"image_size": SIZE, "normalization": NORM}

    model = wf.Model(module, wrapped[0]["vars"], metadata=meta, name="a")
    with tfds.testing.mock_data(num_examples=MOCK):
        sets = [common.load_data(model, s, None, num_classes if s.startswith("tfds:domainnet")
                                 else None) for s in specs]
    batches = common.merge_images(sets, IMAGES, BATCH, 0)
    paths = []
    for w, rel in zip(wrapped, dirs, strict=True):
        v = recompute_batch_norm(w["module"], w["vars"], batches)
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(out, w["module"], v, **meta)
        paths.append(out)
    return paths


@pytest.fixture(scope="session")
def domainnet_tree(tmp_path_factory):
    """A release tree with rn18 DomainNet models: clipart/v1a is itself a
    checkpoint, painting/v1b holds one in ``pleas_jax/`` (converted beside model.pth)."""
    root = tmp_path_factory.mktemp("ckpts")
    write_pair(
        root, "rn18",
        ["rn18/domainnet/clipart/v1a", "rn18/domainnet/painting/v1b/pleas_jax"],
        common.DOMAINNET_CLASSES, ["tfds:domainnet/clipart", "tfds:domainnet/painting"],
    )
    return root
