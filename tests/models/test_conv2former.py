"""Conv2Former: exact sizes, costs, official-checkpoint loading, sizes, dense features, the seed's CIFAR model."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.analysis.profile import count_macs, count_params, feature_shapes
from mixlab.models.conv2former import Conv2Former

# Parameters and MACs (torch.utils.flop_counter, MACs = FLOPs / 2, batch 1) of the official
# implementation (HVision-NKU/Conv2Former, models/conv2former.py) at 224x224 with 1000 classes,
# and of the seed's CIFAR-10 code at 32x32 with 10 classes, as measured in issue 4's table.
OFFICIAL = {
    "conv2former_n": (14_992_840, 2.330e9),
    "conv2former_t": (26_697_204, 4.361e9),
    "conv2former_s": (50_032_692, 8.708e9),
    "conv2former_b": (90_029_112, 15.890e9),
    "conv2former_l": (198_893_736, 36.038e9),
    "conv2former_n_cifar": (8_847_498, 0.484e9),
}
CONFIGS = {  # the official entrypoints' arguments
    "conv2former_n": dict(kernel_size=7, dims=(64, 128, 256, 512), depths=(2, 2, 8, 2)),
    "conv2former_t": dict(kernel_size=11, dims=(72, 144, 288, 576), depths=(3, 3, 12, 3)),
    "conv2former_s": dict(kernel_size=11, dims=(72, 144, 288, 576), depths=(4, 4, 32, 4)),
    "conv2former_b": dict(kernel_size=11, dims=(96, 192, 384, 768), depths=(4, 4, 34, 4)),
    "conv2former_l": dict(kernel_size=11, dims=(128, 256, 512, 1024), depths=(4, 4, 48, 4)),
}
SMALL = dict(kernel_size=5, dims=(16, 24, 32, 40), depths=(1, 2, 1, 1))


# -- a reference with the official module layout (written from reading the official code) ---------
class RefLN(nn.Module):
    """The official channels-first LayerNorm, computed by hand as there."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class RefMLP(nn.Module):
    def __init__(self, d, r=4):
        super().__init__()
        self.norm = RefLN(d)
        self.fc1 = nn.Conv2d(d, d * r, 1)
        self.pos = nn.Conv2d(d * r, d * r, 3, padding=1, groups=d * r)
        self.fc2 = nn.Conv2d(d * r, d, 1)

    def forward(self, x):
        x = F.gelu(self.fc1(self.norm(x)))
        return self.fc2(x + F.gelu(self.pos(x)))


class RefAttn(nn.Module):  # the official "SpatialAttention"
    def __init__(self, d, k):
        super().__init__()
        self.norm = RefLN(d)
        self.att = nn.Sequential(nn.Conv2d(d, d, 1), nn.GELU(), nn.Conv2d(d, d, k, padding=k // 2, groups=d))
        self.v = nn.Conv2d(d, d, 1)
        self.proj = nn.Conv2d(d, d, 1)

    def forward(self, x):
        x = self.norm(x)
        return self.proj(self.att(x) * self.v(x))


class RefBlock(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.attn, self.mlp = RefAttn(d, k), RefMLP(d)
        self.layer_scale_1 = nn.Parameter(1e-6 * torch.ones(d))
        self.layer_scale_2 = nn.Parameter(1e-6 * torch.ones(d))

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.attn(x)
        return x + self.layer_scale_2[:, None, None] * self.mlp(x)


class RefConv2Former(nn.Module):
    def __init__(self, kernel_size, dims, depths, num_classes=1000):
        super().__init__()
        h = dims[0] // 2
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, h, 3, 2, 1, bias=False), nn.GELU(), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.GELU(), nn.BatchNorm2d(h),
            nn.Conv2d(h, dims[0], 2, 2, bias=False))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(RefLN(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[RefBlock(dims[i], kernel_size) for _ in range(depths[i])])
                                     for i in range(4)])
        self.head = nn.Sequential(nn.Conv2d(dims[-1], 1280, 1), nn.GELU(), RefLN(1280))
        self.pred = nn.Linear(1280, num_classes)

    def forward(self, x):
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.pred(self.head(x).mean([-2, -1]))


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Random values in every tensor (layer scales included), so that a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var") or "layer_scale" in name:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def cifar_model():
    torch.manual_seed(0)
    return mixlab.create_model("conv2former_n_cifar")


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
    macs = count_macs(model, mixlab.model_info(name).input_size)
    assert abs(macs - OFFICIAL[name][1]) / OFFICIAL[name][1] < 0.01, macs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_layout_equals_official(name):
    with torch.device("meta"):
        ours = mixlab.create_model(name).state_dict()
        ref = RefConv2Former(**CONFIGS[name]).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_seed_printed_count_cannot_come_from_its_code(cifar_model):
    """The docstring's argument: all weight sizes but the 10-element head bias are multiples of 64."""
    sizes = {n: p.numel() for n, p in cifar_model.named_parameters()}
    assert [n for n, s in sizes.items() if s % 64] == ["pred.bias"]
    assert sum(sizes.values()) % 64 == 10 and 8_847_978 % 64 == 42
    assert mixlab.model_info("conv2former_n_cifar").paper_figures["params"] == 8_847_978  # as the seed printed


def test_cifar_structure(cifar_model):
    m = cifar_model
    stem = m.downsample_layers[0][0]
    assert (stem.kernel_size, stem.stride, stem.in_channels, stem.out_channels) == ((1, 1), (1, 1), 3, 64)
    assert stem.bias is not None
    for i in range(1, 4):
        norm, conv = m.downsample_layers[i]
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
        assert conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.bias is None
    assert [len(s) for s in m.stages] == [2, 2, 8, 2]
    blk = m.stages[2][0]
    assert blk.attn.att[2].kernel_size == (11, 11) and blk.mlp.fc1.out_channels == 512
    assert blk.layer_scale_1 is None and not any("layer_scale" in k for k in m.state_dict())
    assert len(m.head) == 1 and m.head[0].eps == 1e-6 and m.pred.out_features == 10


# -- official checkpoints -----------------------------------------------------------------------------
def test_load_official_small_matches_reference_outputs(tmp_path):
    torch.manual_seed(0)
    ref = RefConv2Former(**SMALL, num_classes=7)
    _randomize(ref)
    ref.eval()
    sd = ref.state_dict()
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd}, path)

    model = Conv2Former(**SMALL, num_classes=7)
    mixlab.load_official(model, path)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_create_model_with_official_checkpoint(tmp_path):
    torch.manual_seed(1)
    ref = RefConv2Former(**CONFIGS["conv2former_n"])
    _randomize(ref, seed=1)
    ref.eval()
    path = tmp_path / "conv2former_n_official.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)  # DDP-wrapped
    model = mixlab.create_model("conv2former_n", checkpoint_path=str(path), official=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


# -- sizes (forward, backward and the timm API of every variant: tests/models/test_contract.py) --------
def test_size_errors(cifar_model):
    with pytest.raises(ValueError, match=r"multiples of 32 .*got 33x32"):
        mixlab.create_model("conv2former_n", img_size=(33, 32))
    with pytest.raises(ValueError, match=r"multiples of 32 .*got 48x64"):
        Conv2Former(**SMALL)(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"multiples of 8 .*got 36x36"):
        cifar_model(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match=r"multiples of 8"):
        cifar_model.forward_intermediates(torch.randn(1, 3, 0, 8))


def test_bad_kwargs():
    with pytest.raises(TypeError, match="does not take argument"):
        mixlab.create_model("conv2former_n_cifar", window_size=7)
    with pytest.raises(ValueError, match="stem must be one of"):
        Conv2Former(stem="patchify")
    with pytest.raises(ValueError, match="same length"):
        Conv2Former(depths=(1, 1, 1), dims=(8, 16, 32, 64))


# -- dense features ------------------------------------------------------------------------------------
def test_features_only_imagenet_stem():
    model = mixlab.create_model("conv2former_n", features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
        last = model.model.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert torch.equal(feats[-1], last)


def test_features_only_cifar_and_pruning():
    feats = timm.create_model("conv2former_n_cifar", features_only=True, out_indices=(0, 2)).eval()
    assert feats.feature_info.channels() == [64, 256]
    assert feats.feature_info.reduction() == [1, 4]
    with torch.no_grad():
        out = feats(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in out] == [(2, 64, 32, 32), (2, 256, 8, 8)]
    assert len(feats.model.stages) == 3  # the last stage and the head are not kept


def test_intermediates_match_feature_info(cifar_model):
    m = cifar_model.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        inter = m.forward_intermediates(x, intermediates_only=True)
    shapes = feature_shapes(m, (3, 32, 48))
    assert [s["shape"] for s in shapes] == [list(t.shape) for t in inter]
    assert [s["shape"] for s in shapes] == [[1, 64, 32, 48], [1, 128, 16, 24], [1, 256, 8, 12], [1, 512, 4, 6]]


# -- stochastic depth, layer scale, initialisation ---------------------------------------------------
def test_drop_path_and_layer_scale():
    with torch.device("meta"):
        model = mixlab.create_model("conv2former_t", drop_path_rate=0.2)
    blocks = [b for s in model.stages for b in s]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 21).tolist())
    small = Conv2Former(**SMALL)
    assert all(isinstance(b.drop_path, nn.Identity) for s in small.stages for b in s)  # default 0, as official
    assert all(torch.all(b.layer_scale_1 == 1e-6) and torch.all(b.layer_scale_2 == 1e-6)
               for s in small.stages for b in s)


def test_official_initialisation(cifar_model):
    torch.manual_seed(0)
    m = cifar_model
    assert m.stages[3][0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.stages[3][0].attn.v.weight.std().item() == pytest.approx(0.02, rel=0.03)
    m2 = Conv2Former(**SMALL)
    assert torch.all(m2.pred.bias == 0) and torch.all(m2.stages[0][0].attn.proj.bias == 0)
    assert torch.all(m2.downsample_layers[1][0].weight == 1)
