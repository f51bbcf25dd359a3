"""Process-level CPU settings (mixlab.runtime): flushing subnormal floats to zero."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# In a fresh process with 2 threads: a 1M-element multiply whose every result is subnormal
# (1e-20 * 1e-20 = 1e-40 < 1.2e-38). aten splits it between the main thread and a worker, so
# the worker's half shows whether the mode reached torch's worker threads.
_CHILD = r"""
import json, sys
import mixlab.runtime as rt
if sys.argv[1] == "flush":
    rt.flush_denormals()
import torch
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-20)
y = x * x
half = y.numel() // 2
print(json.dumps({"flushed": rt.denormals_flushed(), "first_nonzero": int((y[:half] != 0).sum()),
                  "second_nonzero": int((y[half:] != 0).sum()), "threads": torch.get_num_threads()}))
"""


def _child(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flush_denormals_reaches_the_worker_threads():
    kept = _child("keep")
    # the control: without the call every product stays subnormal (so the check below can fail)
    assert kept["flushed"] is False and kept["first_nonzero"] == kept["second_nonzero"] == 1 << 19
    flushed = _child("flush")
    if not flushed["flushed"]:
        pytest.skip("torch reports no flush-to-zero mode on this CPU")
    assert flushed["first_nonzero"] == 0 and flushed["second_nonzero"] == 0, flushed


def test_flush_denormals_can_be_turned_off_by_the_environment():
    off = _child("flush", MIXLAB_FLUSH_DENORMALS="0")
    assert off["flushed"] is False and off["first_nonzero"] == 1 << 19 and off["second_nonzero"] == 1 << 19


def test_cli_sets_it_before_the_command_runs(monkeypatch):
    from mixlab import cli, runtime

    calls = []
    monkeypatch.setattr(runtime, "flush_denormals", lambda *a, **k: calls.append("flush") or True)
    monkeypatch.setattr(runtime, "tune_malloc", lambda: calls.append("malloc") or True)
    assert cli.main(["models", "--json"]) == 0
    assert calls == ["malloc", "flush"]
