"""ConvMLP: exact sizes, costs, official-checkpoint loading, sizes, dense features."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import mixlab
from mixlab.analysis.profile import count_macs, count_params, feature_shapes
from mixlab.models.convmlp import ConvMLP

# Parameters and MACs (torch.utils.flop_counter, MACs = FLOPs / 2, batch 1) of the official
# implementation (SHI-Labs/Convolutional-MLPs, src/convmlp.py) at 224x224 with 1000 classes,
# as measured in issue 4's table.
OFFICIAL = {
    "convmlp_s": (9_022_920, 2.385e9),
    "convmlp_m": (17_410_504, 3.929e9),
    "convmlp_l": (42_728_440, 9.870e9),
}
CONFIGS = {  # the official entrypoints' arguments
    "convmlp_s": dict(blocks=(2, 4, 2), dims=(128, 256, 512), mlp_ratios=(2, 2, 2), channels=64, n_conv_blocks=2),
    "convmlp_m": dict(blocks=(3, 6, 3), dims=(128, 256, 512), mlp_ratios=(3, 3, 3), channels=64, n_conv_blocks=3),
    "convmlp_l": dict(blocks=(4, 8, 3), dims=(192, 384, 768), mlp_ratios=(3, 3, 3), channels=96, n_conv_blocks=3),
}
SMALL = dict(blocks=(1, 2, 1), dims=(16, 24, 32), mlp_ratios=(2, 3, 2), channels=8, n_conv_blocks=2)


# -- a reference with the official module layout (written from reading the official code) ---------
class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefTokenizer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.block = nn.Sequential(
            nn.Conv2d(3, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1))

    def forward(self, x):
        return self.block(x)


class RefConvStage(nn.Module):
    def __init__(self, n, c, hidden, out):
        super().__init__()
        self.conv_blocks = nn.ModuleList([nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(n)])
        self.downsample = nn.Conv2d(c, out, 3, 2, 1)

    def forward(self, x):
        for b in self.conv_blocks:
            x = x + b(x)
        return self.downsample(x)


class RefBlock(nn.Module):  # the official "ConvMLPStage": channels-last in and out
    def __init__(self, d, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.channel_mlp1 = RefMlp(d, hidden)
        self.norm2 = nn.LayerNorm(d)
        self.connect = nn.Conv2d(d, d, 3, 1, 1, groups=d, bias=False)
        self.connect_norm = nn.LayerNorm(d)
        self.channel_mlp2 = RefMlp(d, hidden)

    def forward(self, x):
        x = x + self.channel_mlp1(self.norm1(x))
        x = self.connect(self.connect_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.channel_mlp2(self.norm2(x))


class RefDown(nn.Module):
    def __init__(self, d, o):
        super().__init__()
        self.downsample = nn.Conv2d(d, o, 3, 2, 1)

    def forward(self, x):
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RefStage(nn.Module):  # the official "BasicStage"
    def __init__(self, n, d, o, ratio):
        super().__init__()
        self.blocks = nn.ModuleList([RefBlock(d, int(d * ratio)) for _ in range(n)])
        self.downsample_mlp = RefDown(d, o) if o else nn.Identity()

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.downsample_mlp(x)


class RefConvMLP(nn.Module):
    def __init__(self, blocks, dims, mlp_ratios, channels, n_conv_blocks, num_classes=1000):
        super().__init__()
        self.tokenizer = RefTokenizer(channels)
        self.conv_stages = RefConvStage(n_conv_blocks, channels, dims[0], dims[0])
        self.stages = nn.ModuleList([RefStage(blocks[i], dims[i], dims[i + 1] if i + 1 < len(dims) else None,
                                              mlp_ratios[i]) for i in range(len(dims))])
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.conv_stages(self.tokenizer(x)).permute(0, 2, 3, 1)
        for s in self.stages:
            x = s(x)
        x = self.norm(x.reshape(x.shape[0], -1, x.shape[-1])).mean(dim=1)
        return self.head(x)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Random values in every parameter and BN statistic, so that a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


# -- sizes and costs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_param_count_exact(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    assert count_params(model)[0] == OFFICIAL[name][0]


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_macs_within_1pct_of_official(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    macs = count_macs(model, (3, 224, 224))
    assert abs(macs - OFFICIAL[name][1]) / OFFICIAL[name][1] < 0.01, macs


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_layout_equals_official(name):
    with torch.device("meta"):
        ours = mixlab.create_model(name).state_dict()
        ref = RefConvMLP(**CONFIGS[name]).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


# -- official checkpoints -----------------------------------------------------------------------------
def test_load_official_small_matches_reference_outputs(tmp_path):
    torch.manual_seed(0)
    ref = RefConvMLP(**SMALL, num_classes=7)
    _randomize(ref)
    ref.eval()
    sd = ref.state_dict()
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-wrapped checkpoint

    model = ConvMLP(**SMALL, num_classes=7)
    mixlab.load_official(model, path)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    model.eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_create_model_with_official_checkpoint(tmp_path):
    torch.manual_seed(1)
    ref = RefConvMLP(**CONFIGS["convmlp_s"])
    _randomize(ref, seed=1)
    ref.eval()
    path = tmp_path / "convmlp_s_official.pth"
    torch.save(ref.state_dict(), path)
    model = mixlab.create_model("convmlp_s", checkpoint_path=str(path), official=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_load_official_rejects_other_variant():
    with torch.device("meta"):
        sd = RefConvMLP(**CONFIGS["convmlp_m"]).state_dict()
        model = mixlab.create_model("convmlp_s")
    with pytest.raises(ValueError, match="does not match ConvMLP"):
        mixlab.load_official(model, sd)


# -- sizes (forward, backward and the timm API of every variant: tests/models/test_contract.py) --------
@pytest.fixture(scope="module")
def s_model():
    torch.manual_seed(0)
    return mixlab.create_model("convmlp_s", num_classes=10)


def test_feature_map_size_rounds_up():
    model = ConvMLP(**SMALL, num_classes=0).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 37, 53)).shape == (1, 32, 2, 2)
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 32, 1, 1)
        assert model.forward_features(torch.randn(1, 3, 1, 1)).shape == (1, 32, 1, 1)


def test_size_errors():
    model = ConvMLP(**SMALL)
    with pytest.raises(ValueError, match="at least 1 pixel, got 0x32"):
        model.check_input_size(0, 32)
    with pytest.raises(ValueError, match="at least 1 pixel"):
        mixlab.create_model("convmlp_s", img_size=(32, 0))


def test_bad_kwarg():
    with pytest.raises(TypeError, match="does not take argument"):
        mixlab.create_model("convmlp_s", kernel_size=5)
    with pytest.raises(ValueError, match="same length"):
        ConvMLP(blocks=(1, 1), dims=(8, 16, 32), mlp_ratios=(2, 2, 2))


# -- dense features ------------------------------------------------------------------------------------
def test_features_only_shapes():
    model = mixlab.create_model("convmlp_s", features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
        last = model.model.forward_features(x)  # the backbone's output is the last feature
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert torch.equal(feats[-1], last)


def test_features_only_out_indices_and_pruning():
    full = timm.create_model("convmlp_s")
    feats = timm.create_model("convmlp_s", features_only=True, out_indices=(1, 2))
    assert feats.feature_info.channels() == [128, 256]
    assert feats.feature_info.reduction() == [8, 16]
    # stages after the last tap and the head are dropped from the feature model
    assert count_params(feats)[0] < count_params(full)[0]
    with torch.no_grad():
        out = feats.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in out] == [(1, 128, 8, 8), (1, 256, 4, 4)]


def test_intermediates_are_the_feature_info_modules_outputs():
    torch.manual_seed(0)
    model = ConvMLP(**SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(inter[-1], final)  # the last stage has no downsample
    shapes = feature_shapes(model, (3, 64, 96))  # feature_info's modules output these maps
    assert [s["shape"] for s in shapes] == [list(t.shape) for t in inter]


# -- stochastic depth and initialisation -------------------------------------------------------------
def test_drop_path_schedule_restarts_per_stage(s_model):
    model = s_model  # official: rate 0.1, ramp within each stage
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks] for s in model.stages]
    expected = [torch.linspace(0, 0.1, n).tolist() for n in (2, 4, 2)]
    for got, exp in zip(rates, expected):
        assert got == pytest.approx(exp)
    model = ConvMLP(**SMALL, drop_path_rate=0.0)
    assert all(isinstance(b.drop_path, nn.Identity) for s in model.stages for b in s.blocks)


def test_official_initialisation(s_model):
    model = s_model
    w = model.conv_stages.conv_blocks[0][3].weight  # 3x3 conv 128->128: kaiming fan_out
    assert w.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.03)
    fc = model.stages[1].blocks[0].channel_mlp1.fc1
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.all(fc.bias == 0) and torch.all(model.head.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.tokenizer.block[1].weight == 1)
