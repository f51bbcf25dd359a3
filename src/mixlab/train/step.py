"""One optimisation step and one inference step, shared by `mixlab train` and `mixlab bench`.

Keeping them in one place means the speed `mixlab bench --mode train` reports is the speed
of the step `mixlab train` runs.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device | str, precision: str):
    """Autocast context for a precision name ('fp32' = no autocast)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device_type != "cuda":
            raise UsageError("fp16 autocast needs a CUDA device; use --precision bf16 on the CPU")
        return torch.autocast(device_type, dtype=torch.float16)
    raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


class TrainStep:
    """forward (autocast) -> loss -> backward -> clip -> optimizer step.

    ``loss_fn(logits, target)`` lets the caller use soft (MixUp) targets; a task whose loss
    is not a function of the model's output alone (a detector computes its losses inside
    its forward) gives ``forward_loss(model, x, target) -> (loss, outputs)`` instead. Returns
    the loss and the outputs, detached, so the caller can count accuracy without a second
    forward.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, device,
                 precision: str = "fp32", clip_grad: float | None = None, forward_loss=None):
        self.model = model
        self.forward_loss = forward_loss
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.precision = precision
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        with autocast(self.device, self.precision):
            if self.forward_loss is not None:
                loss, logits = self.forward_loss(self.model, x, target)
            else:
                logits = self.model(x)
                loss = self.loss_fn(logits.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach(), (logits.detach() if isinstance(logits, torch.Tensor) else logits)


@torch.no_grad()
def infer_step(model: nn.Module, x: torch.Tensor, device, precision: str = "fp32") -> torch.Tensor:
    with autocast(device, precision):
        return model(x)
