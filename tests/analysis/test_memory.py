"""Memory estimates from a meta-device pass, and the size checks of `info` and `bench`."""
from __future__ import annotations

import pytest
from torch import nn

import mixlab.analysis.memory as memory
from mixlab import create_model
from mixlab.cli import main

GIB = 1024 ** 3


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_the_estimate_adds_up_the_layer_outputs():
    e = memory.estimate_memory(tiny, (1, 3, 8, 8), "infer")
    # largest output: 4 channels x 8 x 8 fp32 = 1024 bytes (the conv's and the ReLU's), input 768 bytes
    assert e.largest == 4 * 8 * 8 * 4
    assert e.activations == 2 * e.largest + 3 * 8 * 8 * 4
    params = (4 * 3 * 9 + 4 + 2 * 4 + 2) * 4
    assert e.params == params
    t = memory.estimate_memory(tiny, (1, 3, 8, 8), "train")
    assert t.params == 4 * params and t.activations > e.activations and t.mode == "train"


def test_the_estimate_grows_with_the_batch_and_the_image():
    build = lambda: create_model("convmixer_256_8")  # noqa: E731
    one = memory.estimate_memory(build, (1, 3, 32, 32), "train")
    eight = memory.estimate_memory(build, (8, 3, 32, 32), "train")
    # 8x, less BatchNorm's per-channel statistics, which do not grow with the batch
    assert 7.9 * one.activations < eight.activations <= 8 * one.activations and eight.params == one.params
    big = memory.estimate_memory(build, (1, 3, 64, 64), "infer")
    small = memory.estimate_memory(build, (1, 3, 32, 32), "infer")
    assert big.largest == 4 * small.largest


def test_check_memory_refuses_what_does_not_fit(monkeypatch):
    e = memory.MemoryEstimate(params=GIB, activations=30 * GIB, largest=GIB, mode="train")
    monkeypatch.setattr(memory, "available_memory", lambda device: 8 * GIB)
    with pytest.raises(ValueError, match=r"a step needs about 31.0 GiB \(30.0 GiB of activations.*more than the "
                                         r"8.0 GiB free on cpu: lower it, or pass --x to try anyway"):
        memory.check_memory(e, "cpu", "a step", "lower it", "pass --x")
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * GIB)
    memory.check_memory(e, "cpu", "a step", "lower it", "pass --x")


@pytest.mark.parametrize("argv,expected", [
    (["info", "convmixer_256_8", "--img-size", "8192"], "a forward pass of convmixer_256_8 at 8192x8192 needs about"),
    (["bench", "convmixer_256_8", "--batch-size", "100000"],
     "a training step of convmixer_256_8 with batch 100000 at 32x32 needs about"),
])
def test_info_and_bench_check_the_size_before_allocating(monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(memory, "available_memory", lambda device: 16 * GIB)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "more than the 16.0 GiB free" in err and "--no-memory-check" in err


def test_no_memory_check_runs_anyway(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    assert main(["info", "convmixer_256_8", "--json"]) == 2
    assert main(["info", "convmixer_256_8", "--json", "--no-memory-check"]) == 0
