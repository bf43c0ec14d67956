#!/usr/bin/env bash
# The paper's DomainNet grid (shared label space): pairs of clipart, painting, infograph, real.
#
# Takes the PyTorch release's options (--data_dir, --model_type rn18|rn50|rn101,
# --merging pleas_activation|pleas_weight|weight_matching|perm_activation, --max_steps,
# --seed, --output_dir, --use_zip_ratios) and ours (--least-squares closed_form|gd,
# --ratios uniform|zip|optimized, --dry-run, --wandb, ...); --help lists them all.
# All the logic lives in experiments/launch.py; this only finds Python and the checkout.
#
# Example:
#   experiments/launch_shared_label_space.sh --model_type rn18 --merging pleas_activation \
#       --output_dir runs --dry-run
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m experiments.launch --launcher "$(basename "$0")" shared_label_space "$@"
