"""report.py on synthetic result files: what each table cell and reference averages."""

import json

from experiments import common, report


def _result(variants, budgets, acc, ensemble, images=1000, ls="closed_form", gd_steps=400):
    return {
        "status": "done",
        "experiment": "different_label_space",
        "model_type": "rn18",
        "pair": ["cub", "oxford_pets"],
        "variants": list(variants),
        "settings": {"images": images, "seed": 0, "gd_steps": gd_steps, "matching_data": None},
        "sources": {
            "a": {"accuracy": ensemble - 0.1},
            "b": {"accuracy": ensemble - 0.2},
            "ensemble": {"accuracy": ensemble},
        },
        "results": [
            {
                "method": "pleas_activation",
                "ratios": "optimized",
                "least_squares": ls,
                "budget": b,
                "achieved_budget": b,
                "accuracy": acc,
            }
            for b in budgets
        ],
    }


def _write(root, name, result):
    d = root / name
    d.mkdir(parents=True)
    (d / common.RESULT_FILE).write_text(json.dumps(result))
    return d / common.RESULT_FILE


def test_references_weigh_each_model_order_once(tmp_path):
    # One run per budget, as the launcher writes them: order v1a-v1b finished 5,
    # v1b-v1a one. Every run re-scores the sources.
    for i, b in enumerate((1.0, 1.24, 1.46, 1.71, 2.0)):
        _write(tmp_path, f"ab{i}", _result(("v1a", "v1b"), [b], 0.5, 0.8))
    _write(tmp_path, "ba0", _result(("v1b", "v1a"), [1.0], 0.3, 0.6))
    text = report.report([tmp_path], tmp_path / "out")["markdown"]
    assert "ensemble 70.00" in text  # (80 + 60) / 2, not (5 x 80 + 60) / 6
    # Budget 1.0 holds both orders, the others one: the counts say so.
    assert "| 40.00 (2) | 50.00 (1) |" in text


def test_runs_of_other_settings_are_tabulated_apart(tmp_path):
    for order in (("v1a", "v1b"), ("v1b", "v1a")):
        _write(tmp_path, f"big-{order[0]}", _result(order, [1.0, 2.0], 0.5, 0.8, images=1000))
        _write(tmp_path, f"small-{order[0]}", _result(order, [1.0, 2.0], 0.1, 0.8, images=100))
    text = report.report([tmp_path], tmp_path / "out")["markdown"]
    assert "[images=1000]" in text and "[images=100]" in text
    assert "| 50.00 | 50.00 |" in text and "| 10.00 | 10.00 |" in text
    assert "30.00" not in text  # never a blend of the two
    assert "(2)" not in text  # every cell of each table holds both orders


def test_gradient_runs_are_labelled_with_their_steps(tmp_path):
    _write(tmp_path, "gd", _result(("v1a", "v1b"), [1.0], 0.5, 0.8, ls="gd", gd_steps=50))
    text = report.report([tmp_path], tmp_path / "out")["markdown"]
    assert "GD (50 steps)" in text


def test_a_result_file_as_the_only_path_reports_beside_it(tmp_path, capsys):
    f = _write(tmp_path, "run", _result(("v1a", "v1b"), [1.0], 0.5, 0.8))
    assert report.main([str(f)]) == 0
    assert (f.parent / "report" / "report.md").is_file()


def test_datasets_a_spec_replaced_are_named_by_what_was_read(tmp_path):
    replaced = _result(("v1a", "v1b"), [1.0], 0.5, 0.8)
    replaced["settings"]["specs"] = {"cub": "mnist5k[0-4]", "oxford_pets": "tfds:oxford_iiit_pet"}
    _write(tmp_path, "mnist", replaced)
    # NABirds is given as an image folder wherever it lies: still NABirds.
    nabirds = _result(("v1a", "v1b"), [1.0], 0.5, 0.8)
    nabirds["pair"] = ["cub", "nabird"]
    nabirds["settings"]["specs"] = {"nabird": "folder:/data/nabirds/images"}
    _write(tmp_path, "nabirds", nabirds)
    # A shared-label-space run tested on a replaced domain beyond its pair.
    shared = _result(("v1a", "v1b"), [1.0], 0.5, 0.8)
    shared.update(
        experiment="shared_label_space",
        pair=["clipart", "painting"],
        eval_sets=list(common.DOMAINS),
    )
    shared["settings"]["specs"] = {"real": "digits"}
    _write(tmp_path, "shared", shared)
    rep = report.report([tmp_path], tmp_path / "out")
    text = rep["markdown"]
    assert "### different_label_space, rn18, cub=mnist5k[0-4] + oxford_pets: accuracy" in text
    assert "### different_label_space, rn18, cub + nabird: accuracy" in text
    assert "### shared_label_space, rn18, clipart + painting (test: real=digits): accuracy" in text
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert ",cub-oxford_pets,cub=mnist5k[0-4] + oxford_pets," in csv_text
