#!/usr/bin/env bash
# GPU benchmarks of pleas-jax on one H100/H200 host without internet.
#
# Needs Python 3.12 with jax (CUDA), flax, optax, orbax-checkpoint, scipy and numpy
# preinstalled; the project need not be installed (it runs from this checkout) and
# tensorflow-datasets is not used. Run from anywhere:
#
#     bash bench/gpu.sh                 # JSON on stdout, progress on stderr
#     OUT_DIR=/tmp/b bash bench/gpu.sh  # also keep each benchmark's JSON there
#
# Runs bench/run.py (resnet50, 224 px, 3,200 images, budgets 1.0 and 1.5: every stage,
# the whole merge, the bare forward pass, Gram and peak memory), then the GPU
# configurations of bench/matching.py, bench/least_squares.py and bench/gram.py, and
# prints one JSON object {"run": ..., "matching": ..., "least_squares": ..., "gram": ...}.
# Settings (environment):
#   ARCH=resnet50 SIZE=224 IMAGES=3200 BATCH=128 BUDGETS="1.0 1.5"
#   BF16=1    also run bench/run.py with bfloat16 activation statistics ("run_bf16")
#   LS_PRECISION=bf16_3x  least-squares sums from bf16 tensor-core products (~fp32 accuracy,
#             pleas_jax/products.py; default highest: fp32 matmuls)
#   MATCH_PRECISION=bf16_3x  the same for the activation statistics' cross moments (run.py
#             then also times the fp32 statistics and reports the difference, "matching_check")
#   STATISTICS=pair  merge() with pair statistics; run.py then also times pair_statistics
#             and the per-budget pair fit (default per_merge)
#   EXTRA=0   skip bench/matching.py, bench/least_squares.py and bench/gram.py (run.py
#             alone reports every figure the GPU targets name: activation statistics,
#             weight matching, LS statistics + solve, the whole merge, peak memory)
#   UNIT_MULTIPLE=8  run.py rounds separate-unit counts down to multiples of 8 (merged
#             channel blocks that suit tensor cores; may spend a little less than the budget)
#   WARM=1    run.py keeps compiled kernels between stages (much less compiling; the
#             steady-state figures are the same, first-call figures understate compilation)
#   COMPILE_CACHE=DIR  where compiled programs and GPU autotuning results are kept
#             (default: .jax_cache in this checkout, so a rerun on the same machine skips
#             most compilation; "none" turns it off). Steady-state figures are unaffected;
#             first-call figures then leave out what an earlier stage or run compiled.
#   ALLOW_CPU=1  skip the GPU check (a dry run of this script with tiny settings on a CPU)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
ARCH=${ARCH:-resnet50}
SIZE=${SIZE:-224}
IMAGES=${IMAGES:-3200}
BATCH=${BATCH:-128}
BUDGETS=${BUDGETS:-1.0 1.5}
BF16=${BF16:-0}
STATISTICS=${STATISTICS:-per_merge}
LS_PRECISION=${LS_PRECISION:-highest}
MATCH_PRECISION=${MATCH_PRECISION:-highest}
EXTRA=${EXTRA:-1}
RUN_FLAGS=()
if [ -n "${UNIT_MULTIPLE:-}" ]; then RUN_FLAGS+=(--unit-multiple "$UNIT_MULTIPLE"); fi
if [ "${WARM:-0}" = 1 ]; then RUN_FLAGS+=(--warm); fi
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
log() { echo "gpu.sh: $*" >&2; }

COMPILE_CACHE=${COMPILE_CACHE:-$ROOT/.jax_cache}
if [ "$COMPILE_CACHE" != none ]; then
    # As pleas_jax.compile_cache.enable does: every program, however quick to compile.
    export JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE
    export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
    mkdir -p "$COMPILE_CACHE"
fi

# A CPU-only jax or a hidden card would silently benchmark the CPU: refuse.
unset JAX_PLATFORMS
if ! ALLOW_CPU=${ALLOW_CPU:-0} "$PY" - <<'EOF' >&2
import os
import sys
try:
    import jax
except ImportError as e:
    sys.exit(f"gpu.sh: error: cannot import jax ({e})")
try:
    devices = jax.devices("cpu" if os.environ["ALLOW_CPU"] == "1" else "gpu")
except RuntimeError as e:
    sys.exit(f"gpu.sh: error: jax sees no GPU ({e}); check the CUDA jax plugin and "
             "CUDA_VISIBLE_DEVICES")
print(f"gpu.sh: jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}")
EOF
then
    exit 1
fi

missing=$("$PY" - <<'EOF'
import importlib.util
names = ["numpy", "scipy", "flax", "optax", "orbax.checkpoint"]
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu.sh: error: missing Python packages: $missing" >&2
    exit 1
fi

PYPATH=$ROOT
# pleas_jax draws progress bars with tqdm; where it is not installed, a silent
# stand-in (the benchmarks turn progress off anyway) keeps the imports working.
if ! "$PY" -c "import tqdm.auto" 2>/dev/null; then
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/tqdm"
    cat > "$SHIM/tqdm/__init__.py" <<'EOF'
"""Silent stand-in for tqdm, written by bench/gpu.sh where tqdm is not installed."""


class tqdm:
    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass
EOF
    echo "from tqdm import tqdm  # noqa: F401" > "$SHIM/tqdm/auto.py"
    PYPATH=$ROOT:$SHIM
    log "tqdm not installed: using a silent stand-in"
fi

run() {  # run NAME SCRIPT ARGS...: JSON of SCRIPT (its last stdout object) into OUT_DIR/NAME.json
    local name=$1
    shift
    log "$name: $*"
    local t0=$SECONDS
    PYTHONPATH=$PYPATH "$PY" "$@" > "$OUT_DIR/$name.json"
    log "$name: done in $((SECONDS - t0)) s"
}

# shellcheck disable=SC2086  # BUDGETS is a list
run run bench/run.py --arch "$ARCH" --size "$SIZE" --images "$IMAGES" --batch-size "$BATCH" \
    --budgets $BUDGETS --statistics "$STATISTICS" --ls-precision "$LS_PRECISION" \
    --matching-precision "$MATCH_PRECISION" ${RUN_FLAGS[@]+"${RUN_FLAGS[@]}"}
if [ "$BF16" = 1 ]; then
    # shellcheck disable=SC2086
    run run_bf16 bench/run.py --arch "$ARCH" --size "$SIZE" --images "$IMAGES" \
        --batch-size "$BATCH" --budgets $BUDGETS --statistics "$STATISTICS" --dtype bfloat16 \
        --ls-precision "$LS_PRECISION" ${RUN_FLAGS[@]+"${RUN_FLAGS[@]}"}
fi
if [ "$EXTRA" = 1 ]; then
    # The configurations the scripts' docstrings give for a GPU.
    run matching bench/matching.py --arch "$ARCH" --size "$SIZE" --images "$IMAGES" \
        --batch-size 256 --precision "$MATCH_PRECISION"
    # shellcheck disable=SC2086
    run least_squares bench/least_squares.py --arch "$ARCH" --size "$SIZE" \
        --images "$IMAGES" --batch-size "$BATCH" --budgets $BUDGETS
    run gram bench/gram.py --size "$SIZE" --batch-size "$BATCH" --precision highest bf16_3x
fi

"$PY" - "$OUT_DIR" <<'EOF'
import json, os, sys

out_dir = sys.argv[1]
result = {}
for name in ("run", "run_bf16", "matching", "least_squares", "gram"):
    path = os.path.join(out_dir, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            result[name] = json.load(f)
print(json.dumps(result, indent=1))
EOF
log "JSON files in $OUT_DIR"
