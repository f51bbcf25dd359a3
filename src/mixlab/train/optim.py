"""Optimizers and the learning-rate schedule: what a config's optimizer and schedule build.

Optimizers torch does not ship in the form a recipe needs:

``AdamWAbsoluteDecay``: AdamW as TensorFlow Addons defines it (``tfa.optimizers.AdamW``, the
optimizer of the ConvMixer Keras seed). Both are Adam with decoupled weight decay, but they
size the decay differently:

- ``torch.optim.AdamW`` multiplies each parameter by ``1 - lr * weight_decay`` per step, so
  the decay follows the learning rate (and its schedule);
- TensorFlow Addons' ``DecoupledWeightDecayExtension`` subtracts ``weight_decay * var`` per
  step, whatever the learning rate is: with the seed's lr 1e-3 and weight_decay 1e-4 that is a
  decay of 1e-4 per step, where torch's AdamW with the same two numbers gives 1e-7.

tfa applies the decay first, to the variable's value before the step, and then Adam's update
(the decay op is a control dependency of the Adam op), and it decays every trainable variable
(biases and BatchNorm scales/offsets too) unless an exclude list names it; the seed gives none.

tfa's AdamW is Keras' Adam underneath, which adds epsilon to the square root of the raw second
moment ("epsilon hat" in the Adam paper's notation) and folds both bias corrections into the
step size, ``lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, where torch divides the
bias-corrected moments, ``lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. The two are
the same update when torch's eps is ``eps / sqrt(1 - b2^t)``, so the class sets that each step
and keeps torch's Adam for the arithmetic. ``t`` is Keras' ``optimizer.iterations`` (one count
for the whole optimizer); with the seed's eps 1e-7 the two placements differ by 3e-6 / |grad|
at the first step and the gap shrinks as sqrt(1 - b2^t) grows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import UsageError


class AdamWAbsoluteDecay(torch.optim.Adam):
    """Adam whose decoupled weight decay multiplies every parameter by ``1 - weight_decay`` each
    step, independent of the learning rate (TensorFlow Addons' AdamW); then Adam's step.

    The decay is kept in each param group as ``absolute_weight_decay`` (Adam's own
    ``weight_decay``, an L2 term added to the gradient, stays 0), so ``state_dict`` /
    ``load_state_dict`` carry it and a resumed run decays as the original did. ``eps`` is
    Keras' (added to ``sqrt(v)`` before bias correction; kept as ``keras_epsilon``, with the
    step count as ``keras_step``, both carried by ``state_dict`` likewise).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not 0.0 <= weight_decay < 1.0:
            raise UsageError(f"weight_decay of adamw_tfa is the fraction removed per step: it must be in [0, 1), "
                             f"got {weight_decay}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("absolute_weight_decay", float(weight_decay))
            group.setdefault("keras_epsilon", float(eps))
            group.setdefault("keras_step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            decay = group.get("absolute_weight_decay", 0.0)
            # tfa decays the variables it updates, i.e. those with a gradient this step
            if decay:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - decay)
            if "keras_step" not in group:  # a checkpoint saved before keras_step existed: Adam's own count
                group["keras_step"] = max((int(self.state[p]["step"]) for p in group["params"]
                                           if "step" in self.state.get(p, {})), default=0)
            group["keras_step"] = step = group["keras_step"] + 1
            beta2 = group["betas"][1]
            group["eps"] = group.setdefault("keras_epsilon", group["eps"]) / math.sqrt(1.0 - beta2 ** step)
        super().step()
        return loss


def uses_fused(opt: dict, params: list[torch.Tensor]) -> bool:
    """Whether :func:`build_optimizer` builds torch's fused (one kernel per step) form: ``opt['fused']``
    true, or ``auto`` (the default) with every parameter a dense floating-point CPU tensor. On the CPU
    torch's default is a loop over the parameters, a few operations each: 14.1 against 4.6 ms a
    step for Conv2Former-N's 8.8M parameters (2 EPYC cores), with equal results. adamw_tfa has no
    fused form."""
    setting = opt.get("fused", "auto")
    if opt["name"] == "adamw_tfa" or setting is False:
        return False
    return setting is True or (bool(params) and all(
        p.device.type == "cpu" and p.is_floating_point() and p.layout == torch.strided for p in params))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping the optimizer's own ``fused`` setting: torch copies
    each saved param group over the built one, ``fused`` included, so a run saved before (or with)
    another setting would otherwise run on in the saved form. The state itself (step, moments) is
    the same in both forms on the CPU."""
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(state)
    if "fused" in optimizer.defaults:
        for group in optimizer.param_groups:
            group["fused"] = fused


def build_optimizer(model: nn.Module, opt: dict) -> torch.optim.Optimizer:
    name, lr, wd = opt["name"], float(opt["lr"]), float(opt["weight_decay"])
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if uses_fused(opt, params) else {}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                                 **fused)
    if name == "adamw_tfa":  # decay of weight_decay per step whatever the lr (TensorFlow Addons' AdamW)
        return AdamWAbsoluteDecay(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                                **fused)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(opt["momentum"]),
                           nesterov=bool(opt["nesterov"]), **fused)


def lr_factor(sched: dict, epochs: int, progress: float, base_lr: float | None = None) -> float:
    """Learning-rate multiplier at ``progress`` (epochs done, fractional).

    Written as a plain function of progress rather than a stateful scheduler so that a
    resumed run needs nothing but the step count. ``onecycle`` is the piecewise-linear
    schedule of the public ConvMixer CIFAR-10 script (0 -> max at 2/5 -> max/20 at 4/5 -> 0,
    knots at integer epochs as its np.interp uses them), which is not torch's cosine
    OneCycleLR; ``cosine`` is linear warmup then cosine decay to ``min_lr`` (an absolute rate,
    as torch's ``eta_min``; ``base_lr`` is the optimizer's rate it is relative to). With
    ``per_epoch`` the rate is held for each whole epoch at its value at the epoch's start, as
    a torch scheduler stepped once per epoch gives it (``progress`` is where a step ends, so
    a step with progress in (e, e + 1] belongs to epoch e).
    """
    name = sched["name"]
    if sched.get("per_epoch"):
        progress = float(max(0, math.ceil(progress - 1e-9) - 1))
    if name == "constant":
        warm = float(sched.get("warmup_epochs") or 0)
        return min(1.0, progress / warm) if warm > 0 else 1.0
    if name == "onecycle":
        knots = [0, epochs * 2 // 5, epochs * 4 // 5, epochs]
        return float(np.interp(progress, knots, [0.0, 1.0, 1 / 20, 0.0]))
    warm = float(sched.get("warmup_epochs") or 0)
    if warm > 0 and progress < warm:
        return progress / warm
    t = min(1.0, (progress - warm) / max(epochs - warm, 1e-8))
    min_lr = float(sched.get("min_lr") or 0.0)
    if min_lr and not base_lr:
        raise ValueError("lr_factor needs base_lr (the optimizer's rate) when schedule.min_lr is set")
    floor = min_lr / base_lr if min_lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
