"""Swin-MLP: exact sizes and costs, official checkpoints, windows, features, sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.analysis.profile import count_macs, count_params

# (input, params, GMACs) of the official implementation, 1000 classes (issue 5)
OFFICIAL = {
    "swin_mlp_tiny_c24": (256, 20_386_632, 4.027),
    "swin_mlp_tiny_c12": (256, 21_152_072, 4.027),
    "swin_mlp_tiny_c6": (256, 22_682_952, 4.027),
    "swin_mlp_base": (224, 60_659_416, 10.412),
}
CONFIGS = {  # embed_dim, depths, heads, window (official configs / model hub)
    "swin_mlp_tiny_c24": (96, (2, 2, 6, 2), (4, 8, 16, 32), 8),
    "swin_mlp_tiny_c12": (96, (2, 2, 6, 2), (8, 16, 32, 64), 8),
    "swin_mlp_tiny_c6": (96, (2, 2, 6, 2), (16, 32, 64, 128), 8),
    "swin_mlp_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
}


def swin_mlp_param_count(img, embed_dim, depths, heads, window, num_classes=1000, patch=4, in_chans=3, mlp_ratio=4):
    """Parameters of Swin-MLP counted from its description, independently of any module."""
    total = in_chans * embed_dim * patch * patch + embed_dim + 2 * embed_dim  # patch conv + LayerNorm
    res = img // patch
    for i, depth in enumerate(depths):
        c = embed_dim * 2 ** i
        ws = min(res, window)  # a map no larger than the window is one window
        tokens = heads[i] * ws * ws
        hidden = int(c * mlp_ratio)
        block = (2 * c + tokens * ws * ws + tokens  # norm1 + grouped Conv1d (one ws^2 x ws^2 matrix per head)
                 + 2 * c + c * hidden + hidden + hidden * c + c)  # norm2 + channel MLP
        total += depth * block
        if i < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # merging: LayerNorm(4C) + linear 4C -> 2C, no bias
        res //= 2
    final = embed_dim * 2 ** (len(depths) - 1)
    return total + 2 * final + final * num_classes + num_classes


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_params_exact_and_macs_within_1_percent(name):
    img, params, gmacs = OFFICIAL[name]
    assert swin_mlp_param_count(img, *CONFIGS[name]) == params  # the formula agrees with the official count
    assert mixlab.model_info(name).input_size == (3, img, img)
    with torch.device("meta"):
        model = mixlab.create_model(name)
        macs = count_macs(model, (3, img, img))
    assert count_params(model)[0] == params
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01, macs


def test_cifar_form_params_windows_and_metadata():
    info = mixlab.model_info("swin_mlp_tiny_cifar")
    assert info.input_size == (3, 32, 32) and info.num_classes == 10 and "window 4" in info.cifar
    with torch.device("meta"):
        model = mixlab.create_model("swin_mlp_tiny_cifar")
    expected = swin_mlp_param_count(32, 96, (2, 2, 6, 2), (4, 8, 16, 32), 4, num_classes=10, patch=2)
    assert count_params(model)[0] == expected == 18_890_346
    assert model.stage_windows() == [4, 4, 4, 2]
    shifts = [[b.shift_size for b in stage.blocks] for stage in model.layers]
    assert shifts == [[0, 2], [0, 2], [0] * 6, [0, 0]]


# --------------------------------------------------------------------------------------------
# A faithful re-implementation of the official layout (microsoft/Swin-Transformer
# models/swin_mlp.py): tokens as (B, H*W, C), fixed input resolution per block. It produces
# state_dicts with the official key names and shapes, and reference outputs.


def ref_window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def ref_window_reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift):
        super().__init__()
        self.resolution, self.heads = resolution, heads
        if min(resolution) <= window:
            shift, window = 0, min(resolution)
        self.window, self.shift = window, shift
        self.padding = [window - shift, shift, window - shift, shift]
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_mlp = nn.Conv1d(heads * window ** 2, heads * window ** 2, kernel_size=1, groups=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x):
        h, w = self.resolution
        b, n, c = x.shape
        ws, nh = self.window, self.heads
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift > 0:
            pl, pr, pt, pb = self.padding
            x = F.pad(x, [0, 0, pl, pr, pt, pb], "constant", 0)
        _, hh, ww, _ = x.shape
        win = ref_window_partition(x, ws).view(-1, ws * ws, c)
        win = win.view(-1, ws * ws, nh, c // nh).transpose(1, 2).reshape(-1, nh * ws * ws, c // nh)
        win = self.spatial_mlp(win)
        win = win.view(-1, nh, ws * ws, c // nh).transpose(1, 2).reshape(-1, ws * ws, c)
        x = ref_window_reverse(win.reshape(-1, ws, ws, c), ws, hh, ww)
        if self.shift > 0:
            pl, pr, pt, pb = self.padding
            x = x[:, pt:-pb, pl:-pr, :].contiguous()
        x = shortcut + x.view(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class RefMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class RefLayer(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([
            RefBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)])
        self.downsample = RefMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class RefSwinMLP(nn.Module):
    def __init__(self, img_size, patch_size=4, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7):
        super().__init__()
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = RefPatchEmbed(patch_size, 3, embed_dim)
        self.layers = nn.ModuleList([
            RefLayer(embed_dim * 2 ** i, (grid[0] // 2 ** i, grid[1] // 2 ** i), d, num_heads[i], window_size,
                     i < len(depths) - 1)
            for i, d in enumerate(depths)])
        nf = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(nf)
        self.head = nn.Linear(nf, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(torch.flatten(F.adaptive_avg_pool1d(x.transpose(1, 2), 1), 1))


def _randomised(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return module.eval()


# 96x96, patch 4, window 3: maps 24/12/6/3, windows 3 shifted by 1 in stages 1-3 (padding 2 on
# the top/left and 1 on the bottom/right: an odd window makes the padding asymmetric, so its
# orientation is tested), one 3x3 window in stage 4; (96, 192) also checks non-square maps.
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=3, num_classes=7)


@pytest.mark.parametrize("img_size", [(96, 96), (96, 192)])
def test_official_state_dict_loads_strictly_and_matches(tmp_path, img_size):
    ref = _randomised(RefSwinMLP(img_size, **TINY), seed=2)
    sd = ref.state_dict()
    path = tmp_path / "swin_mlp_official.pth"
    torch.save({"model": sd, "epoch": 300}, path)  # layout of the official checkpoints
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=img_size, checkpoint_path=str(path), official=True,
                                **TINY).eval()
    assert set(model.state_dict()) == set(sd)
    x = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_official_load_rejects_mismatched_checkpoints():
    sd = RefSwinMLP((96, 96), **TINY).state_dict()
    # 8 heads instead of 16 in stage 4: another spatial MLP shape
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, **dict(TINY, num_heads=(2, 4, 8, 8)))
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlab.load_official(model, sd)
    sd.pop("layers.0.blocks.1.spatial_mlp.bias")
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, **TINY)
    with pytest.raises(ValueError, match=r"missing in the file \(1\): layers.0.blocks.1.spatial_mlp.bias"):
        mixlab.load_official(model, sd)


def test_larger_admissible_input_runs_the_same_weights_windowwise():
    # a model built for 96 takes 192x288 (every stage map stays a multiple of its window)
    torch.manual_seed(0)
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, **TINY).eval()
    assert model.input_multiple() == 96
    with torch.no_grad():
        assert model(torch.randn(1, 3, 192, 288)).shape == (1, 7)


# --------------------------------------------------------------------------------------------
# sizes and features


def test_input_size_constraints():
    with pytest.raises(ValueError, match="multiples of 896, got 224x224"):
        mixlab.create_model("swin_mlp_tiny_c24", img_size=224)  # 7x7 last stage, 8x8 windows earlier
    with pytest.raises(ValueError, match="multiples of 224, got 256x256"):
        mixlab.create_model("swin_mlp_base", img_size=256)
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, **TINY)
    with pytest.raises(ValueError, match="multiples of 96, got 144x96"):
        model(torch.randn(1, 3, 144, 96))
    with torch.device("meta"):
        cifar = mixlab.create_model("swin_mlp_tiny_cifar")
        with pytest.raises(ValueError, match="multiples of 32, got 48x48"):
            cifar(torch.zeros(1, 3, 48, 48))
    # built for 48 instead, its last stage (3x3) is one 3x3 window: 96 is the smallest size it takes
    with pytest.raises(ValueError, match=r"windows \(4, 4, 4, 3\) per stage\) needs height and width that are "
                                         r"multiples of 96, got 48x48"):
        mixlab.create_model("swin_mlp_tiny_cifar", img_size=48)


def test_features_only_shapes_and_info():
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, features_only=True, **TINY)
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(2, 3, 96, 192))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 24, 48), (2, 32, 12, 24), (2, 64, 6, 12), (2, 128, 3, 6)]
    some = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, features_only=True, out_indices=(0, 3), **TINY)
    assert [tuple(f.shape) for f in some(torch.randn(1, 3, 96, 96))] == [(1, 16, 24, 24), (1, 128, 3, 3)]


def test_features_match_stage_outputs_of_the_classifier():
    torch.manual_seed(0)
    model = mixlab.create_model("swin_mlp_tiny_c24", img_size=96, **TINY).eval()
    x = torch.randn(1, 3, 96, 96)
    seen = []
    hooks = [model.layers[i].blocks.register_forward_hook(lambda m, i, o: seen.append(o)) for i in range(4)]
    with torch.no_grad():
        model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    for a, b in zip(feats, seen):
        assert torch.equal(a, b.permute(0, 3, 1, 2))
