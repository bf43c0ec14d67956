"""DomainNet experiment end to end on mock data."""

import json

import numpy as np
import pytest

from experiments import common, shared_label_space
from tests.experiments.conftest import BATCH, IMAGES, MOCK, SIZE


def _run(tree, out, cache, methods, budgets):
    return shared_label_space.main(
        [
            "--checkpoints",
            str(tree),
            "--model-type",
            "rn18",
            "--domains",
            "clipart,painting",
            "--variants",
            "v1a,v1b",
            "--methods",
            methods,
            "--ratios",
            "optimized",
            "--budgets",
            budgets,
            "--images",
            str(IMAGES),
            "--batch-size",
            str(BATCH),
            "--image-size",
            str(SIZE),
            "--mock-data",
            str(MOCK),
            "--output-dir",
            str(out),
            "--matching-cache",
            str(cache),
        ]
    )


def test_shared_label_space_end_to_end(domainnet_tree, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    # Two least-squares merges: the pair's sums are taken once and shared.
    assert _run(domainnet_tree, out, cache, "pleas_activation", "1.5,2.0") == 0, (
        capsys.readouterr().err
    )
    res = json.loads((out / common.RESULT_FILE).read_text())
    assert res["status"] == "done" and res["experiment"] == "shared_label_space"
    assert res["pair"] == ["clipart", "painting"] and res["variants"] == ["v1a", "v1b"]
    assert res["checkpoints"]["b"].endswith("painting/v1b/pleas_jax")
    assert res["eval_sets"] == list(common.DOMAINS)
    assert res["merge_images"] == IMAGES
    assert "--domains clipart,painting" in res["command"]
    low, row = res["results"]
    assert (low["method"], low["ratios"], low["budget"]) == ("pleas_activation", "optimized", 1.5)
    assert low["achieved_budget"] <= 1.5 + 1e-6 and 0.0 <= low["accuracy"] <= 1.0
    assert (row["method"], row["ratios"], row["budget"]) == ("pleas_activation", "optimized", 2.0)
    assert row["least_squares"] == "closed_form" and row["matching"] == "activation"
    assert row["achieved_budget"] == pytest.approx(2.0, abs=1e-6)
    assert set(row["accuracies"]) == set(common.DOMAINS)
    assert row["accuracy"] == pytest.approx(np.mean(list(row["accuracies"].values())))
    # Budget 2 keeps both models whole: PLeaS is the ensemble (same BN statistics).
    ens = res["sources"]["ensemble"]["accuracies"]
    for d in common.DOMAINS:
        assert row["accuracies"][d] == pytest.approx(ens[d], rel=1e-6)
    # Not only the same accuracy: the same prediction on every test image.
    assert row["ensemble_agreement"] == 1.0
    assert set(row["ensemble_agreements"]) == set(common.DOMAINS)
    assert list(res["matching_seconds"]) == ["activation"]
    assert len(list(cache.glob("matching-*.npz"))) == 1

    # Another run of the pair (other budgets, methods without least squares)
    # reads the activation matching from the cache instead of recomputing it.
    out2 = tmp_path / "run2"
    assert _run(domainnet_tree, out2, cache, "zipit", "1.5") == 0
    res2 = json.loads((out2 / common.RESULT_FILE).read_text())
    (r,) = res2["results"]
    assert (r["method"], r["ratios"], r["budget"]) == ("zipit", "zip", 1.5)
    assert res2["matching_seconds"] == {}
    assert r["least_squares"] is None and 0.0 <= r["accuracy"] <= 1.0
    assert 0.0 <= r["ensemble_agreement"] < 1.0  # a real merge at 1.5 changes predictions
    assert r["achieved_budget"] <= 1.5 + 1e-6 and r["macs"] < 1.5 * r["macs_source"] + 1
    # The same sources, read the same way, score the same.
    assert res2["sources"] == res["sources"]


def test_missing_checkpoint_says_how_to_get_it(tmp_path, capsys):
    rc = shared_label_space.main(
        [
            "--checkpoints",
            str(tmp_path),
            "--domains",
            "clipart,real",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "download_checkpoints.sh" in err and "rn18/domainnet/clipart/v1a" in err
    assert not (tmp_path / "o").exists()


def test_explicit_checkpoints_and_bad_options(tmp_path, capsys):
    base = ["--domains", "clipart,real", "--output-dir", str(tmp_path / "o")]
    assert shared_label_space.main([*base, "--a", str(tmp_path / "x"), "--b", "y"]) == 2
    err = capsys.readouterr().err
    assert "x: no such checkpoint directory" in err and "pleas-jax train" in err
    assert shared_label_space.main([*base, "--a", "x"]) == 2
    assert "pass both --a and --b" in capsys.readouterr().err
    assert shared_label_space.main([*base, "--a", "x", "--b", "y", "--budgets", "2.5"]) == 2
    assert "budget 2.5 is outside [1, 2]" in capsys.readouterr().err
    assert shared_label_space.main([*base, "--a", "x", "--b", "y", "--methods", "avg"]) == 2
    assert "unknown method avg" in capsys.readouterr().err
    gd = ["--a", "x", "--b", "y", "--least-squares", "gd", "--max_steps", "0"]
    assert shared_label_space.main([*base, *gd]) == 2
    assert "--max-steps must be positive for --least-squares gd, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_dataset_says_how_to_build_it(domainnet_tree, tmp_path, capsys):
    rc = shared_label_space.main(
        [
            "--checkpoints",
            str(domainnet_tree),
            "--domains",
            "clipart,painting",
            "--image-size",
            str(SIZE),
            "--data-dir",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "tfds build domainnet/clipart" in err
    assert not (tmp_path / "o").exists()
