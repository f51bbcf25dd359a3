"""Parameters and MACs per module add up to the model totals."""
from __future__ import annotations

import pytest
import timm
import torch

import mixlab
from mixlab.analysis.per_layer import format_per_layer, per_layer_table
from mixlab.analysis.profile import count_macs, count_params


def _check_totals(model, size):
    rows = per_layer_table(model, size)
    total_params, total_macs = count_params(model)[0], count_macs(model, size)
    root = rows[0]
    assert root["name"] == "" and root["depth"] == 0
    assert root["params"] == total_params and root["macs"] == total_macs
    assert sum(r["own_params"] for r in rows) == total_params
    assert sum(r["own_macs"] for r in rows) == total_macs
    assert all(r["own_macs"] >= 0 and r["own_params"] >= 0 for r in rows)
    # a module's totals are its own share plus its children's totals
    by_name = {r["name"]: r for r in rows}
    for name, module in model.named_modules():
        kids = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        r = by_name[name]
        assert r["params"] == r["own_params"] + sum(by_name[k]["params"] for k in kids)
    return rows, by_name


def test_convmixer_per_layer_exact():
    with torch.device("meta"):
        model = mixlab.create_model("convmixer_256_8")
    rows, by_name = _check_totals(model, 32)
    assert rows[0]["params"] == 594_186  # the seed's count
    stem = by_name["stem.0"]
    # 256 filters of 3x2x2 (+ bias) applied at 16x16 positions
    assert stem["type"] == "Conv2d" and stem["depth"] == 2
    assert stem["params"] == 256 * 12 + 256 and stem["macs"] == 256 * 12 * 16 * 16
    dw, pw = by_name["blocks.3.0.fn.0"], by_name["blocks.3.1"]
    assert dw["macs"] == 256 * 25 * 16 * 16 and pw["macs"] == 256 * 256 * 16 * 16
    assert by_name["blocks.3"]["macs"] == dw["macs"] + pw["macs"]
    assert by_name["head"]["macs"] == 256 * 10


@pytest.mark.parametrize("name", ["conv2former_n_cifar", "swin_mlp_tiny_cifar", "resnet18_cifar"])
def test_other_families_totals(name):
    if name not in mixlab.list_models():
        pytest.skip(f"{name} is not registered")
    with torch.device("meta"):
        model = mixlab.create_model(name)
    _check_totals(model, mixlab.model_info(name).input_size)


def test_attention_products_are_the_attention_modules_own():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64)
    rows, by_name = _check_totals(model, 64)
    attn = by_name["blocks.0.attn"]
    # q @ k^T and attn @ v of 17 tokens, 192 channels: computed in Attention.forward itself
    assert attn["own_macs"] == 2 * 17 * 17 * 192
    # the class token and position embedding belong to the model itself
    assert rows[0]["own_params"] == 192 * (1 + 17)


def test_format_per_layer():
    with torch.device("meta"):
        model = mixlab.create_model("convmixer_256_8")
    rows = per_layer_table(model, 32)
    text = format_per_layer(rows, max_depth=1)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["module", "type", "params"]
    assert any(line.strip().startswith("blocks ") and "Sequential" in line for line in lines)
    assert not any("fn" in line for line in lines)  # folded below depth 1
    assert "594,186" in lines[-1] and f"{rows[0]['macs']:,}" in lines[-1]
    assert len(format_per_layer(rows).splitlines()) > len(lines)
