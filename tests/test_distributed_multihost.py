"""Multi-host start from the standard environment variables.

``tests/test_distributed.py`` covers the argument parsing from an explicit
dict; these tests cover what a launch script relies on beyond that: reading the
process environment, empty variables, every partial combination, the call into
``jax.distributed.initialize`` (stubbed), and a real two-process start on
localhost.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from pleas_jax import distributed
from tests.helpers import ROOT

NAMES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
FULL = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


@pytest.fixture
def clean_env(monkeypatch):
    for n in NAMES:
        monkeypatch.delenv(n, raising=False)
    return monkeypatch


def test_reads_process_environment(clean_env):
    assert distributed.multihost_args() == {}
    for k, v in FULL.items():
        clean_env.setenv(k, v)
    assert distributed.multihost_args() == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }


def test_empty_variables_mean_single_host(clean_env):
    # A launcher that exports the names with empty values starts a single host.
    assert distributed.multihost_args(dict.fromkeys(NAMES, "")) == {}
    for n in NAMES:
        clean_env.setenv(n, "")
    assert distributed.multihost_args() == {}


@pytest.mark.parametrize("present", [c for k in (1, 2) for c in itertools.combinations(NAMES, k)])
def test_partial_setup_names_the_missing(present):
    env = {n: FULL[n] for n in present}
    with pytest.raises(ValueError) as err:
        distributed.multihost_args(env)
    message = str(err.value)
    for n in NAMES:
        assert n in message, (n, message)


@pytest.mark.parametrize(
    "num, pid, match",
    [
        ("2", "-1", "outside"),
        ("0", "0", "outside"),
        ("2", "2", "outside"),
        ("two", "0", "integers"),
        ("2", "1.0", "integers"),
    ],
)
def test_bad_counts(num, pid, match):
    with pytest.raises(ValueError, match=match):
        distributed.multihost_args({**FULL, "JAX_NUM_PROCESSES": num, "JAX_PROCESS_ID": pid})


def test_initialize_passes_the_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize_multihost(FULL) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    calls.clear()
    assert distributed.initialize_multihost({}) is False
    assert calls == []
    with pytest.raises(ValueError):
        distributed.initialize_multihost({"JAX_PROCESS_ID": "0"})
    assert calls == []


_WORKER = """
import json, sys
sys.path.insert(0, {root!r})
from pleas_jax import distributed
started = distributed.initialize_multihost()
import jax
print(json.dumps({{"started": started, "process_index": jax.process_index(),
                  "process_count": jax.process_count(), "devices": jax.device_count(),
                  "local_devices": jax.local_device_count()}}))
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost():
    """Two CPU processes join through the coordinator named in the environment."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        env.pop("XLA_FLAGS", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER.format(root=ROOT)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(o["process_index"] for o in outs) == [0, 1]
    for o in outs:
        assert o["started"] is True and o["process_count"] == 2
        assert o["devices"] == 2 * o["local_devices"]
