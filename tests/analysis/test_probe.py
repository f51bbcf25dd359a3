"""eval_mode: eval and no-grad inside the block; the model's mode restored and the hooks removed after."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mixlab.analysis.probe import eval_mode, model_device


def _model_with_hook():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).train()
    seen = []
    hooks = [model[0].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))]
    return model, hooks, seen


def test_eval_mode_inside_and_restored_after():
    model, hooks, seen = _model_with_hook()
    with eval_mode(model, hooks=hooks):
        assert not model.training and not model[1].training
        model(torch.ones(1, 3))
    assert seen == [(False, False)]
    assert model.training and model[1].training
    assert not model[0]._forward_hooks  # removed
    model(torch.ones(1, 3))
    assert len(seen) == 1


def test_eval_mode_with_grad_and_after_an_error():
    model, hooks, seen = _model_with_hook()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model, grad=True, hooks=hooks):
            out = model(torch.ones(1, 3))
            assert out.requires_grad
            raise RuntimeError("boom")
    assert seen == [(False, True)]
    assert model.training and not model[0]._forward_hooks
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays in eval mode


def test_model_device():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    with torch.device("meta"):
        assert model_device(nn.Linear(2, 2)).type == "meta"
