"""timm's model contract, held by every registered mixlab model.

Every mixlab name is an entrypoint in timm's registry, so users call timm's API on it:
``num_classes=0`` / ``global_pool=''``, ``reset_classifier``, ``features_only``,
``forward_intermediates``, FX feature extraction (torchvision's ``create_feature_extractor``, which
detection backbones use), TorchScript, ``device=``. These tests hold each name to the checks of timm's
own ``tests/test_models.py`` (timm 1.0.31), in mixlab's terms and at tiny sizes. The family test
files keep what is specific to a family (exact counts, equality with a reference implementation).

* Configuration (what timm reads from ``pretrained_cfg``, and the feature map it describes): every
  registered variant as it is, on the meta device (the 200M-parameter ones allocate nothing).
* Head, pooling and factory arguments (meta device), numerics (forward, backward, FX, TorchScript,
  features; real tensors): each name built small (``TINY``: fewer and narrower blocks, the
  variant's own layout options kept: patch, window, stem, build size) at the smallest input it
  takes. Names that alias one of timm's own networks unchanged (``timm_name``) get the
  configuration check only: test_baselines checks they are timm's model, and timm's CI runs the
  other checks on it; likewise the head and TorchScript checks skip the CIFAR forms that keep
  timm's head and classes (``OWN_HEAD``).

Exclusions, each mirroring one timm's test makes for the same kind of model:
``TOKEN_OUTPUT`` / ``DENSE_OUTPUT`` (timm's ``NON_STD_FILTERS``: models with token or spatial
output skip the pooling checks; token output also skips features_only, as timm's
``EXCLUDE_FEAT_FILTERS``), VGG's head (timm's ``EARLY_POOL_MODELS``: pooling before extra layers,
no ``global_pool=''``), ``NO_JIT`` (timm's ``EXCLUDE_JIT_FILTERS``). UNeXt's logits are a map,
(N, classes, H, W): where timm's backward test asserts ``(N, classes)`` this one asserts that.
"""
import fnmatch
import inspect
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models.vgg import VGG

import mixlab
from mixlab import create_model, model_info

NAMES = mixlab.list_models()
# names that are one of timm's own networks, unchanged, get the configuration check only (see the docstring)
REAL = [n for n in NAMES if model_info(n).timm_name is None]
# ... and the CIFAR forms whose adaptation only re-strides timm's network or swaps stem modules for
# plain nn.Conv2d / nn.Identity keep timm's head and timm's scripting (timm's CI scripts those
# classes): the head and TorchScript checks run where the head or the class is mixlab's
OWN_HEAD = [n for n in REAL if not model_info(n).family.startswith("baseline") or n.startswith(("googlenet", "vgg"))]

# timm's NON_STD_FILTERS 'vit_*', '*mixer_*', 'resmlp_*': token output (B, N, C), no pooling options, no
# features_only ('mixer_*' here: timm's '*mixer_*' would catch ConvMixer, a convolutional network)
TOKEN_OUTPUT = ["vit_*", "mixer_*", "resmlp_*"]
# timm's NON_STD_FILTERS category "spatial output": UNeXt segments, its output is a full-size map
DENSE_OUTPUT = ["unext*"]
# timm's EXCLUDE_JIT_FILTERS has 'densenet*' (its memory-efficient path is not scriptable)
NO_JIT = ["densenet*"]
# families with official weights whose state_dict keys mixlab keeps (the CIFAR forms have none)
OFFICIAL_FAMILIES = {"convmlp", "conv2former", "asmlp", "swin_mlp", "unext"}

# architecture arguments that make a variant small while keeping its layout options
TINY = {
    "convmixer": dict(dim=16, depth=5),  # 5 blocks: timm's five default feature levels
    "convmlp": dict(blocks=(1, 1, 1), dims=(16, 24, 32), channels=8, n_conv_blocks=1),
    # stochastic depth on, as the other families have it by default (Conv2Former's default is 0)
    "conv2former": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), drop_path_rate=0.1),
    "asmlp": dict(embed_dim=10, depths=(1, 1, 1, 1)),  # 10 channels: 5 shift groups of 2
    "swin_mlp": dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),  # 2: a shifted block each
    "unext": dict(dims=(4, 8, 8, 8, 8)),
}


def _matches(name, patterns):
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _real(name, **kwargs):
    """The name built small (``TINY``), with real weights."""
    torch.manual_seed(0)
    return create_model(name, **{**TINY.get(model_info(name).family, {}), **kwargs})


def _input(name, batch=2):
    """The smallest input the name takes (32 at least)."""
    info = model_info(name)
    size = 32
    if info.family == "swin_mlp":
        size = info.input_size[-1]  # the build size fixes the windows: its own size is the smallest
    elif name == "swin_tiny_cifar224":
        size = 224  # the Conv2Former seed's Swin-T comparison: built for its 224-pixel inputs
    elif name == "googlenet_imagenet":
        size = 64  # the ImageNet stem and five max-pools leave 2x2
    return torch.randn(batch, info.input_size[0], size, size, generator=torch.Generator().manual_seed(1))


def _meta(name, **kwargs):
    """The name on the meta device, built small (``TINY``) for mixlab's families."""
    return create_model(name, device="meta", **{**TINY.get(model_info(name).family, {}), **kwargs}).eval()


# -- configuration: every variant as registered, on the meta device ------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_has_what_timm_reads(name):
    info = model_info(name)
    model = create_model(name, device="meta").eval()
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == info.input_size and model.in_chans == cfg["input_size"][0]
    assert cfg["num_classes"] == model.num_classes == info.num_classes
    assert len(cfg["mean"]) == len(cfg["std"]) == 3 and cfg["interpolation"] and 0 < cfg["crop_pct"] <= 1
    state = model.state_dict()
    for key in ("first_conv", "classifier"):
        for module in (cfg[key],) if isinstance(cfg[key], str) else cfg[key]:
            assert f"{module}.weight" in state, f"{key} {module!r} has no weight in the model"

    # the features at the configured input: num_features channels on a pool_size map
    x = torch.zeros(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    fmt = getattr(model, "output_fmt", "NCHW")
    assert feats.shape[-1 if _matches(name, TOKEN_OUTPUT) else get_channel_dim(fmt)] == model.num_features > 0
    assert pre.shape[1] == model.head_hidden_size > 0
    if not _matches(name, TOKEN_OUTPUT + DENSE_OUTPUT):
        assert [feats.shape[i] for i in get_spatial_dim(fmt)] == list(cfg["pool_size"]), "pool_size is off"
        assert pre.dim() == 2


# -- head and factory arguments: the variant's code (built small for mixlab's families), meta device -----
@pytest.mark.parametrize("name", OWN_HEAD)
def test_head_pooling_and_classifier_reset(name):
    """timm's test_model_default_cfgs (test_model_default_cfgs_non_std for token/dense output)."""
    model = _meta(name)
    x = torch.zeros(1, *model.pretrained_cfg["input_size"], device="meta")
    dense, tokens = _matches(name, DENSE_OUTPUT), _matches(name, TOKEN_OUTPUT)
    pool_options = not (dense or tokens or isinstance(model, VGG))
    fmt = getattr(model, "output_fmt", "NCHW")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    spatial = [feats.shape[i] for i in get_spatial_dim(fmt)] if pool_options else None

    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    if pool_options:
        model.reset_classifier(0, "")  # no pooling: the map, as forward_features has it
        out = model(x)
        assert out.dim() == 4 and [out.shape[i] for i in get_spatial_dim(fmt)] == spatial

    # a new head lives where the model lives and keeps its mode
    model.to(dtype=torch.float64).train()
    model.reset_classifier(3)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.get_classifier().parameters())
    assert all(m.training for m in model.modules())

    # the constructor's num_classes=0 (and global_pool=''); frozen weights stay frozen through resets
    headless = _meta(name, num_classes=0)
    assert headless(x).shape == pre.shape
    headless.requires_grad_(False)
    if pool_options:
        headless.reset_classifier(0, "")
        unpooled = _meta(name, num_classes=0, global_pool="")(x)
        assert unpooled.shape == headless(x).shape and [unpooled.shape[i] for i in get_spatial_dim(fmt)] == spatial
    assert not any(p.requires_grad for p in headless.parameters())


@pytest.mark.parametrize("name", REAL)
def test_factory_arguments(name):
    model = _meta(name, dtype=torch.bfloat16)  # no device context: create_model's device= alone
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.zeros(1, *model.pretrained_cfg["input_size"], device="meta", dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)  # unknown arguments are not swallowed
    # reset_classifier(n) keeps the pooling
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None


# -- numerics: real tensors, tiny ------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL)
def test_forward_backward_reach_every_parameter(name):
    model = _real(name, num_classes=5).train()
    x = _input(name)
    out = model(x)
    if _matches(name, DENSE_OUTPUT):
        assert out.shape == (2, 5, *x.shape[-2:])
    else:
        assert out.shape == (2, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _fx(model):
    """Symbolic trace with timm's no-trace functions and modules as leaves, as timm's FX helpers do."""
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, qualname)

    tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()), param_shapes_constant=True)
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.mark.parametrize("name", REAL)
def test_fx_trace_computes_the_same_and_trains(name):
    model = _real(name).eval()
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(_fx(model)(x), model(x), rtol=1e-5, atol=1e-6)
    traced = _fx(model.train())
    traced(x).square().mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient through the FX graph: {missing[:5]}"


@pytest.mark.parametrize("name", [n for n in OWN_HEAD if not _matches(n, NO_JIT)])
def test_torchscript_computes_the_same(name):
    with timm.set_scriptable(True):
        model = _real(name).eval()
    x = _input(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        # 1e-5: UNeXt folds its BatchNorms into the convs in eval mode, except in TorchScript
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in REAL if not _matches(n, TOKEN_OUTPUT)])
def test_features_only_follow_feature_info(name):
    model = _real(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    x = _input(name, batch=1)
    with torch.no_grad():
        feats = model(x)
    fmt = getattr(model, "output_fmt", "NCHW")  # timm's Swin gives NHWC maps
    assert [f.shape[get_channel_dim(fmt)] for f in feats] == channels
    valid_padding = name.startswith("inception_v3")  # unpadded convs shrink maps below size / reduction
    for f, r in zip(feats, reductions):
        for got, size in zip([f.shape[i] for i in get_spatial_dim(fmt)], x.shape[-2:]):
            assert got <= math.ceil(size / r) + 1 and (valid_padding or got > size / (2 * r)), (f.shape, r)


@pytest.mark.parametrize("name", REAL)
def test_forward_intermediates_end_at_forward_features(name):
    model = _real(name).eval()
    if not hasattr(model, "forward_intermediates"):
        pytest.skip("no forward_intermediates (torchvision's GoogLeNet; features_only hooks feature_info)")
    x = _input(name, batch=1)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
        assert [t.shape[1] for t in taps] == info.channels()
        only = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert len(only) == 1 and torch.equal(only[0], taps[1])


@pytest.mark.parametrize("name", [n for n in REAL if model_info(n).family in OFFICIAL_FAMILIES])
def test_stopping_early_and_pruning_end_the_network_at_the_deepest_stage_kept(name):
    """timm's convention (its ConvNeXt, ResNet...), which mixlab's families share: with ``stop_early``
    the first item is the output of the deepest stage taken, without the final norm or (UNeXt) the
    decoder; a network pruned to a stage ends there and gives the features of the stages left."""
    model = _real(name).eval()
    x = _input(name, batch=1)

    def nchw(t):
        return t.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else t

    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        stopped, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert model.prune_intermediate_layers([1]) == [1]
        final, left = model.forward_intermediates(x)
        features = model.forward_features(x)
    assert torch.equal(nchw(stopped), taps[1]) and torch.equal(taken[0], taps[1])
    assert torch.equal(final, features) and torch.equal(nchw(final), taps[1])
    assert len(left) == 2 and torch.equal(left[0], taps[0]) and torch.equal(left[1], taps[1])


@pytest.mark.parametrize("name", [n for n in REAL if model_info(n).family in OFFICIAL_FAMILIES
                                  and not model_info(n).cifar])
def test_official_checkpoint_round_trip(name, tmp_path):
    """The model's own weights, saved as the official training scripts save them (DDP ``module.``
    keys in a ``{"model": ...}`` dict), load through ``official=True`` and compute the same."""
    model = _real(name).eval()
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = create_model(name, checkpoint_path=str(path), official=True,
                          **TINY[model_info(name).family]).eval()
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
