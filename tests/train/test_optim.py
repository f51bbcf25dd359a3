"""mixlab.train.optim.build_optimizer: torch's fused (one-kernel) optimizers on the CPU by default,
giving the same parameters as torch's default loop; the setting's other values."""
import copy

import pytest
import torch
from torch import nn

from mixlab.train.config import DEFAULTS
from mixlab.train.optim import AdamWAbsoluteDecay, build_optimizer, load_optimizer_state, uses_fused


def _opt(name, **kw):
    opt = copy.deepcopy(DEFAULTS["optimizer"])
    opt.update(name=name, lr=1e-2, **kw)
    return opt


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_on_the_cpu_by_default_and_equal_to_the_loop(name):
    a, b = _model(), _model()
    fused = build_optimizer(a, _opt(name, nesterov=name == "sgd"))
    loop = build_optimizer(b, _opt(name, nesterov=name == "sgd", fused=False))
    assert fused.defaults["fused"] is True and not loop.defaults.get("fused")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        for m, o in ((a, fused), (b, loop)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the state is the loop's too: a checkpoint of one resumes in the other, each keeping its own form
    # (torch's load_state_dict alone would copy the saved group's `fused` over the built one)
    load_optimizer_state(loop, fused.state_dict())
    assert not loop.param_groups[0]["fused"]
    saved_by_loop = loop.state_dict()
    load_optimizer_state(fused, saved_by_loop)
    assert fused.param_groups[0]["fused"] is True
    for o in (loop, fused):
        o.step()


def test_what_is_not_fused():
    m = _model()
    assert type(build_optimizer(m, _opt("adamw_tfa"))) is AdamWAbsoluteDecay  # no fused form in torch
    assert not uses_fused(_opt("adamw_tfa"), list(m.parameters()))
    assert not uses_fused(_opt("adamw", fused=False), list(m.parameters()))
    meta = [nn.Parameter(torch.empty(3, device="meta"))]
    assert not uses_fused(_opt("adamw"), meta)  # auto: CPU tensors only
    assert uses_fused(_opt("adamw", fused=True), meta)
    assert not uses_fused(_opt("adamw"), [])
