"""Receptive fields: utilisation counts, HDC rules, model stacks, effective RF."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab
from mixlab.analysis.receptive_field import (count_colour_map, effective_rf, gridding_share, hdc_check,
                                             model_rf_report, model_spatial_layers, plot_rf_counts, rf_report,
                                             rf_size, sawtooth_groups, stack_counts, utilisation_counts)


def counts_by_conv_transpose(kernel: int, rates: list[int]) -> np.ndarray:
    """Independent reference: push a single output pixel back through each dilated KxK
    all-ones convolution (last layer first) with conv_transpose2d."""
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    ones = torch.ones(1, 1, kernel, kernel, dtype=torch.float64)
    for r in reversed(rates):
        x = F.conv_transpose2d(x, ones, dilation=r)
    return x[0, 0].numpy().astype(np.int64)


@pytest.mark.parametrize("rates", [[1, 2, 3], [1, 2, 5]])
def test_counts_equal_conv_transpose_composition(rates):
    counts = utilisation_counts(3, rates)
    ref = counts_by_conv_transpose(3, rates)
    assert counts.shape == ref.shape == (rf_size(3, rates),) * 2
    np.testing.assert_array_equal(counts, ref)
    assert counts.sum() == 9 ** len(rates)  # every path from the output pixel is counted once


def test_counts_known_values_and_gridding():
    # [1, 2, 5] covers its 17x17 field; the 1-D counts are the coefficients of
    # (1 + x + x^2)(1 + x^2 + x^4)(1 + x^5 + x^10)
    one_d = np.array([1, 1, 2, 1, 2, 2, 2, 2, 1, 2, 2, 2, 2, 1, 2, 1, 1])
    np.testing.assert_array_equal(utilisation_counts(3, [1, 2, 5]), np.outer(one_d, one_d))
    assert gridding_share(utilisation_counts(3, [1, 2, 5])) == 0.0
    # [2, 2, 2]: only even offsets are ever read: 7x7 used pixels in a 13x13 field
    c = utilisation_counts(3, [2, 2, 2])
    assert c.shape == (13, 13) and c[6, 6] == 49 and c[1].sum() == 0
    assert gridding_share(c) == pytest.approx(1 - 49 / 169)


def test_size_pads_centred_and_rejects_too_small():
    c = utilisation_counts(3, [1, 2, 5], size=21)
    assert c.shape == (21, 21)
    np.testing.assert_array_equal(c[2:19, 2:19], utilisation_counts(3, [1, 2, 5]))
    assert c[:2].sum() == 0 and c[:, 19:].sum() == 0
    with pytest.raises(ValueError, match="smaller than the receptive field"):
        utilisation_counts(3, [1, 2, 5], size=15)
    with pytest.raises(ValueError, match="positive integers"):
        utilisation_counts(3, [1, 0])


def test_hdc_verdicts():
    ok = hdc_check([1, 2, 5], 3)
    assert ok["passes"] and ok["common_factor"] == 1 and ok["M"] == [1, 2, 5] and ok["M2"] == 2
    common = hdc_check([2, 4, 6], 3)
    assert not common["passes"] and not common["no_common_factor"] and common["common_factor"] == 2
    gap = hdc_check([1, 2, 9], 3)
    # M_3 = 9, M_2 = max(9 - 4, 9 - 2 * 7, 2) = 5 > K = 3
    assert gap["no_common_factor"] and gap["M2"] == 5 and not gap["m2_ok"] and not gap["passes"]
    assert hdc_check([1, 2, 9], 5)["passes"]  # a 5x5 kernel covers the gap of 5
    assert hdc_check([3], 3)["M2"] is None and not hdc_check([3], 3)["passes"]  # gcd 3 > 1
    # and the verdicts agree with the counts: a failing stack leaves holes, a passing one none
    assert gridding_share(utilisation_counts(3, [1, 2, 9])) > 0
    assert gridding_share(utilisation_counts(3, [1, 2, 3])) == 0


@pytest.mark.parametrize("rates, passes", [([1, 2, 5, 1, 2, 5], True), ([1, 2, 5], True), ([2, 4, 6], False),
                                           ([1, 2, 9], False), ([2, 2, 2], False)])
def test_hdc_verdict_per_sawtooth_group_agrees_with_the_counts(rates, passes):
    h = hdc_check(rates, 3)
    assert h["passes"] is passes
    # independent: the counts pushed back through conv_transpose2d leave no hole iff HDC passes here
    ref = counts_by_conv_transpose(3, rates)
    assert (gridding_share(ref) == 0) is passes
    assert (h["failures"] == []) is passes


def test_hdc_names_which_rule_failed_where():
    assert sawtooth_groups([1, 2, 5, 1, 2, 5]) == [[1, 2, 5], [1, 2, 5]]
    assert sawtooth_groups([2, 2, 2]) == [[2], [2], [2]] and sawtooth_groups([1, 2, 9]) == [[1, 2, 9]]
    saw = hdc_check([1, 2, 5, 1, 2, 5], 3)
    # the whole stack as one group fails rule 2: M_6 = 5, M_5 = max(5 - 4, 5 - 6, 2) = 2,
    # M_4 = max(2 - 2, 2 - 2, 1) = 1, M_3 = max(1 - 10, 1 + 8, 5) = 9, M_2 = max(9 - 4, 9 - 14, 2) = 5 > 3,
    # M_1 = max(5 - 2, 5 - 8, 1) = 3; each group [1, 2, 5] passes, and nothing grids
    assert saw["M"] == [3, 5, 9, 1, 2, 5] and saw["M2"] == 5 and not saw["passes_as_stack"]
    assert saw["passes_as_groups"] and [g["M2"] for g in saw["groups"]] == [2, 2] and saw["gridding_share"] == 0
    assert any("gcd 2" in f for f in hdc_check([2, 4, 6], 3)["failures"])
    assert any("M_2 = 5 > K = 3" in f for f in hdc_check([1, 2, 9], 3)["failures"])
    flat = hdc_check([2, 2, 2], 3)["failures"]
    assert any(f.startswith("sawtooth group [2]: rule 1") for f in flat)
    assert any("71.0% of its receptive field is never used" in f for f in flat)


def test_count_plot_uses_the_seeds_colour_map():
    from matplotlib.colors import to_rgba

    fig = plot_rf_counts(rf_report(3, [2, 2, 2]))
    image = fig.axes[0].images[0]
    cmap = image.get_cmap()
    assert cmap(0.0) == to_rgba("white") and cmap(1.0) == to_rgba("red")
    assert np.allclose(cmap(0.5), to_rgba("blue"), atol=1 / 255 + 1e-9)
    assert (image.norm.vmin, image.norm.vmax) == (0, 49)
    assert count_colour_map("viridis").name == "viridis"
    with pytest.raises(ValueError, match="colour map"):
        count_colour_map("nope")


def test_rf_report_numbers():
    r = rf_report(3, [1, 2, 5])
    assert r["rf_size"] == 17 and r["window"] == 17 and r["max_count"] == 4 and r["hdc"]["passes"]
    assert np.array_equal(np.array(r["counts"]), utilisation_counts(3, [1, 2, 5]))


def test_convmixer_stack_counts_exact():
    with torch.device("meta"):
        model = mixlab.create_model("convmixer_256_8")
    layers = model_spatial_layers(model, 32, stop_at="blocks")
    assert [layer.kind for layer in layers] == ["stem"] + ["depthwise"] * 8
    report = model_rf_report(model, 32)
    assert report["target"] == "blocks" and report["rf_size"] == 2 * (1 + 8 * 4) and report["jump"] == 2
    # independent: 1-D counts of eight 5-tap boxes, each feature pixel spread over the 2 stem pixels
    one_d = np.ones(1)
    for _ in range(8):
        one_d = np.convolve(one_d, np.ones(5))
    one_d = np.repeat(one_d, 2)
    np.testing.assert_array_equal(report["counts"], np.outer(one_d, one_d))


class _DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.dw(self.stem(x)).mean(dim=(2, 3)))


def test_model_rf_of_a_pure_conv_net_matches_its_gradients():
    torch.manual_seed(0)
    report = model_rf_report(_DepthwiseNet(), 16)
    assert report["target"] == "dw" and report["rf_size"] == 3 and report["note"] == ""
    assert report["measured_box"] == report["conv_box"] == [7, 9, 7, 9]
    with pytest.raises(ValueError, match="no depthwise"):
        model_rf_report(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2)), 8, target="0")


class _GateModule(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))


def test_model_rf_note_when_support_is_wider():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), _GateModule(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    report = model_rf_report(model, 16)
    assert report["target"] == "2" and report["rf_size"] == 3
    assert report["measured_box"] == [0, 15, 0, 15] and "wider" in report["note"]


def test_effective_rf_of_a_linear_conv_is_its_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    report = effective_rf(model, None, (12, 12), n_random=2)
    grad = report["map"]
    # d(sum_c y_c[6, 6]) / d x_i[6 + a - 1, 6 + b - 1] = sum_c W[c, i, a, b], whatever the input
    expected = conv.weight.detach().double().sum(0).abs().sum(0).numpy()
    np.testing.assert_allclose(grad[5:8, 5:8], expected, rtol=1e-6)
    assert grad.sum() == pytest.approx(expected.sum())  # zero everywhere else
    assert report["theoretical_box"] == [5, 7, 5, 7] and report["mass_inside_theoretical"] == pytest.approx(1.0)
    assert report["side_95"] <= 3


def test_stack_counts_in_frame_clips_at_borders():
    with torch.device("meta"):
        model = mixlab.create_model("convmixer_256_8")
    layers = model_spatial_layers(model, 32, stop_at="blocks")
    framed = stack_counts(layers, frame=True)
    assert framed.shape == (32, 32) and (framed > 0).all()  # a 66-px field covers the whole 32-px picture
