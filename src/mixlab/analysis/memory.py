"""How much memory a forward (or a training step) of a model will take, before running it.

The estimate runs the model on the meta device, where tensors have shapes but no storage and
nothing is computed, at the real batch and image size: it costs milliseconds and no memory,
whatever the size. What it adds up:

* inference (no grad): the input, the parameters, and the two largest activations (a layer's
  input and output are alive together);
* a training step: the parameters four times (weights, gradients, AdamW's two moments), the
  tensors autograd saves for the backward pass (counted with
  ``torch.autograd.graph.saved_tensors_hooks``), and the largest activation twice more for
  the backward's temporaries.

It is an estimate that errs low (allocator overhead and oneDNN's workspaces are not in it: a
ConvMixer-256/8 training step of batch 64 at 32x32 is estimated at 0.82 GiB and grows the
process by about 1.4 GiB), so it never refuses a size that would fit, and it tells a batch of
100,000 or an 8192x8192 input, which would need tens of GB or more, from one that fits;
:func:`check_memory` refuses the first kind with a message and an override.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import MemoryEstimateTooLarge

__all__ = ["MemoryEstimate", "estimate_memory", "available_memory", "check_memory"]

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    params: int  # bytes of parameters and buffers (x4 in training: grads and optimizer moments)
    activations: int  # bytes of activations alive at the peak
    largest: int  # bytes of the largest single activation
    mode: str = "infer"  # infer | train

    @property
    def total(self) -> int:
        return self.params + self.activations


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def estimate_memory(build: Callable[[], nn.Module], input_shape: tuple[int, ...], mode: str = "infer",
                    low_precision: bool = False) -> MemoryEstimate | None:
    """Estimate the peak memory of ``mode`` (``infer`` or ``train``) for a model built by
    ``build()`` (called under the meta device) on inputs of ``input_shape`` (N, C, H, W).
    ``low_precision``: activations in bf16/fp16 (half the bytes). None when the model cannot
    run on the meta device (an operation without a meta kernel)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            model = build()
        except NotImplementedError:
            return None
    params = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    outputs: list[int] = []

    def record(_module, _inputs, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                outputs.append(_nbytes(t))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    saved: dict[int, int] = {}
    param_ids = {id(p) for p in model.parameters()}

    def pack(t):
        if id(t) not in param_ids:
            saved[id(t)] = _nbytes(t)
        return t

    x = torch.empty(input_shape, device="meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "train":
                model.train()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model(x)
            else:
                model.eval()
                with torch.no_grad():
                    model(x)
    except NotImplementedError:
        return None
    finally:
        for h in hooks:
            h.remove()
    scale = 0.5 if low_precision else 1.0
    largest = int(max(outputs, default=0) * scale)
    if mode == "train":
        activations = int(sum(saved.values()) * scale) + 2 * largest + _nbytes(x)
        return MemoryEstimate(params=4 * params, activations=activations, largest=largest, mode="train")
    return MemoryEstimate(params=params, activations=2 * largest + _nbytes(x), largest=largest)


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes free for a new allocation: the GPU's free memory, or the machine's available RAM
    (``MemAvailable`` in /proc/meminfo); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(estimate: MemoryEstimate | None, device: str | torch.device, what: str, fix: str,
                 override: str) -> None:
    """Refuse ``what`` (e.g. "a training step of batch 100000 at 32x32") when its estimate is
    above the memory ``device`` has free, naming both, what to change (``fix``) and how to run
    it anyway (``override``)."""
    if estimate is None:
        return
    free = available_memory(device)
    if free is None or estimate.total <= free:
        return
    raise MemoryEstimateTooLarge(
        f"{what} needs about {estimate.total / GIB:.1f} GiB ({estimate.activations / GIB:.1f} GiB of activations, "
        f"estimated from the model's layer outputs at this size, + {estimate.params / GIB:.2f} GiB of parameters"
        f"{' with gradients and optimizer state' if estimate.mode == 'train' else ''}), more than the "
        f"{free / GIB:.1f} GiB free on {torch.device(device).type}: {fix}, or {override} to try anyway")
