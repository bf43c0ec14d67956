"""What the paper's experiments are: the release's models, datasets, grids and merge methods.

The tables every other experiment module reads, and the one error type they all
raise. Nothing here imports JAX, so the launcher and the report can read the
tables cheaply; the modules that run merges reach ``pleas_jax`` through
:func:`_pleas` only when they need it.

A *method* is a merge recipe (:data:`METHODS`): a matching, whether least squares
runs, and a ratio allocation. Its names are the original launchers' ``--merging``
values plus ``zipit``. :func:`method_runs` says which recipes a run merges with,
and :func:`merge_settings` which of its options those merges really read.

Errors a user can fix raise :class:`ExperimentError` with one line that says what is
missing and how to get it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

MODEL_TYPES = {"rn18": "resnet18", "rn50": "resnet50", "rn101": "resnet101"}
VARIANTS = ("v1a", "v1b", "v2a", "v2b")
# The paper's budgets (compute relative to one model) per architecture.
BUDGETS = {
    "rn18": (1.0, 1.24, 1.46, 1.71, 2.0),
    "rn50": (1.0, 1.2, 1.55, 1.8, 2.0),
    "rn101": (1.0, 1.1, 1.7, 1.8, 2.0),
}
DOMAINNET = "domainnet"
DOMAINS = ("clipart", "infograph", "painting", "real")
DOMAINNET_CLASSES = 345
# Fine-grained datasets: the release's directory name -> tfds name (NABirds is not in
# tfds; it is read as an image folder, see :func:`dataset_spec`).
FINE_GRAINED = {
    "cub": "caltech_birds2011",
    "oxford_pets": "oxford_iiit_pet",
    "stanford_dogs": "stanford_dogs",
    "nabird": None,
}
# The release's grids: unordered pairs; each is run in both model orders.
FINE_GRAINED_PAIRS = (
    ("cub", "oxford_pets"),
    ("cub", "stanford_dogs"),
    ("oxford_pets", "nabird"),
    ("nabird", "stanford_dogs"),
    ("cub", "nabird"),
    ("stanford_dogs", "oxford_pets"),
)
DOMAINNET_PAIRS = (
    ("clipart", "painting"),
    ("clipart", "infograph"),
    ("clipart", "real"),
    ("painting", "infograph"),
    ("painting", "real"),
    ("infograph", "real"),
)
ORDERS = (("v1a", "v1b"), ("v1b", "v1a"))
# The release's torchvision models were trained on 224 px inputs normalised
# with ImageNet's statistics and evaluated on the central 224 px of images
# resized to 256 px (what `pleas-jax convert` records for an ImageNet stem, and
# assumes for checkpoints converted before it did).
# Spelled out, not imported: this module imports no JAX (pleas_jax does); a
# test holds them equal to pleas_jax.data's.
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RELEASE_IMAGE_SIZE = 224
RELEASE_CROP = 0.875
RESULT_FILE = "result.json"
ENV_CHECKPOINTS = "MODEL_CHECKPOINTS_DIR"
ENV_NABIRDS = "NABIRDS_DIR"


class ExperimentError(ValueError):
    """An experiment that cannot run as asked; the message says what to do."""


def _pleas():
    # pleas_jax (JAX, orbax) is imported when a run needs it, not by the launcher
    # and the report, which only read this module's tables.
    from pleas_jax import checkpoint, workflow
    from pleas_jax import data as data_lib

    return checkpoint, data_lib, workflow


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge recipe.

    Attributes:
      matching: ``"activation"`` or ``"weight"``.
      least_squares: whether the LeaS step runs (its mode is a run setting).
      ratios: a fixed ratio allocation (ZipIt!'s is stage-wise), else ``None``:
        the run's ``--ratios``.
      label: for tables.
    """

    matching: str
    least_squares: bool
    ratios: str | None
    label: str


METHODS = {
    "pleas_activation": Method("activation", True, None, "PLeaS (activation matching)"),
    "pleas_weight": Method("weight", True, None, "PLeaS (weight matching)"),
    "weight_matching": Method("weight", False, None, "weight matching"),
    "perm_activation": Method("activation", False, None, "activation matching"),
    "zipit": Method("activation", False, "zip", "ZipIt!-style partial merging"),
}
RATIOS = ("uniform", "zip", "optimized")
LEAST_SQUARES = ("closed_form", "gd")


def method_runs(methods: Sequence[str], ratios: Sequence[str]) -> list[tuple[str, str]]:
    """``(method, ratios)`` pairs to run: each method with each allocation, once
    for a method with its own allocation. A pair whose recipe (matching, least
    squares, ratios) is that of a named method with its own allocation is left to
    that method (``perm_activation`` with ``zip`` ratios is ``zipit``)."""
    recipe = lambda m, r: (METHODS[m].matching, METHODS[m].least_squares, r)  # noqa: E731
    named = {recipe(m, METHODS[m].ratios) for m in methods if METHODS[m].ratios}
    out = []
    for m in methods:
        own = METHODS[m].ratios
        for r in [own] if own else ratios:
            if (m, r) not in out and (own or recipe(m, r) not in named):
                out.append((m, r))
    return out


def merge_settings(
    methods: Sequence[str], ratios: Sequence[str], least_squares: str, gd_steps: int
) -> dict[str, Any]:
    """The merge settings a run of ``methods`` really uses, given the options.

    A method with its own allocation ignores ``ratios`` (ZipIt!'s is ``zip``),
    and least squares (with its steps) only matters where a method fits it.
    The launcher spells its commands and run directories with these, and a
    run records them, so neither names an option the merges never read.

    Returns:
      ``{"ratios": [allocations merged with, in order], "least_squares": mode or
      None, "gd_steps": steps or None (closed form)}``.
    """
    runs = method_runs(methods, ratios)
    fits = any(METHODS[m].least_squares for m, _ in runs)
    mode = least_squares if fits else None
    return {
        "ratios": list(dict.fromkeys(r for _, r in runs)),
        "least_squares": mode,
        "gd_steps": gd_steps if mode == "gd" else None,
    }
