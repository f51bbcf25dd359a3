"""Running a model to look at it, leaving it as it was.

Every analysis (FLOP counts, feature shapes, saliency, receptive fields) runs the model in
eval mode, most without gradients, often with forward hooks; :func:`eval_mode` does that
and, however the block ends, removes the hooks and puts the model back in the train/eval
mode it was in.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["eval_mode", "model_device"]


@contextmanager
def eval_mode(model: nn.Module, *, grad: bool = False, hooks: Iterable = ()) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, under ``torch.no_grad()`` unless ``grad``; afterwards the
    model's own mode is restored and every handle in ``hooks`` (the list itself, so hooks
    added inside the block count too) is removed."""
    was_training = model.training
    model.eval()
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next(iter(model.parameters()), torch.zeros(())).device
