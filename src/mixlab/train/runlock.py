"""One writer per run directory: ``run.lock``.

A training takes ``RUN_DIR/run.lock`` (created with ``O_CREAT | O_EXCL``; it holds the pid,
the host, the process start time and a random token) before it reads or writes anything in
the folder, and removes it when it ends, however it ends short of a kill. A second training
into the same folder is refused with the pid and host of the one writing it. A lock left
behind by a killed process (its pid no longer running on this host, or running but started
at another time, i.e. reused) is stale and is taken over, saying so. A lock from another
host cannot be checked and is refused; the message says to delete it if that run is gone.

Under DDP only rank 0, the process that writes files, takes it.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import RunLocked

LOCK = "run.lock"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start_ticks is not None:
        now = _start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the pid was reused by a later process
    return True


def read_lock(run_dir: str | Path) -> dict | None:
    """The lock's holder (pid, host, start_ticks, since, token), {} if unreadable, None if absent."""
    try:
        text = (Path(run_dir) / LOCK).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) and "pid" in info else {}
    except ValueError:
        return {}


def _holder_alive(info: dict, path: Path) -> bool:
    if not info:  # being written this instant, or cut short by a kill: stale once it is a few seconds old
        try:
            return time.time() - path.stat().st_mtime < 10
        except FileNotFoundError:
            return False
    if info.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    return _alive(int(info["pid"]), info.get("start_ticks"))


def _refusal(run_dir: Path, info: dict) -> RunLocked:
    who = (f"pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')}" if info
           else "a process that is creating the lock now")
    other_host = info and info.get("host") != socket.gethostname()
    return RunLocked(f"{run_dir} is being written by another training ({who}); wait for it to finish or choose "
                     f"another --out (nothing was changed)"
                     + (f". If that training is no longer running, delete {run_dir / LOCK}" if other_host else ""))


def refuse_if_locked(run_dir: str | Path) -> None:
    """Raise :class:`RunLocked` when a live training holds ``run_dir`` (reads only)."""
    run_dir = Path(run_dir)
    info = read_lock(run_dir)
    if info is not None and _holder_alive(info, run_dir / LOCK):
        raise _refusal(run_dir, info)


def acquire(run_dir: str | Path, say: Callable[[str], None] = print) -> dict:
    """Take ``run_dir/run.lock`` (creating the folder); returns what :func:`release` needs."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = dict(pid=os.getpid(), host=socket.gethostname(), start_ticks=_start_ticks(os.getpid()),
              since=time.strftime("%Y-%m-%d %H:%M:%S"), token=secrets.token_hex(8))
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(run_dir)
            if info is None:
                continue  # released meanwhile: try again
            if _holder_alive(info, path):
                raise _refusal(run_dir, info) from None
            _take_over(run_dir, path, info, say)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        return dict(path=path, token=me["token"], created=created)
    raise RunLocked(f"could not take {path}: other processes keep taking it; is another training starting "
                    "into the same folder?")


def _take_over(run_dir: Path, path: Path, info: dict, say) -> None:
    """Remove a stale lock, unless another process replaced it in the meantime."""
    aside = run_dir / f".{LOCK}.stale-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)  # atomic: of two processes taking over, one moves the stale lock
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text())
    except ValueError:
        moved = {}
    if moved != info and moved and _holder_alive(moved, aside):
        try:  # we moved a fresh lock another process had just taken: put it back
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink()
        raise _refusal(run_dir, moved)
    aside.unlink()
    if info:
        say(f"{run_dir}: taking over the lock of pid {info['pid']}, which is no longer running "
            "(it stopped without releasing it)")
    else:
        say(f"{run_dir}: taking over an unreadable lock left by a stopped process")


def release(lock: dict) -> None:
    """Remove the lock if it is still ours; remove the folder if we created it and it is empty."""
    path: Path = lock["path"]
    try:
        if json.loads(path.read_text()).get("token") == lock["token"]:
            path.unlink()
    except (OSError, ValueError):
        pass
    if lock["created"]:
        try:
            path.parent.rmdir()  # only when empty: a run that failed before writing anything
        except OSError:
            pass


def writer_rank() -> int:
    """This process's rank as torchrun sets it (0 without DDP)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextmanager
def holding(run_dir: str | Path, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's lock for the block (rank 0 only; other ranks write nothing)."""
    if writer_rank() != 0:
        yield
        return
    lock = acquire(run_dir, say)
    try:
        yield
    finally:
        release(lock)
