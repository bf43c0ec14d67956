"""Fine-grained (different label spaces) experiment end to end on mock data and a folder."""

import json
from typing import Any

import numpy as np
import pytest

from experiments import common, different_label_space, report, streams
from tests.experiments.conftest import BATCH, IMAGES, MOCK, SIZE


def test_different_label_space_end_to_end(fine_grained_tree, tmp_path, capsys):
    root, nabirds = fine_grained_tree
    out = tmp_path / "run"
    rc = different_label_space.main(
        [
            "--checkpoints",
            str(root),
            "--model_type",
            "rn18",
            "--datasets",
            "cub,nabird",
            "--data_dir",
            str(nabirds.parent.parent),
            "--merging",
            "perm_activation",
            "--ratios",
            "uniform",
            "--budgets",
            "2.0",
            "--images",
            str(IMAGES),
            "--batch-size",
            str(BATCH),
            "--image-size",
            str(SIZE),
            "--probe-epochs",
            "3",
            "--mock-data",
            str(MOCK),
            "--output_dir",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / common.RESULT_FILE).read_text())
    assert res["status"] == "done" and res["experiment"] == "different_label_space"
    assert res["pair"] == ["cub", "nabird"] and res["eval_sets"] == ["cub", "nabird"]
    # NABirds is found under --data-dir as nabirds/images.
    assert res["specs"] == {"cub": "tfds:caltech_birds2011", "nabird": f"folder:{nabirds}"}
    assert res["settings"]["probe_epochs"] == 3
    rows = {r["budget"]: r for r in res["results"]}
    assert sorted(rows) == [2.0]
    for r in rows.values():
        assert r["method"] == "perm_activation" and r["least_squares"] is None
        assert set(r["accuracies"]) == set(r["probe_accuracies"]) == {"cub", "nabird"}
        assert r["accuracy"] == pytest.approx(np.mean(list(r["accuracies"].values())))
        assert 0.0 <= r["probe_accuracy"] <= 1.0
    assert rows[2.0]["macs"] == pytest.approx(2 * rows[2.0]["macs_source"])
    # At budget 2 the merged backbone keeps both models whole: each source's own head
    # scores what the source scores on its task, and a probe on the merged features
    # what a probe on both models' features scores.
    src, ens = res["sources"], res["sources"]["ensemble"]
    assert rows[2.0]["accuracies"]["cub"] == pytest.approx(src["a"]["accuracy"], rel=1e-6)
    assert rows[2.0]["accuracies"]["nabird"] == pytest.approx(src["b"]["accuracy"], rel=1e-6)
    assert rows[2.0]["accuracy"] == pytest.approx(ens["accuracy"], rel=1e-6)
    assert rows[2.0]["source_agreements"] == {"cub": 1.0, "nabird": 1.0}
    for t in ("cub", "nabird"):
        assert rows[2.0]["probe_accuracies"][t] == pytest.approx(
            ens["probe_accuracies"][t], rel=1e-6
        )

    # The report tabulates both metrics and plots each.
    rep = report.report([out], tmp_path / "report")
    md = rep["markdown"]
    # The tiny test models are no preset's structure (the tree's rn18/ holds them).
    assert res["model_type"] == "custom"
    assert "### different_label_space, custom, cub + nabird: accuracy (%)" in md
    assert "### different_label_space, custom, cub + nabird: probe accuracy (%)" in md
    assert f"| activation matching, uniform ratios | {100 * rows[2.0]['accuracy']:.2f} |" in md
    assert f"ensemble {100 * ens['probe_accuracy']:.2f}" in md
    for metric in ("accuracy", "probe_accuracy"):
        png = tmp_path / "report" / f"{metric}_vs_budget_different_label_space_custom.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_dataset_and_missing_nabirds(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NABIRDS_DIR", raising=False)
    rc = different_label_space.main(
        ["--datasets", "cub,imagenet", "--a", "x", "--b", "y", "--output-dir", str(tmp_path / "o")]
    )
    assert rc == 2 and "--datasets needs two different of cub" in capsys.readouterr().err
    with pytest.raises(common.ExperimentError, match="NABirds is not in tfds.*--spec nabird="):
        common.dataset_spec("nabird", {}, str(tmp_path))


def test_pleas_free_merges_on_other_data_and_probes_on_the_tasks(
    fine_grained_tree, tmp_path, monkeypatch, capsys
):
    root, nabirds = fine_grained_tree
    sampled, streamed = [], set()
    sample, chunks = streams.Images.sample, streams.Images.chunks

    def spy_sample(self, split, n, seed):
        sampled.append((self.spec, split, n))
        return sample(self, split, n, seed)

    def spy_chunks(self, split, chunk=streams.CHUNK):
        streamed.add((self.spec, split))
        return chunks(self, split, chunk)

    monkeypatch.setattr(streams.Images, "sample", spy_sample)
    monkeypatch.setattr(streams.Images, "chunks", spy_chunks)
    out = tmp_path / "free"
    rc = different_label_space.main(
        [
            "--checkpoints",
            str(root),
            "--datasets",
            "cub,nabird",
            "--spec",
            f"nabird=folder:{nabirds}",
            "--matching-data",
            "tfds:imagenet_v2:test",
            "--methods",
            "perm_activation",
            "--ratios",
            "uniform",
            "--budgets",
            "1.0",
            "--images",
            str(IMAGES),
            "--batch-size",
            str(BATCH),
            "--image-size",
            str(SIZE),
            "--probe-epochs",
            "1",
            "--mock-data",
            str(MOCK),
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    # The merge sees only the other data; sources, heads and probes only the tasks'.
    assert sampled == [("tfds:imagenet_v2:test", "train", IMAGES)]
    assert streamed == {
        (s, split)
        for s in ("tfds:caltech_birds2011", f"folder:{nabirds}")
        for split in ("train", "test")
    }
    res = json.loads((out / common.RESULT_FILE).read_text())
    assert res["settings"]["matching_data"] == "tfds:imagenet_v2:test"
    # The mocked source holds fewer training images than asked for: all are used.
    assert res["merge_images"] == min(IMAGES, MOCK)
    assert list(res["matching_seconds"]) == ["activation"]
    (row,) = res["results"]
    assert row["achieved_budget"] == pytest.approx(1.0) and 0 <= row["source_agreement"] <= 1
    assert set(row["probe_accuracies"]) == {"cub", "nabird"}


def test_user_checkpoints_are_recorded_and_reported_as_what_they_are(tmp_path, capsys):
    """ResNet-20s given with --a/--b on digit subsets read in the places of cub
    and oxford_pets: the record and the report say resnet20 and digits, not the
    defaults rn18 and CUB."""
    from pleas_jax import checkpoint, models
    from tests.helpers import init

    meta: dict[str, Any] = {"image_size": 8, "normalization": {"mean": [0.3], "std": [0.4]}}
    paths = []
    for seed, name in enumerate("ab"):
        module = models.resnet("resnet20", 5, width=2)
        paths.append(checkpoint.save(tmp_path / name, module, init(module, 8, seed, 1), **meta))
    out = tmp_path / "run"
    argv = ["--a", str(paths[0]), "--b", str(paths[1]), "--datasets", "cub,oxford_pets"]
    argv += ["--spec", "cub=digits[0-4]", "--spec", "oxford_pets=digits[5-9]"]
    argv += ["--methods", "zipit", "--ratios", "optimized", "--budgets", "1.5"]
    argv += ["--images", "20", "--batch-size", "20", "--probe-epochs", "0"]
    assert different_label_space.main([*argv, "--output-dir", str(out)]) == 0, (
        capsys.readouterr().err
    )
    res = json.loads((out / common.RESULT_FILE).read_text())
    assert res["model_type"] == res["settings"]["model_type"] == "resnet20"
    # ZipIt! merged with its own ratios and no least squares: the record says so.
    s = res["settings"]
    assert (s["ratios"], s["least_squares"], s["gd_steps"]) == (["zip"], None, None)
    assert res["specs"] == {"cub": "digits[0-4]", "oxford_pets": "digits[5-9]"}
    md = report.report([out], tmp_path / "report")["markdown"]
    assert "### different_label_space, resnet20, cub=digits[0-4] + oxford_pets=digits[5-9]:" in md
    assert "rn18" not in md
    assert (tmp_path / "report" / "accuracy_vs_budget_different_label_space_resnet20.png").is_file()
