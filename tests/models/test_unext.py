"""UNeXt: exact size and cost, input-size rule, and equality with the official layout.

``OfficialUNext`` below re-implements the official ``archs.py`` (jeya-maria-jose/UNeXt-pytorch)
as it computes, with its module names: NCHW copies around every token stage and the
shifted MLP's pad / chunk / roll / narrow shift. It exists only to produce official
state_dicts and reference outputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.analysis.profile import count_macs, count_params


# -- a reference written after the official archs.py ----------------------------------------------

class RefShiftMLP(nn.Module):
    def __init__(self, dim, shift_size=5):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.dwconv = RefDWConv(dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)
        self.shift_size, self.pad = shift_size, shift_size // 2

    def shift(self, x, h, w, dim):
        b, n, c = x.shape
        xn = x.transpose(1, 2).view(b, c, h, w).contiguous()
        xn = F.pad(xn, (self.pad, self.pad, self.pad, self.pad), "constant", 0)
        parts = torch.chunk(xn, self.shift_size, 1)
        rolled = [torch.roll(p, s, dim) for p, s in zip(parts, range(-self.pad, self.pad + 1))]
        xc = torch.narrow(torch.narrow(torch.cat(rolled, 1), 2, self.pad, h), 3, self.pad, w)
        return xc.reshape(b, c, h * w).contiguous().transpose(1, 2)

    def forward(self, x, h, w):
        x = self.fc1(self.shift(x, h, w, 2))
        x = self.drop(self.act(self.dwconv(x, h, w)))
        return self.drop(self.fc2(self.shift(x, h, w, 3)))


class RefDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2)


class RefBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefShiftMLP(dim)

    def forward(self, x, h, w):
        return x + self.mlp(self.norm2(x), h, w)


class RefPatchEmbed(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, 2, 1)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class OfficialUNext(nn.Module):
    """The official UNext / UNext_S forward (channels c1..c5), official module names."""

    def __init__(self, num_classes=1, dims=(16, 32, 128, 160, 256)):
        super().__init__()
        c1, c2, c3, c4, c5 = dims
        self.encoder1, self.encoder2, self.encoder3 = (nn.Conv2d(a, b, 3, 1, 1) for a, b in ((3, c1), (c1, c2), (c2, c3)))
        self.ebn1, self.ebn2, self.ebn3 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3)
        self.norm3, self.norm4 = nn.LayerNorm(c4), nn.LayerNorm(c5)
        self.dnorm3, self.dnorm4 = nn.LayerNorm(c4), nn.LayerNorm(c3)
        self.block1 = nn.ModuleList([RefBlock(c4)])
        self.block2 = nn.ModuleList([RefBlock(c5)])
        self.dblock1 = nn.ModuleList([RefBlock(c4)])
        self.dblock2 = nn.ModuleList([RefBlock(c3)])
        self.patch_embed3 = RefPatchEmbed(c3, c4)
        self.patch_embed4 = RefPatchEmbed(c4, c5)
        self.decoder1, self.decoder2, self.decoder3, self.decoder4, self.decoder5 = (
            nn.Conv2d(a, b, 3, 1, 1) for a, b in ((c5, c4), (c4, c3), (c3, c2), (c2, c1), (c1, c1)))
        self.dbn1, self.dbn2, self.dbn3, self.dbn4 = (nn.BatchNorm2d(c) for c in (c4, c3, c2, c1))
        self.final = nn.Conv2d(c1, num_classes, 1)
        self.soft = nn.Softmax(dim=1)

    def forward(self, x):
        b = x.shape[0]
        up = lambda t: F.interpolate(t, scale_factor=(2, 2), mode="bilinear")  # noqa: E731
        out = t1 = F.relu(F.max_pool2d(self.ebn1(self.encoder1(x)), 2, 2))
        out = t2 = F.relu(F.max_pool2d(self.ebn2(self.encoder2(out)), 2, 2))
        out = t3 = F.relu(F.max_pool2d(self.ebn3(self.encoder3(out)), 2, 2))
        out, h, w = self.patch_embed3(out)
        for blk in self.block1:
            out = blk(out, h, w)
        out = t4 = self.norm3(out).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        out, h, w = self.patch_embed4(out)
        for blk in self.block2:
            out = blk(out, h, w)
        out = self.norm4(out).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        out = torch.add(F.relu(up(self.dbn1(self.decoder1(out)))), t4)
        _, _, h, w = out.shape
        out = out.flatten(2).transpose(1, 2)
        for blk in self.dblock1:
            out = blk(out, h, w)
        out = self.dnorm3(out).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        out = torch.add(F.relu(up(self.dbn2(self.decoder2(out)))), t3)
        _, _, h, w = out.shape
        out = out.flatten(2).transpose(1, 2)
        for blk in self.dblock2:
            out = blk(out, h, w)
        out = self.dnorm4(out).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        out = torch.add(F.relu(up(self.dbn3(self.decoder3(out)))), t2)
        out = torch.add(F.relu(up(self.dbn4(self.decoder4(out)))), t1)
        out = F.relu(up(self.decoder5(out)))
        return self.final(out)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere, BatchNorm statistics included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


# -- size and cost ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, macs", [("unext", 1_471_921, 0.562e9), ("unext_s", 253_561, 0.099e9)])
def test_params_and_macs_match_official(name, params, macs):
    model = mixlab.create_model(name, num_classes=1, in_chans=3)
    assert count_params(model) == (params, params)
    assert count_params(OfficialUNext(1, model.dims)) == (params, params)
    with torch.device("meta"):
        meta = mixlab.create_model(name, num_classes=1, in_chans=3)
    measured = count_macs(meta, (3, 256, 256))
    assert abs(measured - macs) / macs < 0.01, measured


def test_registered_as_segmentation():
    for name in ("unext", "unext_s"):
        info = mixlab.model_info(name)
        assert info.task == "segmentation" and info.input_size == (3, 256, 256) and info.num_classes == 1
    assert set(mixlab.list_models(task="segmentation")) >= {"unext", "unext_s"}


def test_input_size_must_be_multiple_of_32():
    model = mixlab.create_model("unext_s").eval()
    with pytest.raises(ValueError, match="multiples of 32, got 33x64"):
        model(torch.zeros(1, 3, 33, 64))
    with pytest.raises(ValueError, match="multiples of 32, got 64x48"):
        mixlab.create_model("unext_s", img_size=(64, 48))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 1, 64, 96)


def test_in_chans_num_classes_and_head():
    model = mixlab.create_model("unext_s", num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 64)).shape == (2, 3, 32, 64)
    model.reset_classifier(2)
    assert model.get_classifier().out_channels == 2
    model.reset_classifier(4, "")  # timm's values for the pool are taken (a dense head has none)
    assert model.get_classifier().out_channels == 4
    with pytest.raises(ValueError, match="global_pool must be 'avg'.*got 'max'"):
        model.reset_classifier(3, "max")
    assert model.get_classifier().out_channels == 4  # a refused call changes nothing
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 8, 32, 32)


def test_features_only_gives_the_encoder_stages():
    feats = mixlab.create_model("unext_s", features_only=True).eval()
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 8, 32, 32), (1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4),
                                             (1, 128, 2, 2)]
    # the decoder and the output conv are pruned away: every parameter left feeds a feature (so
    # DistributedDataParallel finds no unused ones), and they are the encoder's
    sum(o.sum() for o in feats.train()(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in feats.parameters())
    encoder = ("encoder", "ebn", "patch_embed", "block1.", "block2.", "norm3", "norm4")
    full = mixlab.create_model("unext_s")
    assert count_params(feats)[0] == sum(p.numel() for n, p in full.named_parameters() if n.startswith(encoder))


def test_pruning_to_a_shallower_feature_ends_the_network_there():
    model = mixlab.create_model("unext_s").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert torch.equal(model.forward_features(x), taps[2])
        final, picked = model.forward_intermediates(x, indices=[1, 2])
        left = model.forward_intermediates(x, intermediates_only=True)  # the features of the stages left
    assert torch.equal(final, taps[2]) and torch.equal(picked[0], taps[1])
    assert len(left) == 3 and all(torch.equal(a, b) for a, b in zip(left, taps))
    assert model.num_classes == 0 and model.num_features == 32
    assert not any(n.startswith(("patch_embed3", "decoder", "dblock")) for n, _ in model.named_parameters())


# -- equality with the official layout -------------------------------------------------------------

@pytest.mark.parametrize("name", ["unext", "unext_s"])
def test_official_state_dict_loads_and_outputs_match(name):
    model = mixlab.create_model(name).eval()
    ref = OfficialUNext(1, model.dims).eval()
    _randomize(ref, seed=1)
    sd = ref.state_dict()
    mixlab.load_official(model, sd)
    # strict round trip: every official tensor is in mixlab's model, unchanged, and nothing else
    own = model.state_dict()
    assert own.keys() == sd.keys()
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert got.shape == expected.shape == (2, 1, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_official_equality_at_256_and_in_training_mode():
    model = mixlab.create_model("unext")
    ref = OfficialUNext(1, model.dims)
    _randomize(ref, seed=3)
    mixlab.load_official(model, {f"module.{k}": v for k, v in ref.state_dict().items()})  # DataParallel keys
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=0, atol=1e-5)
    xb = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out_m, out_r = model.train()(xb), ref.train()(xb)  # batch statistics, same graph
    torch.testing.assert_close(out_m, out_r, rtol=0, atol=1e-5)
    g_m, = torch.autograd.grad(out_m.square().sum(), xb)
    g_r, = torch.autograd.grad(out_r.square().sum(), xb)
    # gradients reach ~8 here: float32 summation order (BatchNorm batch statistics) moves the last digits
    torch.testing.assert_close(g_m, g_r, rtol=1e-5, atol=1e-4)
    # eval mode with gradients (BatchNorm folded into the convs, no in-place skip additions)
    out_m, out_r = model.eval()(xb), ref.eval()(xb)
    torch.testing.assert_close(out_m, out_r, rtol=0, atol=1e-5)
    g_m, = torch.autograd.grad(out_m.square().sum(), xb)
    g_r, = torch.autograd.grad(out_r.square().sum(), xb)
    torch.testing.assert_close(g_m, g_r, rtol=1e-5, atol=1e-4)


def test_shifted_mlp_matches_official_shift_for_uneven_groups():
    # 128 and 32 channels split into groups of 26/7 with a smaller last group
    from mixlab.models.unext import ShiftedMLP

    for dim in (128, 32, 7):
        ours, ref = ShiftedMLP(dim), RefShiftMLP(dim)
        _randomize(ref, seed=dim)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(3, 8 * 12, dim)
        torch.testing.assert_close(ours(x, 8, 12), ref(x, 8, 12), rtol=0, atol=1e-5)


def test_official_checkpoint_of_the_wrong_variant_is_rejected():
    model = mixlab.create_model("unext_s")
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlab.load_official(model, OfficialUNext(1, (16, 32, 128, 160, 256)).state_dict())


def test_drop_path_follows_the_official_schedule():
    model = mixlab.create_model("unext_s", drop_path_rate=0.1)
    assert isinstance(model.block2[0].drop_path, nn.Module) and model.block2[0].drop_path.drop_prob == 0.05
    assert isinstance(model.block1[0].drop_path, nn.Identity)
