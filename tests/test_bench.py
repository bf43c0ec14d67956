"""Smoke test of the benchmark harness: a tiny configuration of ``bench/run.py``.

It runs as a subprocess, as a user runs it, and must print one JSON object whose
figures are all present and sane. ``--warm`` keeps caches between stages so the
test compiles each kernel once (the first-call figures then understate
compilation, which this test does not judge).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.helpers import ROOT

ARGS = [
    "--arch",
    "resnet20",
    "--width",
    "4",
    "--size",
    "8",
    "--images",
    "32",
    "--batch-size",
    "16",
    "--budgets",
    "1.0",
    "2.0",
    "--max-iter",
    "3",
    "--warm",
    "--ls-precision",
    "bf16_3x",
    "--matching-precision",
    "bf16_3x",
]


def _timing(entry, where):
    for key in ("first_call_s", "steady_s"):
        assert entry[key] > 0, f"{where}: {key} = {entry[key]}"
    if "over_forward" in entry:
        assert math.isfinite(entry["over_forward"]) and entry["over_forward"] > 0, where


def test_run_tiny(tmp_path):
    out_file = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), *ARGS, "--out", str(out_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout)
    assert json.loads(out_file.read_text()) == printed
    d = printed

    for key in ("device_kind", "backend", "jax_version", "config", "memory"):
        assert d[key], key
    assert d["n_devices"] == 1 and d["config"]["arch"] == "resnet20"
    assert d["config"]["ls_precision"] == "bf16_3x"
    # bf16_3x cross moments, checked against fp32's: ~2e-6 apart (tests/matching).
    check = d["matching_check"]
    assert check["max_relative_score_difference"] <= 1e-4, check
    assert check["permutation_agreement"] > 0.9, check
    _timing(d["stages"]["activation_statistics_fp32"], "activation_statistics_fp32")
    assert d["memory"]["max_rss_bytes"] > 0
    _timing(d["forward"], "forward")
    assert d["forward"]["device_resident_s"] > 0
    for name in (
        "spec",
        "layer_table",
        "weight_matching",
        "weight_matching_one_thread",
        "activation_statistics",
        "assignment",
    ):
        _timing(d["stages"][name], name)
    assert d["stages"]["spec"]["groups"] > 0
    wm = d["stages"]["weight_matching"]
    # The first sweep solves every group once.
    assert wm["assignments"] >= d["stages"]["spec"]["groups"], wm
    assert 0 < wm["assignment_s"] < wm["steady_s"], wm

    rows = {r["budget"]: r for r in d["budgets"]}
    assert sorted(rows) == [1.0, 2.0]
    for b, r in rows.items():
        for name in ("partial_merge", "least_squares", "batch_norm", "merge"):
            _timing(r[name], f"budget {b} {name}")
        assert math.isfinite(r["merge"]["first_call_over_forward"])
        assert r["least_squares"]["reported_steady"], "least squares reported no seconds"
        assert r["gram_bytes"] >= r["largest_gram_bytes"] > 0
        assert abs(r["achieved_budget"] - r["achieved_budget_stages"]) < 1e-9
        assert r["macs"] > 0 and r["memory"]["max_rss_bytes"] > 0
        if r.get("statistics_memory") is not None:
            # The analytic Gram memory agrees with the library's own accounting.
            assert r["statistics_memory"]["gram_bytes"] == r["gram_bytes"]
    assert abs(rows[1.0]["achieved_budget"] - 1.0) < 1e-6
    assert abs(rows[2.0]["achieved_budget"] - 2.0) < 1e-6
    assert rows[2.0]["macs"] == 2 * rows[1.0]["macs_source"]
    # Every merged layer reads twice the inputs at budget 2: ~4x the Gram memory.
    assert rows[2.0]["gram_bytes"] > 3 * rows[1.0]["gram_bytes"]


def test_gram_tiny():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gram.py"),
            "--size",
            "32",
            "--batch-size",
            "2",
            "--repeat",
            "1",
            "--precision",
            "highest",
            "bf16_3x",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout)
    assert [r["map"] for r in d["layers"]] == [8, 4, 2, 1]
    for r in d["layers"]:
        assert set(r["seconds"]) == {
            f"{g}/{p}" for g in ("patches", "shifts", "auto") for p in ("highest", "bf16_3x")
        }
        assert all(t > 0 for t in r["seconds"].values())
        # Every way of forming the Gram agrees with the fp32 patch Gram.
        assert r["gram_error"]["shifts/highest"] <= 1e-5, r
        assert r["gram_error"]["auto/bf16_3x"] <= 1e-4, r


def _timing_module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import timing
    finally:
        sys.path.pop(0)
    return timing


def test_best_of_separates_first_call_from_steady_state():
    import time

    import pytest

    timing = _timing_module()
    sleeps = iter([0.3, 0.02, 0.1, 0.08])

    def fn():
        s = next(sleeps)
        time.sleep(s)
        return s

    out, first, best = timing.best_of(fn, repeat=3)
    assert out == 0.08  # the last call's result
    assert 0.3 <= first < 0.6
    assert 0.02 <= best < 0.06  # the fastest later call, not the first
    _, first, best = timing.best_of(lambda: time.sleep(0.01), repeat=0)
    assert best == first >= 0.01
    with pytest.raises(ValueError, match="repeat"):
        timing.best_of(lambda: None, repeat=-1)


def test_memory_reports_resident_set():
    timing = _timing_module()
    m = timing.memory()
    # This process holds at least the interpreter and numpy: far above 10 MB.
    assert m["max_rss_bytes"] > 10 * 2**20
    assert m["peak_device_bytes"] is None or m["peak_device_bytes"] >= 0
