"""Starting from trained weights: a new head, resized position tables, a frozen backbone, refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

import mixlab
from mixlab import create_model
from mixlab.finetune import classifier_keys, init_from
from mixlab.train import rundir as rd

TINY_CONVMIXER = dict(dim=16, depth=1, kernel_size=3, patch_size=2)


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_ten_class_checkpoint_into_three_classes_keeps_the_backbone_and_makes_a_new_head(tmp_path, capsys):
    torch.manual_seed(0)
    ten = create_model("convmixer_256_8", num_classes=10, **TINY_CONVMIXER)
    path = _save(ten, tmp_path / "ten.safetensors")
    torch.manual_seed(1)
    fresh = create_model("convmixer_256_8", num_classes=3, **TINY_CONVMIXER)
    torch.manual_seed(1)
    three = create_model("convmixer_256_8", num_classes=3, checkpoint_path=str(path), **TINY_CONVMIXER)
    out = capsys.readouterr().out
    assert "2 left new" in out and "head.weight, head.bias" in out
    src, got, new = ten.state_dict(), three.state_dict(), fresh.state_dict()
    backbone = [k for k in got if not k.startswith("head.")]
    assert len(backbone) == len(got) - 2
    for k in backbone:
        assert torch.equal(got[k], src[k]), k
    # the head is the one the model was built with (same seed, no checkpoint), not the file's
    assert got["head.weight"].shape == (3, 16)
    assert torch.equal(got["head.weight"], new["head.weight"]) and torch.equal(got["head.bias"], new["head.bias"])


def test_report_lists_every_tensor_once(tmp_path):
    ten = create_model("convmixer_256_8", num_classes=10, **TINY_CONVMIXER)
    three = create_model("convmixer_256_8", num_classes=3, **TINY_CONVMIXER)
    r = init_from(three, _save(ten, tmp_path / "w.safetensors"), say=None)
    assert sorted(r.loaded + r.new) == sorted(three.state_dict())
    assert r.new == ["head.weight", "head.bias"] and r.resized == []
    same = init_from(create_model("convmixer_256_8", num_classes=10, **TINY_CONVMIXER),
                     tmp_path / "w.safetensors", say=None)
    assert same.new == [] and len(same.loaded) == len(ten.state_dict())
    # another data set with as many classes: the head is asked to be new
    torch.manual_seed(3)
    other = create_model("convmixer_256_8", num_classes=10, **TINY_CONVMIXER)
    head = other.head.weight.clone()
    r = init_from(other, tmp_path / "w.safetensors", new_classifier=True, say=None)
    assert r.new == ["head.weight", "head.bias"] and torch.equal(other.head.weight, head)
    assert torch.equal(other.stem[0].weight, ten.stem[0].weight)


def _fake_run(run_dir, model, name, weights: dict[str, torch.nn.Module]):
    run_dir.mkdir(parents=True)
    (run_dir / rd.CONFIG).write_text(yaml.safe_dump({"model": name, "num_classes": 10}))
    for file, m in weights.items():
        rd.save_weights(run_dir / file, m, name)


def test_a_run_directory_gives_best_then_last(tmp_path):
    torch.manual_seed(0)
    best = create_model("convmixer_256_8", **TINY_CONVMIXER)
    last = create_model("convmixer_256_8", **TINY_CONVMIXER)
    run = tmp_path / "run"
    _fake_run(run, None, "convmixer_256_8", {rd.BEST: best, rd.LAST: last})
    model = create_model("convmixer_256_8", num_classes=4, **TINY_CONVMIXER)
    r = init_from(model, run, say=None)
    assert r.source.endswith(rd.BEST) and "convmixer_256_8" in r.note
    assert torch.equal(model.stem[0].weight, best.stem[0].weight)
    (run / rd.BEST).unlink()
    init_from(model, run, say=None)
    assert torch.equal(model.stem[0].weight, last.stem[0].weight)
    (run / rd.LAST).unlink()
    with pytest.raises(FileNotFoundError, match="has no weights yet"):
        init_from(model, run, say=None)
    with pytest.raises(FileNotFoundError, match="not a mixlab run directory"):
        init_from(model, tmp_path, say=None)


def test_freeze_backbone_leaves_backbone_tensors_unchanged_after_a_step(tmp_path):
    from mixlab.train.optim import build_optimizer

    torch.manual_seed(0)
    src = create_model("convmixer_256_8", num_classes=10, **TINY_CONVMIXER)
    model = create_model("convmixer_256_8", num_classes=3, **TINY_CONVMIXER)
    r = init_from(model, _save(src, tmp_path / "w.safetensors"), freeze_backbone=True, say=None)
    assert r.trainable == ["head.weight", "head.bias"] and len(r.frozen) == len(list(model.parameters())) - 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, dict(name="adamw", lr=0.1, weight_decay=0.05, betas=[0.9, 0.999], eps=1e-8))
    model.train()
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16) * 3 + 1), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    # BatchNorm statistics (running mean/var, num_batches_tracked) stay as loaded too
    assert changed == ["head.bias", "head.weight"]
    assert model.training  # the model itself still trains: only its norm layers use stored statistics


def test_image_size_change_resamples_position_embeddings_as_timm(tmp_path, capsys):
    torch.manual_seed(0)
    small = create_model("vit_tiny_cifar", depth=1, num_classes=10)  # 32x32, patch 4: 8x8 grid
    path = _save(small, tmp_path / "vit.safetensors")
    big = create_model("vit_tiny_cifar", depth=1, num_classes=10, img_size=48, checkpoint_path=str(path))
    assert "resized pos_embed: (1, 65, 192) -> (1, 145, 192)" in capsys.readouterr().out
    old = small.pos_embed.detach()
    # independently: the class token's embedding kept, the 8x8 grid resampled bicubically to 12x12
    grid = old[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(12, 12), mode="bicubic", antialias=True, align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 144, 192)
    torch.testing.assert_close(big.pos_embed[:, :1].detach(), old[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(big.pos_embed[:, 1:].detach(), want, rtol=1e-5, atol=1e-6)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_window_change_resizes_swin_relative_tables(tmp_path):
    kw = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    small = create_model("swin_tiny_cifar", **kw)  # window 4
    r = init_from(create_model("swin_tiny_cifar", img_size=64, window_size=8, num_classes=5, **kw),
                  _save(small, tmp_path / "swin.safetensors"), say=None)
    resized = {k: (old, new) for k, old, new, _ in r.resized}
    assert resized["layers.0.blocks.0.attn.relative_position_bias_table"] == ((49, 1), (225, 1))
    assert all("relative_position_bias_table" in k for k in resized)
    assert r.new == ["head.fc.weight", "head.fc.bias"]


def test_token_mixing_of_another_size_is_refused_naming_it(tmp_path):
    small = create_model("mixer_s16_cifar", num_blocks=1, embed_dim=32)
    with pytest.raises(ValueError) as e:
        init_from(create_model("mixer_s16_cifar", num_blocks=1, embed_dim=32, img_size=48),
                  _save(small, tmp_path / "m.safetensors"), say=None)
    # the token-mixing MLP is sized by the number of tokens: 64 at 32x32, 144 at 48x48
    assert ("shape mismatch (3): blocks.0.mlp_tokens.fc1.weight: file (16, 64) vs model (16, 144)" in str(e.value)
            and "no resampling applies" in str(e.value))


def test_another_architecture_is_refused_with_the_key_diff(tmp_path):
    other = create_model("resnet18_cifar")
    model = create_model("convmixer_256_8", **TINY_CONVMIXER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        init_from(model, _save(other, tmp_path / "r.safetensors"), say=None)
    msg = str(e.value)
    n_model, n_file = len(model.state_dict()) - 2, len(other.state_dict())  # the model's head may differ
    assert "is not a checkpoint of this model (ConvMixer): 0 tensors match" in msg
    assert f"missing in the file ({n_model}): stem.0.weight" in msg
    assert f"not in the model ({n_file}): " in msg and "layer1.0.bn1" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    with pytest.raises(ValueError, match="ConvMixer"):
        create_model("convmixer_256_8", checkpoint_path=str(tmp_path / "r.safetensors"), **TINY_CONVMIXER)


def test_official_checkpoint_with_another_head(tmp_path, capsys):
    torch.manual_seed(0)
    official = create_model("convmlp_s")  # the official layout, 1000 classes (a torch state_dict file)
    path = tmp_path / "convmlp_s_imagenet.pth"
    torch.save(official.state_dict(), path)
    model = create_model("convmlp_s", num_classes=10, checkpoint_path=str(path), official=True)
    assert "head.weight, head.bias" in capsys.readouterr().out
    got, src = model.state_dict(), official.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in got if not k.startswith("head."))
    assert model.head.weight.shape == (10, official.head.weight.shape[1])


def test_every_model_names_its_classifier():
    for name in mixlab.list_models():
        with torch.device("meta"):
            model = create_model(name)
        keys = classifier_keys(model)
        assert keys and all(k.rsplit(".", 1)[-1] in ("weight", "bias") for k in keys), (name, keys)
