#!/usr/bin/env bash
# Download the PLeaS paper's checkpoints: a thin wrapper over
# `python -m experiments.download_checkpoints` (see --help there), runnable from any
# directory; a relative DIR is taken relative to where you call it from.
#   experiments/download_checkpoints.sh [DIR] [--model-type rn18] [--dataset cub] [--dry-run]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m experiments.download_checkpoints "$@"
