"""The seed recipes against the seeds' own scripts, and TensorFlow Addons' AdamW."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import mixlab
from mixlab.train import rundir as rd
from mixlab.train.config import evaluation_protocol, resolve_config
from mixlab.train.optim import AdamWAbsoluteDecay
from mixlab.train.optim import build_optimizer
from mixlab.tasks import get_task

# Written from the seeds' scripts, not from the recipes.
# The ConvMixer Keras seed (keras.io "Image classification with ConvMixer"):
#   learning_rate = 0.001, weight_decay = 0.0001, batch_size = 128, num_epochs = 10, val_split = 0.1
#   tfa.optimizers.AdamW(learning_rate=0.001, weight_decay=0.0001)   (Keras Adam: betas 0.9/0.999, epsilon 1e-7)
#   layers.Rescaling(scale=1.0 / 255); layers.BatchNormalization()   (momentum 0.99, epsilon 1e-3)
#   RandomCrop(32, 32) + RandomFlip("horizontal") on 32x32 images; ModelCheckpoint(monitor="val_accuracy")
#   dataset.shuffle(batch_size * 10) over the stored arrays, then dataset.batch(batch_size) (no drop_remainder)
#   x_val = x_train[:val_indices]: the first 10% of keras.datasets' arrays (the python release's order)
KERAS_SEED = {
    "model": "convmixer_256_8", "epochs": 10, "batch_size": 128,
    "optimizer.name": "adamw_tfa", "optimizer.lr": 0.001, "optimizer.weight_decay": 0.0001,
    "optimizer.betas": [0.9, 0.999], "optimizer.eps": 1e-7, "schedule.name": "constant",
    "data.val_split": 0.1, "data.mean": [0.0, 0.0, 0.0], "data.std": [1.0, 1.0, 1.0],
    # torch's momentum weighs the new batch: 1 - 0.99; Keras' Glorot-uniform init, zero biases
    "model_kwargs": {"bn_momentum": 0.01, "bn_eps": 1e-3, "init": "keras"},
    "augment.crop_padding": 0, "augment.hflip": 0.5, "augment.mixup_alpha": 0.0, "augment.random_erasing": 0.0,
    "augment.color_jitter": 0.0, "loss.label_smoothing": 0.0, "select": "best_val", "drop_last": False,
    "shuffle_buffer": 1280, "data.val_holdout": "first_or_random",
}
# The Conv2Former Paddle seed: Adam(lr 1e-3, weight_decay 1e-5), CosineAnnealing over 50 epochs, batch 256,
# CrossEntropyLoss(label_smoothing=0.1), drop_path 0.1; ColorJitter(0.2, 0.2, 0.2), MixupImage (a no-op on
# single samples), RandomResizedCrop(32, scale=(0.6, 1.0)), RandomErasing() (p 0.5, fill 0), flip, RandomRotation(20),
# Normalize(ImageNet mean/std); trained on all 50,000 images, the test set as "val", best "val" kept.
CONV2FORMER_SEED = {
    "model": "conv2former_n_cifar", "epochs": 50, "batch_size": 256, "drop_last": True,
    "optimizer.name": "adam", "optimizer.lr": 0.001, "optimizer.weight_decay": 1e-5, "schedule.name": "cosine",
    "loss.label_smoothing": 0.1, "drop_path_rate": 0.1,
    "augment.color_jitter": 0.2, "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0,
    "augment.rrc_scale": [0.6, 1.0], "augment.random_erasing": 0.5, "augment.erasing_mode": "zero",
    "augment.hflip": 0.5, "augment.rotate": 20, "augment.crop_padding": 0,
    "data.mean": [0.485, 0.456, 0.406], "data.std": [0.229, 0.224, 0.225], "data.val_holdout": "test",
    "select": "best_val",
}


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("recipe, table", [("seed-convmixer-keras", KERAS_SEED),
                                           ("seed-conv2former-cifar", CONV2FORMER_SEED)])
def test_recipe_settings_are_the_seeds(recipe, table):
    cfg = resolve_config(recipe=recipe)
    wrong = {k: (_get(cfg, k), want) for k, want in table.items() if _get(cfg, k) != want}
    assert not wrong, f"recipe differs from the seed (recipe, seed): {wrong}"


def test_protocols_are_named():
    keras = evaluation_protocol(resolve_config(recipe="seed-convmixer-keras"))
    assert keras["selected_on_test"] is False and "10% of train held out" in keras["protocol"]
    c2f = resolve_config(recipe="seed-conv2former-cifar")
    assert evaluation_protocol(c2f)["selected_on_test"] is True
    assert "selected on the test set" in c2f["description"]
    # without best-val selection the test set only monitors
    assert evaluation_protocol({**c2f, "select": "last"})["selected_on_test"] is False


def test_keras_recipe_model_has_keras_batchnorm_and_the_seed_size():
    cfg = resolve_config(recipe="seed-convmixer-keras")
    with torch.device("meta"):
        model = get_task("classification").build_model({**cfg, "num_classes": 10, "img_size": 32})
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 8
    assert all(m.momentum == pytest.approx(0.01) and m.eps == pytest.approx(1e-3) for m in bns)
    assert sum(p.numel() for p in model.parameters()) == 594_186
    # in torch's convention momentum weighs the new batch: one training step moves running_mean by 1%
    small = mixlab.create_model("convmixer_256_8", dim=4, depth=1, bn_momentum=0.01, bn_eps=1e-3).train()
    x = torch.randn(2, 3, 8, 8)
    bn = small.stem[2]
    with torch.no_grad():
        batch_mean = small.stem[1](small.stem[0](x)).mean(dim=(0, 2, 3))
        small(x)
    torch.testing.assert_close(bn.running_mean, 0.01 * batch_mean)
    with pytest.raises(ValueError, match="bn_momentum"):
        mixlab.create_model("convmixer_256_8", bn_momentum=1.5)


def test_another_model_with_the_keras_recipe_leaves_its_model_kwargs_out():
    cfg = resolve_config(model="resnet18_cifar", recipe="seed-convmixer-keras")
    assert cfg["model_kwargs"] == {} and cfg["optimizer"]["name"] == "adamw_tfa"
    with torch.device("meta"):
        get_task("classification").build_model({**cfg, "num_classes": 10, "img_size": 32})  # builds: no bn_momentum passed to ResNet


# ----------------------------------------------------------------------------- TensorFlow Addons' AdamW

def test_one_zero_gradient_step_scales_every_parameter_by_1_minus_1e4():
    torch.manual_seed(0)
    cfg = resolve_config(recipe="seed-convmixer-keras")
    model = mixlab.create_model("convmixer_256_8", dim=8, depth=1, **cfg["model_kwargs"])
    with torch.no_grad():
        for m in model.modules():  # BatchNorm starts at weight 1, bias 0: make its decay visible
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    torch_model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg["optimizer"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # tfa decays every trainable variable (the seed gives no exclude list): conv and linear
    # weights and biases, BatchNorm weights and biases
    names = [n for n, _ in model.named_parameters()]
    assert {"stem.0.bias", "stem.2.weight", "stem.2.bias", "head.weight", "head.bias"} <= set(names)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n] * (1 - 1e-4)), n
    # torch's AdamW with the same two numbers decays by lr * wd = 1e-7 per step
    t_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, weight_decay=1e-4)
    for p in torch_model.parameters():
        p.grad = torch.zeros_like(p)
    t_opt.step()
    w0, w_torch = before["head.weight"], torch_model.head.weight.detach()
    torch.testing.assert_close(w_torch, w0 * (1 - 1e-7))
    assert not torch.allclose(w_torch, model.head.weight.detach(), rtol=1e-6, atol=0)


def test_decay_comes_before_adams_update_and_ignores_the_learning_rate():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    g = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    opt = AdamWAbsoluteDecay([p], lr=0.01, weight_decay=0.1, eps=1e-8)
    p0 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    # Keras' Adam's first step moves by lr * sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps) with
    # m = (1 - b1) g, v = (1 - b2) g^2, i.e. lr * g / (|g| + eps / sqrt(1 - b2)); tfa decays the
    # old value first. Decaying after the update would be off by 0.1 * 0.01 here.
    expected = p0 * (1 - 0.1) - 0.01 * g / (g.abs() + 1e-8 / math.sqrt(1 - 0.999))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)
    # a schedule that sets the rate to 0 stops Adam's update, not the decay
    for group in opt.param_groups:
        group["lr"] = 0.0
    p1 = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), p1 * (1 - 0.1), rtol=0, atol=1e-14)


def _keras_adamw_reference(p0, grads, lr, wd, eps, b1=0.9, b2=0.999):
    """tfa.optimizers.AdamW as its code reads, written out step by step in float64: decay the
    variable by wd, then Keras' Adam (bias corrections folded into the rate, eps added to sqrt(v))."""
    var, m, v, out = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), []
    for t, g in enumerate(grads, start=1):
        var = var - wd * var
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        var = var - lr_t * m / (v.sqrt() + eps)
        out.append(var.clone())
    return out


def test_matches_keras_adam_with_its_epsilon_placement_over_many_steps():
    # gradients near eps make the placement visible: torch's placement (eps after bias
    # correction) differs from Keras' by up to ~30% of the step at t = 1 here
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(25)]
    p0 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -0.25], dtype=torch.float64)
    lr, wd, eps = 1e-2, 1e-3, 1e-4
    expected = _keras_adamw_reference(p0, grads, lr, wd, eps)
    p = torch.nn.Parameter(p0.clone())
    opt = AdamWAbsoluteDecay([p], lr=lr, weight_decay=wd, eps=eps)
    for g, want in zip(grads, expected):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13)
    # torch's own placement is measurably different on the same run (so the check above can fail)
    q = torch.nn.Parameter(p0.clone())
    t_opt = torch.optim.Adam([q], lr=lr, eps=eps)
    for g in grads:
        with torch.no_grad():
            q.mul_(1 - wd)
        q.grad = g.clone()
        t_opt.step()
    assert (q.detach() - expected[-1]).abs().max() > 1e-4
    assert opt.param_groups[0]["keras_step"] == 25 and opt.param_groups[0]["keras_epsilon"] == eps


def test_resumed_optimizer_continues_exactly():
    grads = [torch.tensor(v, dtype=torch.float64) for v in ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3], [1.0, 1.0, 1.0],
                                                             [-0.4, 0.0, 0.7])]

    def train(resume_at: int | None, old_format: bool = False):
        p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
        opt = AdamWAbsoluteDecay([p], lr=1e-2, weight_decay=1e-3)
        for i, g in enumerate(grads):
            if i == resume_at:  # as `mixlab train --resume`: a fresh optimizer, then the saved state
                state, value = copy.deepcopy(opt.state_dict()), p.detach().clone()
                if old_format:  # a checkpoint written before the Keras epsilon: eps as given, no counts
                    for group in state["param_groups"]:
                        group["eps"] = group.pop("keras_epsilon")
                        del group["keras_step"]
                p = torch.nn.Parameter(value)
                opt = AdamWAbsoluteDecay([p], lr=1e-2, weight_decay=0.5)
                opt.load_state_dict(state)
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    straight, _ = train(None)
    resumed, opt = train(2)
    assert torch.equal(straight, resumed)
    assert torch.equal(straight, train(2, old_format=True)[0])
    assert opt.param_groups[0]["absolute_weight_decay"] == 1e-3  # the saved decay, not the new object's


def test_drop_last_trains_whole_batches_only(make_folder_dataset, tmp_path, monkeypatch):
    from mixlab.cli import main
    from mixlab.train import loop as trainer

    calls = []
    real = trainer.TrainStep

    class Counting(real):
        def __call__(self, x, y):
            calls.append(x.shape[0])
            return super().__call__(x, y)

    monkeypatch.setattr(trainer, "TrainStep", Counting)
    data = make_folder_dataset(n_classes=3, per_class=(7, 2), size=8)  # 21 training images
    base = ["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--dataset", "folder",
            "--data", str(data), "--batch-size", "8", "--epochs", "1", "--precision", "fp32",
            "--set", "data.val_split=0", "--set", "progress=false"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    assert calls == [8, 8, 5]
    calls.clear()
    assert main([*base, "--out", str(tmp_path / "drop"), "--set", "drop_last=true"]) == 0
    assert calls == [8, 8]


def test_keras_init_uses_keras_fans_and_zero_biases():
    import math

    import torch

    torch.manual_seed(0)
    m = mixlab.create_model("convmixer_256_8", init="keras")
    dw, pw, stem, head = m.blocks[0][0].fn[0], m.blocks[0][1], m.stem[0], m.head
    # Keras' limits, from its fan rule (kernel (kh, kw, in, out): in*kh*kw and out*kh*kw;
    # DepthwiseConv2D: channels*kh*kw and depth_multiplier*kh*kw)
    limits = {"dw": math.sqrt(6 / (256 * 25 + 25)), "pw": math.sqrt(6 / 512), "stem": math.sqrt(6 / (12 + 1024)),
              "head": math.sqrt(6 / (256 + 10))}
    for name, layer in (("dw", dw), ("pw", pw), ("stem", stem), ("head", head)):
        w = layer.weight.detach()
        assert float(w.abs().max()) <= limits[name]
        # a uniform(-a, a) has std a / sqrt(3): the sample's std within 10%
        assert abs(float(w.std()) / (limits[name] / math.sqrt(3)) - 1) < 0.1, name
        assert torch.count_nonzero(layer.bias) == 0
    torch.manual_seed(0)
    default = mixlab.create_model("convmixer_256_8")
    assert float(default.blocks[0][0].fn[0].weight.detach().abs().max()) > 2 * limits["dw"]  # torch bound: 0.2
    with pytest.raises(ValueError, match="init must be"):
        mixlab.create_model("convmixer_256_8", init="glorot")
