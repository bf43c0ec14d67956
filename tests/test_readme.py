"""The README's Python example runs as written, on checkpoints that `train` makes."""

import re
from pathlib import Path

from pleas_jax import checkpoint, workflow

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_example() -> str:
    text = README.read_text()
    section = text[text.index("## The Python API") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the Python API section has no python block"
    return found.group(1)


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    for name, labels, seed in (("a", "0-4", 0), ("b", "5-9", 1)):
        workflow.train_checkpoint(
            tmp_path / "ckpt" / name,
            data=f"mnist5k[{labels}]",
            width=4,
            epochs=1,
            seed=seed,
            image_size=8,
        )
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_example(), str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[[0-4 ]+\]", printed[0]), printed
    merged = workflow.load_model(tmp_path / "ckpt" / "merged")
    assert merged.image_size == 8 and sorted(merged.heads or {}) == ["a", "b"]
    assert merged.normalization == workflow.load_model(tmp_path / "ckpt" / "a").normalization
    assert checkpoint.load_metadata(tmp_path / "ckpt" / "merged")["arch"] == "resnet20"
