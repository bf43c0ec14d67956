"""What the paper's experiments share: the release's layout, methods, budgets, data and caches.

The experiment scripts, the launcher and the report import these names from here;
each lives in the module of its concept (imports go downward, from the first to
the last; none imports this module):

- :mod:`experiments.release`: the release's models, datasets and grids, the merge
  methods (:data:`METHODS`) and the settings their runs use, and :class:`ExperimentError`;
- :mod:`experiments.options`: the options both scripts take, and their checks;
- :mod:`experiments.sources`: finding source checkpoints in the release's tree
  (converting ``model.pth`` on the fly) and loading them;
- :mod:`experiments.datasets`: the paper's datasets as data specs, and mocked tfds;
- :mod:`experiments.runs`: a run's result file and its command-line entry point;
- :mod:`experiments.merging`: merging a pair with every method and budget of a
  run, with its matchings cached.

Errors a user can fix raise :class:`ExperimentError` with one line that says what is
missing and how to get it.
"""

from __future__ import annotations

from experiments.datasets import MOCK_IMAGE_SIZE, dataset_spec, is_papers_source, maybe_mock_data
from experiments.merging import MatchingCache, checkpoint_key, merge_grid
from experiments.options import (
    add_common_arguments,
    check_common,
    csv_list,
    float_list,
    spec_override,
)
from experiments.release import (
    BUDGETS,
    DOMAINNET,
    DOMAINNET_CLASSES,
    DOMAINNET_PAIRS,
    DOMAINS,
    ENV_CHECKPOINTS,
    ENV_NABIRDS,
    FINE_GRAINED,
    FINE_GRAINED_PAIRS,
    IMAGENET_NORMALIZATION,
    LEAST_SQUARES,
    METHODS,
    MODEL_TYPES,
    ORDERS,
    RATIOS,
    RELEASE_CROP,
    RELEASE_IMAGE_SIZE,
    RESULT_FILE,
    VARIANTS,
    ExperimentError,
    Method,
    merge_settings,
    method_runs,
)
from experiments.runs import (
    Timer,
    command_line,
    experiment_main,
    finish_run,
    read_result,
    run_main,
    settings,
    write_result,
)
from experiments.sources import (
    checkpoints_root,
    features_model,
    load_source,
    model_type,
    release_dir,
    resolve_checkpoint,
    source_paths,
)

__all__ = [
    # release
    "BUDGETS",
    "DOMAINNET",
    "DOMAINNET_CLASSES",
    "DOMAINNET_PAIRS",
    "DOMAINS",
    "ENV_CHECKPOINTS",
    "ENV_NABIRDS",
    "FINE_GRAINED",
    "FINE_GRAINED_PAIRS",
    "IMAGENET_NORMALIZATION",
    "LEAST_SQUARES",
    "METHODS",
    "MODEL_TYPES",
    "ORDERS",
    "RATIOS",
    "RELEASE_CROP",
    "RELEASE_IMAGE_SIZE",
    "RESULT_FILE",
    "VARIANTS",
    "ExperimentError",
    "Method",
    "merge_settings",
    "method_runs",
    # options
    "add_common_arguments",
    "check_common",
    "csv_list",
    "float_list",
    "spec_override",
    # sources
    "checkpoints_root",
    "features_model",
    "load_source",
    "model_type",
    "release_dir",
    "resolve_checkpoint",
    "source_paths",
    # datasets
    "MOCK_IMAGE_SIZE",
    "dataset_spec",
    "is_papers_source",
    "maybe_mock_data",
    # runs
    "Timer",
    "command_line",
    "experiment_main",
    "finish_run",
    "read_result",
    "run_main",
    "settings",
    "write_result",
    # merging
    "MatchingCache",
    "checkpoint_key",
    "merge_grid",
]
