"""A frozen rank does not hang the others: the process group times out and names it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixlab.errors import UsageError
from mixlab.train.distributed import DEFAULT_TIMEOUT_S, timeout_seconds

SRC = str(Path(__file__).resolve().parents[2] / "src")

# rank 1 freezes (sleeps far beyond the timeout) before the second all-reduce; rank 0 waits there
WORKER = textwrap.dedent("""
    import sys, time, torch
    from mixlab.errors import DistributedTimeout
    from mixlab.train.distributed import Distributed

    d = Distributed.from_env()
    d.all_reduce_(torch.ones(2))
    if d.rank == 1:
        time.sleep(60)
    try:
        d.all_reduce_(torch.ones(2))
    except DistributedTimeout as e:
        print("TIMEOUT", e, flush=True)
        sys.exit(3)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_frozen_rank_is_named_after_the_timeout(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               MIXLAB_DDP_TIMEOUT="2", OMP_NUM_THREADS="1", PYTHONPATH=SRC, MIXLAB_DEVICE="cpu")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)  # the timeout, 2 s, and the monitored barrier, 2 s
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, err[-2000:]
    assert "rank 0 waited 2 s for the other ranks in an all-reduce" in out
    assert "rank 1 did not answer" in out and "MIXLAB_DDP_TIMEOUT" in out


def test_the_timeout_setting(monkeypatch):
    monkeypatch.delenv("MIXLAB_DDP_TIMEOUT", raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("MIXLAB_DDP_TIMEOUT", "90")
    assert timeout_seconds() == 90.0
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("MIXLAB_DDP_TIMEOUT", bad)
        with pytest.raises(UsageError, match=f"MIXLAB_DDP_TIMEOUT must be a number of seconds > 0, got '{bad}'"):
            timeout_seconds()
