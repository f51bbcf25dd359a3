"""The seeds' comparison networks that timm has: MLP-Mixer, ResMLP, and the Conv2Former seed's Swin-T.

As in :mod:`mixlab.models.baselines`, nothing is rewritten: each is timm's network under a
mixlab name, in an ``_imagenet`` form (an alias of timm's entrypoint) and a ``_cifar`` form.

* MLP-Mixer (Tolstikhin et al.; the ConvMixer, ConvMLP and AS-MLP papers compare against
  Mixer-B/16, Mixer-S/16 is the small one a 2-core machine can train) and ResMLP (Touvron et
  al.; ConvMLP and AS-MLP compare against ResMLP-12/24). CIFAR forms: timm's own options,
  ``img_size=32, patch_size=4``, so a 32x32 image becomes 8x8 = 64 tokens (a 16x16 patch would
  leave 4). Widths and depths are the ImageNet variant's; only the token-mixing layers, whose
  size is the number of tokens, are smaller (64 instead of 196 tokens).
* ``swin_tiny_cifar224``: the Swin-T the Conv2Former seed compares against on CIFAR-10, which
  is timm's Swin-T at 224x224 with a 10-class head (27,527,044 parameters, the seed's printed
  count) on CIFAR images resized to 224. No architectural change; the recipe
  ``seed-conv2former-swin-t`` trains it with the seed's pipeline.
"""
from __future__ import annotations

from timm.models._registry import generate_default_cfgs, get_pretrained_cfg
from functools import partial

from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, _create_mixer
from timm.models.swin_transformer import SwinTransformer, swin_tiny_patch4_window7_224

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..registry import register_model
from .baselines import Baseline, _pretrained_cfg_of, _register

__all__ = ["MLP_BASELINES"]

MLP = "baseline-mlp"
_MIXER_PAPER = "MLP-Mixer: An all-MLP Architecture for Vision (Tolstikhin et al., NeurIPS 2021)"
_RESMLP_PAPER = ("ResMLP: Feedforward networks for image classification with data-efficient training "
                 "(Touvron et al., TPAMI 2022)")
_TOKENS_CIFAR = ("timm options: img_size=32, patch_size=4 (8x8 = 64 tokens; the token-mixing layers are sized "
                 "for 64 tokens instead of 196); widths and depth as the ImageNet variant")



def _entry(timm_name: str, **arch):
    """timm's entrypoint ``timm_name`` with its architecture arguments overridable: timm's own
    entrypoints fix ``patch_size``, which the CIFAR forms change. ``arch`` repeats timm's
    arguments for the variant; the tests check the result against timm's entrypoint."""

    def entry(pretrained=False, **kwargs):
        return _create_mixer(timm_name, pretrained=pretrained, **{**arch, **kwargs})

    entry.__name__ = f"{timm_name}_entry"
    return entry


_RESMLP = dict(patch_size=16, embed_dim=384, mlp_ratio=4, norm_layer=Affine)
MLP_BASELINES: tuple[Baseline, ...] = (
    Baseline("mixer_s16", "Mixer-S/16", MLP, _MIXER_PAPER, MlpMixer,
             _entry("mixer_s16_224", patch_size=16, num_blocks=8, embed_dim=512), "mixer_s16_224",
             _TOKENS_CIFAR, cifar_kwargs=dict(img_size=32, patch_size=4),
             paper_figures=dict(params=18e6)),
    Baseline("mixer_b16", "Mixer-B/16", MLP, _MIXER_PAPER, MlpMixer,
             _entry("mixer_b16_224", patch_size=16, num_blocks=12, embed_dim=768), "mixer_b16_224",
             _TOKENS_CIFAR, cifar_kwargs=dict(img_size=32, patch_size=4),
             paper_figures=dict(params=59e6, macs=12.6e9, top1=76.4)),
    Baseline("resmlp_12", "ResMLP-12", MLP, _RESMLP_PAPER, MlpMixer,
             _entry("resmlp_12_224", num_blocks=12, block_layer=ResBlock, **_RESMLP), "resmlp_12_224",
             _TOKENS_CIFAR, cifar_kwargs=dict(img_size=32, patch_size=4),
             paper_figures=dict(params=15e6, macs=3.0e9, top1=76.6)),
    Baseline("resmlp_24", "ResMLP-24", MLP, _RESMLP_PAPER, MlpMixer,
             _entry("resmlp_24_224", num_blocks=24, block_layer=partial(ResBlock, init_values=1e-5), **_RESMLP),
             "resmlp_24_224", _TOKENS_CIFAR, cifar_kwargs=dict(img_size=32, patch_size=4),
             paper_figures=dict(params=30e6, macs=6.0e9, top1=79.4)),
)

_SWIN_PAPER = "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., ICCV 2021)"
SWIN_CIFAR224 = ("no architectural change: timm's Swin-T (patch 4, window 7) at 224x224 with a 10-class head, "
                 "the Conv2Former seed's comparison network; CIFAR images are resized to 224 (data.resize: 224)")

# timm reads an entrypoint's pretrained config from its module's default_cfgs when it is registered
default_cfgs = generate_default_cfgs({
    **{f"{b.name}_cifar": _pretrained_cfg_of(b, cifar=True) for b in MLP_BASELINES},
    "swin_tiny_cifar224": dict(input_size=(3, 224, 224), num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               crop_pct=1.0, interpolation="bilinear", first_conv="patch_embed.proj",
                               classifier="head.fc", fixed_input_size=True, pool_size=(7, 7),  # 224 / 32
                               paper_name=_SWIN_PAPER),
})

for _b in MLP_BASELINES:
    _register(_b, __name__)
del _b


@register_model(family="baseline-vit", paper=_SWIN_PAPER, model_cls=SwinTransformer, input_size=(3, 224, 224),
                num_classes=10, cifar=SWIN_CIFAR224, paper_figures=dict(params=27_527_044))
def swin_tiny_cifar224(pretrained=False, **kwargs):
    """Swin-T at 224x224 with 10 classes, the Conv2Former seed's CIFAR-10 comparison network (timm's
    ``swin_tiny_patch4_window7_224``; CIFAR images resized to 224)."""
    if pretrained:
        raise ValueError("swin_tiny_cifar224 has no hosted weights; start it from ImageNet weights with "
                         "checkpoint_path=FILE (the classifier is re-created for 10 classes)")
    kwargs.setdefault("num_classes", 10)
    if not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = get_pretrained_cfg("swin_tiny_cifar224").to_dict()
    return swin_tiny_patch4_window7_224(pretrained=False, **kwargs)
