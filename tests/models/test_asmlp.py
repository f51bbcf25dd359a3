"""AS-MLP: exact sizes and costs, official checkpoints, ablation switches, features, sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.analysis.profile import count_macs, count_params
from mixlab.models.asmlp import ASMLP

# (params, GMACs) of the official implementation at 224, 1000 classes (issue 5)
OFFICIAL = {
    "asmlp_t": (28_282_696, 4.350),
    "asmlp_s": (49_594_696, 8.512),
    "asmlp_b": (87_752_808, 15.126),
}
CONFIGS = {"asmlp_t": (96, (2, 2, 6, 2)), "asmlp_s": (96, (2, 2, 18, 2)), "asmlp_b": (128, (2, 2, 18, 2))}


def asmlp_param_count(embed_dim, depths, num_classes=1000, patch=4, in_chans=3, mlp_ratio=4):
    """Parameters of AS-MLP counted from its description, independently of any module."""
    total = in_chans * embed_dim * patch * patch + embed_dim + 2 * embed_dim  # patch conv + GroupNorm
    for i, depth in enumerate(depths):
        c = embed_dim * 2 ** i
        hidden = int(c * mlp_ratio)
        block = (2 * c                      # norm1
                 + 4 * (c * c + c)          # conv1, conv2_1, conv2_2, conv3 (1x1, bias)
                 + 2 * 2 * c                # the two GroupNorms inside the shift module
                 + 2 * c                    # norm2
                 + c * hidden + hidden + hidden * c + c)  # channel MLP
        total += depth * block
        if i < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # merging: GroupNorm(4C) + 1x1 conv 4C -> 2C, no bias
    final = embed_dim * 2 ** (len(depths) - 1)
    return total + 2 * final + final * num_classes + num_classes


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_params_exact_and_macs_within_1_percent(name):
    params, gmacs = OFFICIAL[name]
    assert asmlp_param_count(*CONFIGS[name]) == params  # the formula agrees with the official count
    with torch.device("meta"):
        model = mixlab.create_model(name)
        macs = count_macs(model, (3, 224, 224))
    assert count_params(model)[0] == params
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01, macs


def test_cifar_form_params_and_metadata():
    info = mixlab.model_info("asmlp_t_cifar")
    assert info.input_size == (3, 32, 32) and info.num_classes == 10 and "patch 2" in info.cifar
    with torch.device("meta"):
        model = mixlab.create_model("asmlp_t_cifar")
    assert count_params(model)[0] == asmlp_param_count(96, (2, 2, 6, 2), num_classes=10, patch=2) == 27_517_930
    assert model.patch_size == 2


# --------------------------------------------------------------------------------------------
# A faithful re-implementation of the official module layout (svip-lab/AS-MLP models/as_mlp.py),
# with the CUDA shift replaced by the roll version kept in that repository. It exists to produce
# state_dicts with the official key names and shapes, and reference outputs.


def official_roll_shift(x, shift_size, dim):
    _, _, h, w = x.shape
    pad = shift_size // 2
    x = F.pad(x, (pad, pad, pad, pad), "constant", 0)
    xs = torch.chunk(x, shift_size, 1)
    x = torch.cat([torch.roll(c, s, dim) for c, s in zip(xs, range(-pad, pad + 1))], 1)
    return torch.narrow(torch.narrow(x, 2, pad, h), 3, pad, w)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAxialShift(nn.Module):
    def __init__(self, dim, shift_size):
        super().__init__()
        self.shift_size = shift_size
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2_1 = nn.Conv2d(dim, dim, 1)
        self.conv2_2 = nn.Conv2d(dim, dim, 1)
        self.conv3 = nn.Conv2d(dim, dim, 1)
        self.actn = nn.GELU()
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm2 = nn.GroupNorm(1, dim)

    def forward(self, x):
        x = self.actn(self.norm1(self.conv1(x)))
        x_lr = self.actn(self.conv2_1(official_roll_shift(x, self.shift_size, 3)))
        x_td = self.actn(self.conv2_2(official_roll_shift(x, self.shift_size, 2)))
        return self.conv3(self.norm2(x_lr + x_td))


class RefBlock(nn.Module):
    def __init__(self, dim, shift_size):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.axial_shift = RefAxialShift(dim, shift_size)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.axial_shift(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, 1, bias=False)
        self.norm = nn.GroupNorm(1, 4 * dim)

    def forward(self, x):
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)
        return self.reduction(self.norm(x))


class RefLayer(nn.Module):
    def __init__(self, dim, depth, shift_size, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([RefBlock(dim, shift_size) for _ in range(depth)])
        self.downsample = RefMerging(dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class RefASMLP(nn.Module):
    def __init__(self, patch=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2), shift_size=5):
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch, in_chans, embed_dim)
        self.layers = nn.ModuleList([
            RefLayer(embed_dim * 2 ** i, d, shift_size, i < len(depths) - 1) for i, d in enumerate(depths)])
        nf = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.GroupNorm(1, nf)
        self.head = nn.Linear(nf, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = torch.flatten(F.adaptive_avg_pool2d(self.norm(x), 1), 1)
        return self.head(x)


def _randomised(module, seed):
    """Every parameter random (norm affines too), so a wrongly mapped tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return module.eval()


# embed 12 with shift 5: groups of 3 channels, only 4 groups (torch.chunk), 12/24/48/96 channels
TINY = dict(embed_dim=12, depths=(1, 2, 1, 1), num_classes=7)


def test_official_state_dict_loads_strictly_and_matches(tmp_path):
    ref = _randomised(RefASMLP(**TINY), seed=1)
    sd = ref.state_dict()
    path = tmp_path / "asmlp_official.pth"
    torch.save({"model": sd}, path)  # the official training script wraps the weights like this
    model = mixlab.create_model("asmlp_t", img_size=64, checkpoint_path=str(path), official=True, **TINY).eval()
    assert isinstance(model, ASMLP) and set(model.state_dict()) == set(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
        # another admissible size than the build size runs the same weights
        x = torch.randn(1, 3, 96, 64)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_official_load_rejects_mismatched_checkpoints():
    sd = RefASMLP(**TINY).state_dict()
    model = mixlab.create_model("asmlp_t", img_size=64, **TINY)
    broken = dict(sd)
    broken.pop("layers.1.blocks.1.axial_shift.conv2_2.weight")
    with pytest.raises(ValueError, match=r"missing in the file \(1\): layers.1.blocks.1.axial_shift.conv2_2.weight"):
        mixlab.load_official(model, broken)
    other = mixlab.create_model("asmlp_t", img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_classes=7)
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlab.load_official(other, sd)


# --------------------------------------------------------------------------------------------
# ablation switches


def naive_shift(x, shift_size, dim, dilation, padding):
    _, _, h, w = x.shape
    half = shift_size // 2
    pad = half * dilation
    mode = "constant" if padding == "zero" else padding
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    xs = torch.chunk(x, shift_size, 1)
    x = torch.cat([torch.roll(c, (i - half) * dilation, dim) for i, c in enumerate(xs)], 1)
    return x[:, :, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize("shift_size,dilation,padding,connection", [
    (3, 2, "reflect", "serial"),
    (7, 1, "replicate", "parallel"),
    (5, 3, "circular", "serial"),
    (5, 2, "zero", "parallel"),
])
def test_ablation_switches_follow_their_definition(shift_size, dilation, padding, connection):
    from mixlab.kv import parse_kv

    kwargs = parse_kv(f"shift_size={shift_size},dilation={dilation},padding={padding},connection={connection}")
    # 192 leaves a 6x6 last stage, enough for every padding below (circular 5 // 2 * 3 = 6)
    model = mixlab.create_model("asmlp_t", img_size=192, embed_dim=8, depths=(1, 1, 1, 1), num_classes=3, **kwargs)
    module = model.layers[0].blocks[0].axial_shift
    assert (module.shift_size, module.dilation, module.padding, module.connection) == (
        shift_size, dilation, padding, connection)
    _randomised(module, seed=3)
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        y = module.actn(module.norm1(module.conv1(x)))
        lr = module.actn(module.conv2_1(naive_shift(y, shift_size, 3, dilation, padding)))
        td_in = y if connection == "parallel" else lr
        td = module.actn(module.conv2_2(naive_shift(td_in, shift_size, 2, dilation, padding)))
        mixed = lr + td if connection == "parallel" else td
        expected = module.conv3(module.norm2(mixed))
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    out = model(torch.randn(1, 3, 192, 192))
    out.sum().backward()
    assert out.shape == (1, 3)


def test_bad_ablation_values_raise():
    with pytest.raises(ValueError, match="padding must be one of"):
        mixlab.create_model("asmlp_t", padding="mirror")
    with pytest.raises(ValueError, match="connection must be one of"):
        mixlab.create_model("asmlp_t", connection="sequential")
    with pytest.raises(TypeError, match="does not take"):
        mixlab.create_model("asmlp_t", window_size=7)


# --------------------------------------------------------------------------------------------
# sizes and features


def test_input_size_constraints():
    with pytest.raises(ValueError, match="multiples of 32, got 33x33"):
        mixlab.create_model("asmlp_t", img_size=33)
    model = mixlab.create_model("asmlp_t", embed_dim=8, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="multiples of 32, got 48x64"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="multiples of 16, got 40x40"):
        mixlab.create_model("asmlp_t_cifar", img_size=40)
    # reflect padding by 2 * 4 = 8 cannot be taken by the 7x7 last stage of a 224 input
    with pytest.raises(ValueError, match="reflect padding"):
        mixlab.create_model("asmlp_t", dilation=4, padding="reflect")
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)  # non-square sizes are fine


def test_features_only_shapes_and_info():
    model = mixlab.create_model("asmlp_t", features_only=True, embed_dim=8, depths=(1, 1, 1, 1))
    assert model.feature_info.channels() == [8, 16, 32, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
    some = mixlab.create_model("asmlp_t", features_only=True, out_indices=(1, 2), embed_dim=8, depths=(1, 1, 1, 1))
    assert [tuple(f.shape) for f in some(torch.randn(1, 3, 64, 64))] == [(1, 16, 8, 8), (1, 32, 4, 4)]


def test_features_match_stage_outputs_of_the_classifier():
    torch.manual_seed(0)
    model = mixlab.create_model("asmlp_t", embed_dim=8, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    seen = []
    hooks = [model.layers[i].blocks.register_forward_hook(lambda m, i, o: seen.append(o)) for i in range(4)]
    with torch.no_grad():
        model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert len(feats) == 4
    for a, b in zip(feats, seen):
        assert torch.equal(a, b)


def test_channels_last_model_matches():
    torch.manual_seed(0)
    model = mixlab.create_model("asmlp_t", embed_dim=8, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
