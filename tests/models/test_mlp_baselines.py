"""MLP-Mixer, ResMLP, ResNet-34 and the Conv2Former seed's Swin-T: exact sizes, computed independently."""
from __future__ import annotations

import pytest
import timm
import torch

from mixlab import create_model, model_info
from mixlab.models.mlp_baselines import MLP_BASELINES


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _mixer(dim, blocks, tokens, patch, classes):
    """MLP-Mixer from the paper's description: patch embedding, per block two LayerNorms, a token MLP
    (tokens -> dim/2 -> tokens) and a channel MLP (dim -> 4 dim -> dim), a final LayerNorm, a linear head."""
    token_hidden, channel_hidden = dim // 2, 4 * dim
    block = (2 * 2 * dim + tokens * token_hidden + token_hidden + token_hidden * tokens + tokens
             + dim * channel_hidden + channel_hidden + channel_hidden * dim + dim)
    return 3 * patch * patch * dim + dim + blocks * block + 2 * dim + dim * classes + classes


def _resmlp(dim, blocks, tokens, patch, classes):
    """ResMLP: per block two Affine layers (alpha, beta), a linear token mixer (tokens x tokens), a channel
    MLP (dim -> 4 dim -> dim) and two LayerScale vectors; a final Affine; a linear head."""
    block = 2 * 2 * dim + tokens * tokens + tokens + dim * 4 * dim + 4 * dim + 4 * dim * dim + dim + 2 * dim
    return 3 * patch * patch * dim + dim + blocks * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("name, want", [
    ("mixer_s16_cifar", _mixer(512, 8, 64, 4, 10)), ("mixer_b16_cifar", _mixer(768, 12, 64, 4, 10)),
    ("resmlp_12_cifar", _resmlp(384, 12, 64, 4, 10)), ("resmlp_24_cifar", _resmlp(384, 24, 64, 4, 10)),
    ("mixer_s16_imagenet", _mixer(512, 8, 196, 16, 1000)), ("mixer_b16_imagenet", _mixer(768, 12, 196, 16, 1000)),
    ("resmlp_12_imagenet", _resmlp(384, 12, 196, 16, 1000)), ("resmlp_24_imagenet", _resmlp(384, 24, 196, 16, 1000)),
])
def test_mlp_parameter_counts(name, want):
    with torch.device("meta"):
        assert _params(create_model(name)) == want


def test_paper_sizes_of_the_imagenet_forms():
    # the papers' rounded figures: Mixer-S/16 18M, Mixer-B/16 59M, ResMLP-12 15M, ResMLP-24 30M
    for name, millions in (("mixer_s16_imagenet", 18), ("mixer_b16_imagenet", 59), ("resmlp_12_imagenet", 15),
                           ("resmlp_24_imagenet", 30)):
        with torch.device("meta"):
            assert int(_params(create_model(name)) / 1e6) == millions, name  # the papers truncate


@pytest.mark.parametrize("b", MLP_BASELINES, ids=lambda b: b.name)
def test_cifar_entry_repeats_timms_variant(b):
    with torch.device("meta"):
        ours, theirs = b.entry(), timm.create_model(b.timm_name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]


def _resnet_basic(layers, classes, stem_kernel):
    """A ResNet of basic blocks: stem conv + BN, per block two 3x3 convs + BNs, a 1x1 conv + BN shortcut where
    the width or stride changes, a linear head."""
    total = 3 * 64 * stem_kernel ** 2 + 2 * 64
    cin = 64
    for i, n in enumerate(layers):
        w = 64 * 2 ** i
        for j in range(n):
            total += cin * w * 9 + 2 * w + w * w * 9 + 2 * w
            if j == 0 and (cin != w):
                total += cin * w + 2 * w
            cin = w
    return total + 512 * classes + classes


def test_resnet34_sizes():
    assert _params(create_model("resnet34_cifar")) == _resnet_basic((3, 4, 6, 3), 10, 3) == 21_282_122
    with torch.device("meta"):
        assert _params(create_model("resnet34_imagenet")) == _resnet_basic((3, 4, 6, 3), 1000, 7) == 21_797_672
    assert create_model("resnet34_cifar")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_swin_t_of_the_conv2former_seed():
    with torch.device("meta"):
        model = create_model("swin_tiny_cifar224")
        timms = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10)
    assert _params(model) == 27_527_044 == _params(timms)  # the seed's printed count
    info = model_info("swin_tiny_cifar224")
    assert info.input_size == (3, 224, 224) and info.num_classes == 10 and "resized to 224" in info.cifar
    assert model.pretrained_cfg["num_classes"] == 10
    with pytest.raises(ValueError, match="no hosted weights"):
        create_model("swin_tiny_cifar224", pretrained=True)
