"""The on-disk compilation cache: a second process loads what the first compiled.

The cache is process-wide JAX state, so every case runs in a fresh interpreter."""

import subprocess
import sys
import textwrap

from tests.helpers import ROOT, run_on_cpu_devices

_FORWARD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, {root!r})
    from pleas_jax import compile_cache, models
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    path = compile_cache.enable(sys.argv[1])
    m = models.resnet20(num_classes=4, width=4)
    v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    y = jax.jit(m.apply)(v, jnp.ones((2, 8, 8, 3)))
    hits = events.count("/jax/compilation_cache/cache_hits")
    misses = events.count("/jax/compilation_cache/cache_misses")
    print(json.dumps({{"path": str(path), "hits": hits, "misses": misses,
                       "files": len(list(path.iterdir())), "y": float(y.sum())}}))
    """
)


def _run(script, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_a_second_process_loads_the_programs(tmp_path):
    import json

    cache = tmp_path / "made" / "here"  # created with its parents
    script = _FORWARD.format(root=str(ROOT))
    runs = []
    for _ in range(2):
        res = _run(script, cache)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["path"] == str(cache.absolute())
    # Small programs are kept too (JAX's default skips those under a second).
    assert first["misses"] >= 1 and first["hits"] == 0 and first["files"] >= 1
    assert second["hits"] >= first["misses"] and second["misses"] == 0
    assert second["y"] == first["y"]


def test_cli_flag_and_bad_directory(tmp_path):
    cli = "import sys; from pleas_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    cache = tmp_path / "cache"
    res = _run(
        cli, "--compile-cache", cache, "eval", tmp_path / "nope", "--data", "digits", cwd=ROOT
    )
    # The command's own error, after the cache was set up.
    assert res.returncode == 2 and "no such checkpoint directory" in res.stderr, res.stderr
    assert cache.is_dir()
    afile = tmp_path / "file"
    afile.write_text("")
    res = _run(
        cli, "--compile-cache", afile, "eval", tmp_path / "nope", "--data", "digits", cwd=ROOT
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "exists and is not a directory" in res.stderr


def test_enable_returns_the_expanded_path():
    out = run_on_cpu_devices(
        textwrap.dedent(
            """
        import json, os, sys, tempfile
        sys.path.insert(0, {root!r})
        import jax
        from pleas_jax import compile_cache
        home = tempfile.mkdtemp()
        os.environ["HOME"] = home
        path = compile_cache.enable("~/c")
        print(json.dumps({{"ok": str(path) == os.path.join(home, "c"),
                           "config": jax.config.jax_compilation_cache_dir == str(path)}}))
        """
        ),
        n=1,
    )
    assert out == {"ok": True, "config": True}


_MOVE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from pleas_jax import compile_cache
    first, second = map(Path, sys.argv[1:3])
    compile_cache.enable(first)
    jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
    compile_cache.enable(second)
    jax.jit(lambda x: x + 5)(jnp.ones(4)).block_until_ready()
    print(json.dumps({{"first": len(list(first.iterdir())), "second": len(list(second.iterdir()))}}))
    """
)


def test_a_second_enable_moves_the_cache(tmp_path):
    """JAX reads the directory once; enable must not report a move it did not make."""
    import json

    res = _run(_MOVE.format(root=str(ROOT)), tmp_path / "one", tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["first"] >= 1 and counts["second"] >= 1, counts


def test_an_unwritable_directory_is_refused(tmp_path, monkeypatch):
    import tempfile

    import pytest

    from pleas_jax import compile_cache

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Running as root, a read-only directory would still be writable: refuse the write.
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ValueError, match="cannot create or write it \\(Permission denied\\)"):
        compile_cache.enable(tmp_path / "c")
