"""The transfer recipe (ConvMLP's official fine-tune config) and the Conv2Former seed's Swin-T recipe."""
from __future__ import annotations

from importlib import resources

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mixlab import create_model
from mixlab.train.config import DEFAULTS, resolve_config

# Written from SHI-Labs/Convolutional-MLPs configs/classification/finetuned/convmlp_s_cifar10.yml, not from
# the recipe: img_size 224, CIFAR mean/std, epochs 50, warmup 10, lr 3e-4, min_lr 1e-5, cosine, adamw, wd 0.05,
# smoothing 0.1, batch 128, hflip 0.5, scale 0.8-1, ratio 3/4-4/3, reprob 0.25 pixel, mixup 0.8, cutmix 1.0,
# mixup_prob 1.0, aa rand-m9 (timm: 2 ops), model convmlp_s_classification with pretrained weights.
CONVMLP_TRANSFER = {
    "model": "convmlp_s", "init": None, "freeze_backbone": False, "epochs": 50, "batch_size": 128,
    "data.resize": 224, "data.mean": [0.4914, 0.4822, 0.4465], "data.std": [0.2470, 0.2435, 0.2616],
    "optimizer.name": "adamw", "optimizer.lr": 3e-4, "optimizer.weight_decay": 0.05,
    "schedule.name": "cosine", "schedule.warmup_epochs": 10, "schedule.min_lr": 1e-5,
    "loss.label_smoothing": 0.1, "augment.hflip": 0.5, "augment.rrc_scale": [0.8, 1.0],
    "augment.rrc_ratio": [0.75, 4 / 3], "augment.random_erasing": 0.25, "augment.erasing_mode": "noise",
    "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0, "augment.mix_prob": 1.0,
    "augment.randaugment_n": 2, "augment.randaugment_m": 9, "augment.crop_padding": 0,
}


def _recipe(name: str) -> dict:
    return yaml.safe_load((resources.files("mixlab") / "recipes" / f"{name}.yaml").read_text())


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_transfer_recipe_is_the_official_finetune_config():
    r = _recipe("convmlp-transfer-cifar10")
    wrong = {k: (_get(r, k), v) for k, v in CONVMLP_TRANSFER.items() if _get(r, k) != pytest.approx(v)}
    assert not wrong, f"recipe differs from the official config (recipe, official): {wrong}"
    assert "98.0%" in r["description"] and "8.51M" in r["description"]
    # the official ConvMLP-S with a 10-class head has the 8.51M parameters the official README lists
    with torch.device("meta"):
        assert int(sum(p.numel() for p in create_model("convmlp_s", num_classes=10).parameters()) / 1e4) == 851


def test_swin_t_recipe_is_the_conv2former_seed_pipeline_with_its_swin():
    swin, c2f = resolve_config(recipe="seed-conv2former-swin-t"), resolve_config(recipe="seed-conv2former-cifar")
    assert swin["model"] == "swin_tiny_cifar224" and swin["data"]["resize"] == 224
    for key in ("epochs", "batch_size", "drop_last", "optimizer", "schedule", "loss", "augment", "drop_path_rate",
                "select"):
        assert swin[key] == c2f[key], key
    assert {k: v for k, v in swin["data"].items() if k != "resize"} == {k: v for k, v in c2f["data"].items()
                                                                         if k != "resize"}


def test_transfer_recipe_end_to_end_from_a_local_checkpoint(make_folder_dataset, tmp_path):
    """CI-sized: a 1000-class ConvMLP checkpoint made here, the recipe at 16x16 on a 3-class folder for one epoch
    with the backbone frozen: the backbone the run starts from (and keeps) is the checkpoint's."""
    from mixlab.cli import main

    small = dict(blocks=(1, 1, 1), dims=(16, 24, 32), channels=8, n_conv_blocks=1)
    torch.manual_seed(123)  # not the run's seed: a run that ignored `init` would start elsewhere
    src = create_model("convmlp_s", **small)
    ckpt = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ckpt))
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    out = tmp_path / "run"
    kwargs = ",".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in small.items())
    assert main(["train", "--recipe", "convmlp-transfer-cifar10", "--dataset", "folder", "--data", str(data),
                 "--model-kwargs", kwargs.replace(" ", ""), "--epochs", "1", "--batch-size", "8",
                 "--init", str(ckpt), "--freeze-backbone", "--set", "data.resize=16", "--set", "progress=false",
                 "--set", "schedule.warmup_epochs=0",
                 "--precision", "fp32", "--out", str(out)]) == 0
    last, want = load_file(str(out / "last.safetensors")), src.state_dict()
    assert last["head.weight"].shape[0] == 3
    convs = [k for k in want if k.endswith(".weight") and want[k].ndim == 4]
    assert convs and all(torch.equal(last[k], want[k]) for k in convs)
