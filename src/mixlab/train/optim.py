"""Optimizers torch does not ship in the form a recipe needs.

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
"""
from __future__ import annotations

import torch

from ..errors import UsageError


class AdamWAbsoluteDecay(torch.optim.Adam):
    """Adam whose decoupled weight decay multiplies every parameter by ``1 - weight_decay`` each
    step, independent of the learning rate (TensorFlow Addons' AdamW); then Adam's step.

    The decay is kept in each param group as ``absolute_weight_decay`` (Adam's own
    ``weight_decay``, an L2 term added to the gradient, stays 0), so ``state_dict`` /
    ``load_state_dict`` carry it and a resumed run decays as the original did.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not 0.0 <= weight_decay < 1.0:
            raise UsageError(f"weight_decay of adamw_tfa is the fraction removed per step: it must be in [0, 1), "
                             f"got {weight_decay}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("absolute_weight_decay", float(weight_decay))

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
        super().step()
        return loss
