"""The command line: models, info, bench, recipes, errors."""
from __future__ import annotations

import json

import pytest

from mixlab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_lists_names_params_paper(capsys):
    code, out, _ = run(capsys, "models", "convmixer")
    assert code == 0
    line = next(li for li in out.splitlines() if li.startswith("convmixer_256_8 "))
    assert "0.59M" in line and "Patches Are All You Need" in line


def test_info_json_schema(capsys):
    code, out, _ = run(capsys, "info", "convmixer_256_8", "--json")
    d = json.loads(out)
    for key in ("name", "params", "trainable_params", "macs", "flops", "input_size", "output_shape"):
        assert key in d
    assert d["params"] == 594_186 and d["flops"] == 2 * d["macs"]
    assert d["input_size"] == [1, 3, 32, 32] and d["output_shape"] == [1, 10]


def test_info_img_size_and_classes(capsys):
    code, out, _ = run(capsys, "info", "convmixer_256_8", "--img-size", "64", "--num-classes", "100", "--json")
    d = json.loads(out)
    assert d["output_shape"] == [1, 100] and d["input_size"] == [1, 3, 64, 64]
    assert d["stages"][0]["shape"] == [1, 256, 32, 32]


def test_bench_json_schema(capsys):
    code, out, _ = run(capsys, "bench", "convmixer_256_8", "--mode", "train", "--batch-size", "4",
                       "--model-kwargs", "dim=16,depth=1", "--window-seconds", "0.01", "--warmup", "1", "--json",
                       "--vs", "timm:convmixer.ConvMixer", "--vs-kwargs", "dim=16,depth=1,kernel_size=5,patch_size=2,num_classes=10")
    assert code == 0
    d = json.loads(out)
    for key in ("images_per_sec_median", "images_per_sec_min", "images_per_sec_max", "windows", "flops_per_step"):
        assert key in d["result"] and key in d["other"]
    assert d["result"]["windows"] == 5
    assert d["result"]["images_per_sec_min"] <= d["result"]["images_per_sec_median"] <= d["result"]["images_per_sec_max"]
    assert d["ratio"] > 0 and d["peak_memory_mib"] > 0
    # same architecture on both sides: the same FLOPs per step
    assert d["result"]["flops_per_step"] == d["other"]["flops_per_step"]


def test_bench_refuses_comparing_mixlab_to_itself(capsys):
    code, _, err = run(capsys, "bench", "convmixer_256_8", "--vs", "timm:convmixer_256_8", "--batch-size", "2")
    assert code == 2 and "mixlab's own" in err


def test_unknown_model_is_a_message_not_a_traceback(capsys):
    code, _, err = run(capsys, "info", "convmixr_256_8")
    assert code == 2 and "convmixer_256_8" in err and "Traceback" not in err


def test_unknown_command(capsys):
    code, _, err = run(capsys, "trian")
    assert code == 2 and "train" in err


def test_recipes_listed(capsys):
    code, out, _ = run(capsys, "recipes")
    for name in ("seed-convmixer-keras", "convmixer-cifar10-25ep", "seed-conv2former-cifar"):
        assert name in out


@pytest.mark.parametrize("argv", [["--help"], []])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "train" in out


def test_model_kwargs_take_lists_and_mappings(capsys):
    from mixlab.kv import parse_kv

    assert parse_kv("dims=[32,64,128,160,256],drop_rate=0.1") == {"dims": [32, 64, 128, 160, 256], "drop_rate": 0.1}
    assert parse_kv("a={k: 1, j: [1, 2]},b='x,y',c=null") == {"a": {"k": 1, "j": [1, 2]}, "b": "x,y", "c": None}
    code, out, _ = run(capsys, "info", "unext", "--model-kwargs", "dims=[32,64,128,160,256]", "--json")
    assert code == 0 and json.loads(out)["params"] == 1_580_961  # the seed's UNeXt text gives these widths
    code, _, err = run(capsys, "info", "unext", "--model-kwargs", "dims=[32,64")
    assert code == 2 and "the value of dims" in err and "Traceback" not in err
    code, _, err = run(capsys, "info", "unext", "--model-kwargs", "dims")
    assert code == 2 and "KEY=VALUE" in err


@pytest.mark.parametrize("argv", [["train"], ["seg", "train"], ["seg", "eval"], ["seg", "predict"], ["predict"],
                                  ["export"], ["eval"]])
def test_help_has_no_empty_defaults_and_every_flag_explained(argv, capsys):
    import argparse

    from mixlab.cli import build_parser

    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: [])" not in out
    parser, _ = build_parser(argv[0])
    if len(argv) > 1:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[argv[1]]
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not silent, f"flags without help: {silent}"


def test_unknown_config_key_is_quoted_whole(capsys):
    assert main(["train", "--model", "convmixer_256_8", "--set", "optimizer.lrr=0.1"]) == 2
    assert "unknown config key 'optimizer.lrr' (did you mean lr?)" in capsys.readouterr().err
