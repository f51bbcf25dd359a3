"""Every configuration value is checked for type and range before data is read or a model built;
each bad input's message names the key (or file), the value and what is allowed."""
from __future__ import annotations

import pytest

from mixlab.cli import main
from mixlab.errors import UsageError
from mixlab.train.config import parse_set, read_settings_file, resolve_config

MODEL = "convmixer_256_8"


def resolve(**kw):
    kw.setdefault("model", MODEL)
    return resolve_config(**kw)


def refused(match: str, **kw) -> str:
    with pytest.raises(UsageError) as e:
        resolve(**kw)
    message = str(e.value)
    for part in match.split("|"):
        assert part in message, message
    return message


@pytest.mark.parametrize("overrides,expected", [
    (["optimizer.lr=-0.5"], "optimizer.lr must be a number > 0, got -0.5"),
    (["optimizer.lr=abc"], "optimizer.lr must be a number > 0, got 'abc'"),
    (["optimizer.lr=[1,2]"], "optimizer.lr must be a number > 0, got [1, 2]"),
    (["optimizer.lr=null"], "optimizer.lr must be a number > 0, got null"),
    (["epochs=1.7"], "epochs must be a whole number >= 1, got 1.7"),
    (["epochs=ten"], "epochs must be a whole number >= 1, got 'ten'"),
    (["batch_size=16.5"], "batch_size must be a whole number >= 1, got 16.5"),
    (["batch_size=0"], "batch_size must be a whole number >= 1, got 0"),
    (["eval_batch_size=0"], "eval_batch_size must be a whole number >= 1, got 0"),
    (["optimizer.betas=0.9"], "optimizer.betas must be a list [beta1, beta2], got 0.9"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas[1] must be a number in [0, 1), got 1.5"),
    (["augment.hflip='yes'"], "augment.hflip must be a number in [0, 1], got 'yes'"),
    (["augment.hflip=2"], "augment.hflip must be a number in [0, 1], got 2"),
    (["data.resize=-5"], "data.resize must be null or a whole number >= 1, got -5"),
    (["data.val_split=1"], "data.val_split must be a number in [0, 1), got 1"),
    (["data.on_bad_image=ignore"], "data.on_bad_image must be one of error, skip, got 'ignore'"),
    (["device=tpu"], "device must be one of auto, cpu, cuda, cuda:N, got 'tpu'"),
    (["precision=fp8"], "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["channels_last=maybe"], "channels_last must be auto, true or false, got 'maybe'"),
    (["ema.decay=1"], "ema.decay must be a number in (0, 1), got 1"),
    (["clip_grad=0"], "clip_grad must be null or a number > 0, got 0"),
    (["schedule.warmup_epochs=-1"], "schedule.warmup_epochs must be a number >= 0, got -1"),
    (["loss.label_smoothing=1"], "loss.label_smoothing must be a number in [0, 1), got 1"),
    (["num_threads=0"], "num_threads must be null or a whole number >= 1, got 0"),
    (["optimizer.fused=maybe"], "optimizer.fused must be auto, true or false, got 'maybe'"),
    (["optimizer.name=adamw_tfa", "optimizer.fused=true"], "optimizer.fused=true: adamw_tfa"),
])
def test_a_bad_value_names_the_key_the_value_and_the_range(overrides, expected):
    refused(expected, overrides=overrides)


def test_a_bad_lr_is_reported_as_itself_not_as_min_lr():
    message = refused("optimizer.lr", overrides=["optimizer.lr=-0.5", "schedule.min_lr=0.001"])
    assert "min_lr" not in message
    refused("schedule.min_lr (0.01) is above optimizer.lr (0.001)", overrides=["schedule.min_lr=0.01"])


def test_values_that_read_unambiguously_are_normalised():
    cfg = resolve(overrides=["batch_size=16.0", "optimizer.lr='1e-3'", "epochs=3"])
    assert cfg["batch_size"] == 16 and isinstance(cfg["batch_size"], int)
    assert cfg["optimizer"]["lr"] == 0.001 and isinstance(cfg["optimizer"]["lr"], float)


def test_segmentation_values_are_checked_too():
    common = dict(model="unext_s", task="segmentation")
    refused("threshold must be a number in (0, 1), got 1.5", overrides=["threshold=1.5"], **common)
    refused("img_size must be null or a whole number >= 1 or [H, W], got -3", overrides=["img_size=-3"], **common)
    refused("augment.rot90 must be true or false, got 'yes'", overrides=["augment.rot90='yes'"], **common)
    refused("data.mask_threshold must be null or a whole number in [0, 65534]", overrides=["data.mask_threshold=-1"],
            **common)
    refused("data.mask_values must be null or a non-empty list", overrides=["data.mask_values=[]"], **common)
    refused("data.mask_threshold (3) and data.mask_values ([1]) both", overrides=["data.mask_threshold=3",
                                                                               "data.mask_values=[1]"], **common)
    refused("unext_s cannot take 40x40 inputs|multiples of 32", overrides=["img_size=40"], **common)
    refused("loss.name", overrides=["loss.name=hinge"], **common)


@pytest.mark.parametrize("kwargs,expected", [
    ({"dim": "abc"}, "model_kwargs.dim must be a whole number >= 1, got 'abc'"),
    ({"dim": -4}, "model_kwargs.dim must be a whole number >= 1, got -4"),
    ({"kernel_size": 0}, "model_kwargs.kernel_size must be a whole number >= 1, got 0 (its default is 9)"),
    ({"depth": 2.5}, "model_kwargs.depth must be a whole number >= 1, got 2.5"),
    ({"drop_rate": 1.5}, "model_kwargs.drop_rate must be a number in [0, 1), got 1.5"),
    ({"foo": 1}, "does not take argument foo; it takes: "),
])
def test_model_arguments_are_checked_against_the_models_signature(kwargs, expected):
    refused(expected, model_kwargs=kwargs)


def test_model_arguments_the_signature_cannot_judge_are_refused_by_a_meta_build():
    # unext's dims are all >= 1 but UNeXt needs five of them: refused by building on the meta device
    refused("unext_s cannot be built with dims=[8, 16]|dims must give the 5 channel counts", model="unext_s",
            task="segmentation",
            model_kwargs={"dims": [8, 16]})


def test_whole_floats_in_model_arguments_become_ints():
    cfg = resolve(model_kwargs={"dim": 16.0, "depth": 2})
    assert cfg["model_kwargs"]["dim"] == 16 and isinstance(cfg["model_kwargs"]["dim"], int)


@pytest.mark.parametrize("text,expected", [
    ("- a\n- b\n", "must hold a mapping of settings|but it holds a list"),
    ("epochs: [1\nlr: 2\n", "is not valid YAML (line 2"),
    (": bad\n", "is not valid YAML (line 1"),
    ("1: x\n", "1 is not a setting name"),
    ("optimizer:\n  lr: -0.5\n", "optimizer.lr must be a number > 0, got -0.5"),
    ("device: tpu\n", "device must be one of auto, cpu, cuda, cuda:N, got 'tpu'"),
])
def test_a_bad_config_file_is_named(tmp_path, text, expected):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    message = refused(expected, config_file=path)
    if "YAML" in expected or "mapping" in expected or "name" in expected:
        assert str(path) in message


def test_an_empty_config_file_is_no_settings(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert read_settings_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("item,expected", [
    ("optimizer.lr=", "--set 'optimizer.lr=' gives no value"),
    ("lr=", "--set 'lr=' gives no value"),
    (": bad", "--set takes KEY=VALUE"),
    ("=5", "is not a setting name"),
    ("optimizer.lr=: bad", "the value ': bad' cannot be read"),
    ("optimizer.lr=[1,", "the value '[1,' cannot be read"),
])
def test_a_bad_set_item_is_named(item, expected):
    with pytest.raises(UsageError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        parse_set([item])


def test_the_cli_refuses_bad_settings_in_one_line_before_reading_any_data(tmp_path, capsys):
    # the data folder does not exist: the bad setting is what is reported, so nothing was read
    code = main(["train", "--model", MODEL, "--dataset", "folder", "--data", str(tmp_path / "nowhere"),
                 "--set", "optimizer.lr=-0.5", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == "mixlab train: error: optimizer.lr must be a number > 0, got -0.5"
    assert not (tmp_path / "run").exists()
    code = main(["train", "--model", MODEL, "--model-kwargs", "dim=abc", "--out", str(tmp_path / "run")])
    assert code == 2 and "model_kwargs.dim must be a whole number >= 1, got 'abc'" in capsys.readouterr().err
    code = main(["info", MODEL, "--model-kwargs", "dim=-4"])
    assert code == 2 and "--model-kwargs dim must be a whole number >= 1, got -4" in capsys.readouterr().err
    code = main(["train", "--model", MODEL, "--set", "lr=0.1", "--out", str(tmp_path / "run")])
    assert code == 2 and "unknown config key 'lr'" in capsys.readouterr().err


def test_a_resumed_runs_hand_edited_config_is_checked(tmp_path, capsys):
    from mixlab.train import rundir as rd

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve(data="x", overrides=["epochs=2"])
    cfg["optimizer"]["lr"] = "fast"
    rd.write_config(run, cfg)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: optimizer.lr must be a number > 0, got 'fast'" in err
