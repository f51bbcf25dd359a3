"""Counting parameters and MACs, and the grouped-conv backward FLOP correction."""
from __future__ import annotations

import torch
from torch import nn

from mixlab import create_model
from mixlab.analysis.profile import count_macs, count_params, feature_shapes, flop_counter


def test_convmixer_macs_by_hand():
    h, k, p, depth, classes, size = 256, 5, 2, 8, 10, 32
    n = (size // p) ** 2  # positions after the patch embedding
    expected = n * h * 3 * p * p + depth * n * (h * k * k + h * h) + h * classes
    assert count_macs(create_model("convmixer_256_8"), 32) == expected


def test_params_total_and_trainable():
    model = create_model("convmixer_256_8")
    model.head.weight.requires_grad_(False)
    total, trainable = count_params(model)
    assert total - trainable == 256 * 10


def test_depthwise_backward_flops_are_corrected():
    conv = nn.Conv2d(64, 64, 5, padding=2, groups=64, bias=False)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    forward_flops = 2 * 2 * 64 * 25 * 16 * 16  # batch * channels * k*k * positions, 2 FLOPs per MAC
    with flop_counter() as fixed:
        conv(x).sum().backward()
    # forward + grad wrt input + grad wrt weight, each the same number of multiply-adds
    assert fixed.get_total_flops() == 3 * forward_flops
    with flop_counter(fix_grouped_backward=False) as raw:
        conv(x).sum().backward()
    assert raw.get_total_flops() > fixed.get_total_flops()  # torch's own formula over-counts


def test_dense_conv_backward_unchanged_by_the_correction():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with flop_counter() as fixed:
        conv(x).sum().backward()
    with flop_counter(fix_grouped_backward=False) as raw:
        conv(x).sum().backward()
    assert fixed.get_total_flops() == raw.get_total_flops()


def test_feature_shapes():
    shapes = feature_shapes(create_model("convmixer_256_8"), 32)
    assert len(shapes) == 8 and shapes[-1]["shape"] == [1, 256, 16, 16]


def test_format_count_fixed_decimals_and_the_reports_figures():
    from mixlab.analysis.profile import format_count

    assert format_count(11_173_962, 3) == "11.174M" and format_count(11_173_962, 2) == "11.17M"
    assert format_count(1_500, 2) == "1.50K" and format_count(999, 3) == "999" and format_count(0, 2) == "0"
    assert format_count(2_400_000_000, 3) == "2.400G"
    # without decimals: about three figures, as `mixlab report` prints them
    assert [format_count(n) for n in (12_345, 5_362_762, 555_422_720, 1_297_829_888, 42)] == \
        ["12.3K", "5.36M", "555.4M", "1.30G", "42"]
