"""The registry: names, arguments and timm integration (every name built and trained a step: test_contract)."""
from __future__ import annotations

import pytest
import timm
import torch

import mixlab
from mixlab import create_model, list_models, model_info

ALL = list_models()


def test_registry_is_populated():
    assert "convmixer_256_8" in ALL
    assert len(ALL) == len(set(ALL))


def test_takes_img_size_names_the_models_whose_layout_depends_on_the_input_size():
    from mixlab.registry import takes_img_size

    sized = {n for n in ALL if takes_img_size(n)}
    assert sized == {n for n in ALL if model_info(n).family in ("asmlp", "swin_mlp", "baseline-vit", "baseline-mlp")}
    assert "vit_tiny_cifar" in sized and "convmixer_256_8" not in sized and "unext" not in sized


# every name building, training a step and meeting timm's model contract: tests/models/test_contract.py


def test_convmixer_256_8_param_count_from_the_architecture():
    h, depth, k, p, classes = 256, 8, 5, 2, 10
    conv = lambda cin, cout, ks, groups=1: cout * (cin // groups) * ks * ks + cout  # noqa: E731  weights + bias
    bn = 2 * h  # weight + bias (running stats are buffers, not parameters)
    stem = conv(3, h, p) + bn
    block = conv(h, h, k, groups=h) + bn + conv(h, h, 1) + bn
    head = h * classes + classes
    expected = stem + depth * block + head
    assert expected == 594_186  # the figure the training issue quotes for the seed's model
    model = create_model("convmixer_256_8")
    assert sum(q.numel() for q in model.parameters()) == expected


@pytest.mark.parametrize("name,params", [
    ("convmixer_768_32_k7_p7", 21.1e6), ("convmixer_1024_20_k9_p14", 24.4e6), ("convmixer_1536_20_k9_p7", 51.6e6)])
def test_convmixer_imagenet_models_match_the_paper(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(q.numel() for q in model.parameters()) / 1e6, 1) == params / 1e6


def test_kernel_and_patch_size_override():
    model = create_model("convmixer_256_8", kernel_size=9, patch_size=1)
    assert model.stem[0].kernel_size == (1, 1) and model.stem[0].stride == (1, 1)
    assert model.blocks[0][0].fn[0].kernel_size == (9, 9)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="convmixer_256_8"):
        create_model("convmixer_256")


def test_bad_argument_is_named():
    with pytest.raises(TypeError, match="kernal_size"):
        create_model("convmixer_256_8", kernal_size=3)


def test_timm_create_model_knows_mixlab_names():
    model = timm.create_model("convmixer_256_8", num_classes=7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_model("convmixer_256_8", pretrained=True)


def test_checkpoint_path_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    a = create_model("convmixer_256_8", dim=16, depth=1)
    save_file(a.state_dict(), str(tmp_path / "w.safetensors"))
    b = create_model("convmixer_256_8", dim=16, depth=1, checkpoint_path=str(tmp_path / "w.safetensors"))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = create_model("convmixer_256_8", dim=32, depth=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlab.load_weights(c, tmp_path / "w.safetensors")


def test_pickled_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="never runs code from a file to read it") as e:
        mixlab.load_weights(create_model("convmixer_256_8"), path)
    assert str(path) in str(e.value) and "safe_globals" not in str(e.value)


def test_list_models_pattern():
    assert list_models("convmixer_*") == sorted(n for n in ALL if n.startswith("convmixer_"))
    assert "convmixer_256_8" in list_models("256")
