"""The user's cache: where it is, and arrays stored under a content key."""

import logging

import numpy as np

from pleas_jax import user_cache


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PLEAS_JAX_CACHE", str(tmp_path / "c"))
    assert user_cache.root() == tmp_path / "c"
    monkeypatch.delenv("PLEAS_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache.root() == tmp_path / "x" / "pleas-jax"


def test_store_then_load_by_key(tmp_path):
    a = np.arange(7, dtype=np.int32)
    parts = {"dir": "/d", "files": [["f", 3, 10]]}
    assert user_cache.load("k", parts, tmp_path) is None
    p = user_cache.store("k", parts, a, tmp_path)
    assert p is not None and p.parent == tmp_path / "k"
    got = user_cache.load("k", parts, tmp_path)
    assert got is not None and got.dtype == np.int32
    np.testing.assert_array_equal(got, a)
    # Any change of what the array was derived from misses.
    assert user_cache.load("k", {"dir": "/d", "files": [["f", 3, 11]]}, tmp_path) is None
    assert user_cache.load("other", parts, tmp_path) is None
    # Nothing but the array is left behind (no temp files).
    assert [q.name for q in (tmp_path / "k").iterdir()] == [p.name]


def test_file_stamps_change_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"12")
    before = user_cache.file_stamps([f])
    f.write_bytes(b"123")
    assert user_cache.file_stamps([f]) != before
    assert before[0][:2] == ["a", 2]


def test_unwritable_or_corrupt_cache_warns_and_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, "pleas_jax.user_cache"):
        assert user_cache.store("k", 1, np.zeros(2), blocker) is None
    assert "cannot write cache file" in caplog.text
    p = user_cache.path("k", 1, tmp_path)
    p.parent.mkdir()
    p.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, "pleas_jax.user_cache"):
        assert user_cache.load("k", 1, tmp_path) is None
    assert "ignoring unreadable cache file" in caplog.text
