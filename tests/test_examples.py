"""The scripts in examples/ run as a user would run them and print what they promise."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Measured on CPU (deterministic) with the example's defaults (budget 1.5, 400 merge
# images): A 0.9710, B 0.9740, partial merge without least squares 0.8970, PLeaS 0.9580.
# The 1000 test images make one image 0.1 points; the bound leaves two points for
# numerical changes in least squares, not for a broken pipeline.
MERGED_AT_LEAST = 0.93
SOURCE_AT_LEAST = 0.95


def _accuracies(stdout: str) -> dict[str, float]:
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"(.+?)(?: \(.*\))?: test accuracy (\d\.\d+)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def test_basic_usage_prints_source_and_merged_accuracies():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "basic_usage.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = _accuracies(proc.stdout)
    assert set(acc) == {"model A", "model B", "partial merge, no least squares", "merged model"}
    assert acc["model A"] >= SOURCE_AT_LEAST and acc["model B"] >= SOURCE_AT_LEAST
    assert acc["merged model"] >= MERGED_AT_LEAST
    # Least squares is the point of PLeaS: it must improve on the plain partial merge.
    assert acc["merged model"] > acc["partial merge, no least squares"]
    achieved = re.search(r"achieved (\d\.\d+)", proc.stdout)
    assert achieved and abs(float(achieved.group(1)) - 1.5) <= 0.01
