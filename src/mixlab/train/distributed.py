"""torch.distributed through torchrun: DDP when WORLD_SIZE > 1, a no-op otherwise.

`torchrun --nproc_per_node=N -m mixlab train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
NCCL is used on CUDA, gloo on the CPU. Rank 0 writes every file; each rank trains and
evaluates its own shard and the metrics are summed with all_reduce.

A rank that freezes (or dies without its process ending) would leave the others waiting in
their next collective. The process group gets a timeout (``MIXLAB_DDP_TIMEOUT`` seconds,
default 600: far longer than any step, evaluation or checkpoint write between two
collectives of mixlab's loops), after which the waiting ranks stop with
:class:`~mixlab.errors.DistributedTimeout`. To name the stuck rank, the ranks that timed out
meet once more in a gloo ``monitored_barrier`` (a second, gloo-only group made at start):
rank 0 learns from it which ranks did not come ("Ranks 1 failed to pass monitoredBarrier")
and says so; where torch cannot tell (the other ranks, or a failure of the barrier itself),
the message says a rank stopped answering without naming it.
"""
from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import DistributedTimeout, UsageError

DEFAULT_TIMEOUT_S = 600.0
# how long the ranks that timed out wait for each other to name the stuck one
_MONITOR_TIMEOUT_S = 10.0


def timeout_seconds() -> float:
    """The process group's timeout: ``MIXLAB_DDP_TIMEOUT`` (seconds, > 0) or the default."""
    text = os.environ.get("MIXLAB_DDP_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"MIXLAB_DDP_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def _is_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("connection closed by peer" in text or "connection reset by peer" in text)


_CURRENT = None  # the process's Distributed while its process group exists


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    _monitor: object = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "Distributed":
        """The process's ranks (one object per process group: a second call returns the first's)."""
        global _CURRENT
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if _CURRENT is not None and tdist.is_initialized():
            return _CURRENT
        d = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), timeout_s=timeout_seconds())
        if not tdist.is_initialized():
            use_cuda = torch.cuda.is_available() and os.environ.get("MIXLAB_DEVICE", "") != "cpu"
            if use_cuda:
                torch.cuda.set_device(d.local_rank)
            timeout = datetime.timedelta(seconds=d.timeout_s)
            tdist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
            # a gloo group beside the main one: monitored_barrier (which names the ranks that
            # do not arrive) exists for gloo only
            d._monitor = tdist.new_group(backend="gloo", timeout=timeout)
        _CURRENT = d
        return d

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @contextmanager
    def watch(self, what: str = "a collective operation"):
        """Turn a collective's timeout inside the block (an all-reduce, a barrier, DDP's gradient
        all-reduce in ``backward``) into :class:`DistributedTimeout` naming the stuck rank."""
        try:
            yield
        except RuntimeError as e:
            if not self.enabled or isinstance(e, DistributedTimeout):
                raise
            if _is_timeout(e):
                raise self._timeout_error(what, e) from None
            if _is_lost_peer(e):  # the rank that waited for this one gave up (or died) first
                raise DistributedTimeout(f"rank {self.rank} lost the connection to the other ranks in {what}: another "
                                         "rank stopped (its message says why, e.g. that this rank did not answer "
                                         "in time)") from None
            raise

    def _stuck_ranks(self) -> list[int] | None:
        """The ranks that do not reach a monitored barrier (rank 0 only; None elsewhere or when
        torch does not say)."""
        if self._monitor is None:
            return None
        try:
            wait = min(_MONITOR_TIMEOUT_S, self.timeout_s)
            tdist.monitored_barrier(group=self._monitor, timeout=datetime.timedelta(seconds=wait), wait_all_ranks=True)
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
            if found and self.rank == 0:
                return [int(r) for r in re.findall(r"\d+", found.group(1))]
            return None
        return []  # everyone came: the hang was elsewhere

    def _timeout_error(self, what: str, e: BaseException) -> DistributedTimeout:
        stuck = self._stuck_ranks()
        if stuck:
            who = f"rank{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))} did not answer (frozen or dead)"
        else:
            who = "another rank stopped answering (frozen or dead; rank 0's message names it where torch can tell)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DistributedTimeout(
            f"rank {self.rank} waited {self.timeout_s:g} s for the other ranks in {what} and gave up: {who}. The last "
            f"checkpoint is intact; stop the stuck process, then continue with --resume (MIXLAB_DDP_TIMEOUT=SECONDS "
            f"sets the wait). torch: {first[:200]}")

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            with self.watch("an all-reduce"):
                tdist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            with self.watch("a barrier"):
                tdist.barrier()

    def shutdown(self) -> None:
        """Every rank leaves together (a barrier), then the monitor group and the default group are
        destroyed while the ranks' gloo threads are idle: a rank tearing down while another still
        sends can end its process with a C++ terminate at exit."""
        if self.enabled and tdist.is_initialized():
            tdist.barrier()
            if self._monitor is not None:
                tdist.destroy_process_group(self._monitor)
                self._monitor = None
            tdist.destroy_process_group()
        global _CURRENT
        _CURRENT = None
