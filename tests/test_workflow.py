"""Workflow helpers that the command tests do not reach directly."""

import json
import os
import stat

import numpy as np
import pytest

from pleas_jax.workflow import write_json


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_json_is_atomic_and_gets_a_plain_files_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": [np.int64(2)]})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    # Nothing but the two files: the temp file was renamed, not copied.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.json"]
