"""The CPU settings picker: explicit flags win, verdicts are cached and recorded, resume reuses them."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from mixlab.cli import main
from mixlab.train import cpu_defaults as cd
from mixlab.train.config import resolve_config

TINY = ["--model", "convmixer_256_8", "--model-kwargs", "dim=16,depth=2", "--dataset", "folder",
        "--batch-size", "8", "--set", "data.val_split=0.25", "--set", "progress=false"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batch():
    return torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))


@pytest.fixture
def fake_timer(monkeypatch):
    """time_candidates replaced by a table: fp32/NCHW/fast-dw is the fastest, the static default
    (bf16/channels_last/fast-dw) costs 1 s a step; records every call."""
    calls = []

    def fake(model, candidates, batch, loss_fn, rounds=cd.ROUNDS):
        calls.append([dict(c) for c in candidates])
        return [0.2 if (c["precision"], c["channels_last"], c["fast_depthwise"]) == ("fp32", False, True) else 1.0
                for c in candidates]

    def fake_compiled(model, cand, batch, loss_fn, rounds=cd.ROUNDS):
        calls.append(["compile", dict(cand)])
        return 3.0, 0.15  # 3 s to compile, then 0.15 s a step (0.2 eager)

    monkeypatch.setattr(cd, "time_candidates", fake)
    monkeypatch.setattr(cd, "time_compiled", fake_compiled)
    monkeypatch.setattr(cd, "busy_cores", lambda seconds=0.3: 0.0)
    monkeypatch.setattr(cd, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(cd, "fast_depthwise_available", lambda: True)
    return calls


def _cfg(**settings):
    cfg = resolve_config(model="convmixer_256_8")
    cfg.update(settings)
    return cfg


def test_measures_every_auto_combination_and_caches_the_verdict(fake_timer, capsys):
    first = cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)
    assert (first["precision"], first["channels_last"], first["fast_depthwise"]) == ("fp32", False, True)
    assert first["how"] == "measured" and len(first["figures"]) == 8
    assert len(fake_timer) == 3 and len(fake_timer[1]) == 8  # the default's estimate, all 8, compile
    # a 10,000-step run: compile saves (0.2 - 0.15) s x 10,000 = 500 s > 2 x 3 s
    assert fake_timer[2] == ["compile", dict(precision="fp32", channels_last=False, fast_depthwise=True)]
    assert first["compile"] is True
    line = capsys.readouterr().out
    assert "images/s, batch 4): fp32/NCHW/fast-dw 20, " in line and line.rstrip().endswith(
        "-> fp32, NCHW, fast depthwise conv, torch.compile (measured; compile 3 s, 27 vs 20 images/s eager, "
        "saves ~500 s over 10000 steps)")
    again = cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)
    assert again["how"] == "cached" and again["precision"] == "fp32" and again["compile"] and len(fake_timer) == 3
    # a shorter run with the same cached timings: 0.05 s x 50 = 2.5 s saved < 2 x 3 s, no compile, no timing
    short = cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=50)
    assert short["how"] == "cached" and short["compile"] is False and len(fake_timer) == 3
    cache = json.loads((cd._cache_path()).read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["choice"]["precision"] == "fp32"


def test_compile_note_says_when_eager_is_faster():
    # compiled 0.25 s a step against 0.2 s eager: 0.05 s x 1,000 steps lost, never "saves ~-50 s"
    v = cd._compile_verdict((3.0, 0.25, 0.2), 1000, 4)
    assert v["compile"] is False
    assert v["compile_note"] == ("compile 3 s, 16 vs 20 images/s eager, eager is faster: compiled, 1000 steps "
                                 "would take ~50 s longer")


def test_explicit_settings_are_never_overridden(fake_timer):
    p = cd.resolve_cpu_settings(_cfg(precision="bf16", channels_last=True, fast_depthwise=False, compile=False),
                                _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)
    assert (p["precision"], p["channels_last"], p["fast_depthwise"], p["how"]) == ("bf16", True, False, "fixed")
    assert p["compile"] is False and fake_timer == []
    # one setting fixed: only the others vary
    p = cd.resolve_cpu_settings(_cfg(precision="bf16", compile=False), _model(), _batch, nn.CrossEntropyLoss(),
                                total_steps=10_000)
    assert p["precision"] == "bf16" and all(c["precision"] == "bf16" for c in fake_timer[-1])
    assert len(fake_timer[-1]) == 4 and p["compile"] is False


def test_short_runs_and_autotune_off_use_static_defaults(fake_timer, capsys):
    p = cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=20)
    assert p["how"].startswith("static defaults: measuring 8 candidates would take")
    assert (p["precision"], p["channels_last"], p["fast_depthwise"]) == ("bf16", True, True)
    assert len(fake_timer) == 1  # only the estimate
    p = cd.resolve_cpu_settings(_cfg(autotune=False), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)
    assert "autotune off" in p["how"] and len(fake_timer) == 1


def test_a_busy_cpu_is_reported_and_not_cached(fake_timer, monkeypatch, capsys):
    monkeypatch.setattr(cd, "busy_cores", lambda seconds=0.3: 1.7)
    p = cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)
    assert p["how"] == "measured"
    assert "other processes keep 1.7" in capsys.readouterr().out
    assert not cd._cache_path().exists()


def test_a_verdict_is_not_reused_on_another_cpu_of_the_same_name(fake_timer, monkeypatch):
    # two machines that both say "AMD EPYC" (a Zen 3 with AVX2, a Zen 5 with AVX512-BF16) sharing a cache folder
    monkeypatch.setattr(cd, "_cpu_flags_digest", lambda: "zen5")
    assert cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)["how"] \
        == "measured"
    monkeypatch.setattr(cd, "_cpu_flags_digest", lambda: "zen3")
    assert cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)["how"] \
        == "measured"
    assert len(json.loads(cd._cache_path().read_text())) == 2
    monkeypatch.setattr(cd, "_cpu_flags_digest", lambda: "zen5")
    assert cd.resolve_cpu_settings(_cfg(), _model(), _batch, nn.CrossEntropyLoss(), total_steps=10_000)["how"] \
        == "cached"


@pytest.mark.parametrize("flags, isa", [("fpu avx avx2 fma", "AVX2"), ("avx2 avx512f avx512bw", "AVX-512"),
                                        ("avx2 avx512f avx512_bf16", "AVX512-BF16"),
                                        ("avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16")])
def test_cpu_name_says_family_model_and_vector_instructions(flags, isa):
    text = (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
            f"model name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\ncpu family\t: 99\n")
    assert cd.describe_cpuinfo(text) == f"AMD EPYC (family 25, model 1, {isa})"
    assert cd.describe_cpuinfo("model name\t: Some CPU\n") == "Some CPU"


def test_real_timing_leaves_model_and_rng_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    times = cd.time_candidates(model, [dict(precision="fp32", channels_last=False, fast_depthwise=True),
                                       dict(precision="bf16", channels_last=True, fast_depthwise=False)],
                               batch, nn.CrossEntropyLoss(), rounds=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(model[1]) is nn.Conv2d  # the copy was switched, not the model


def test_run_directory_records_the_pick_and_resume_reuses_it(make_folder_dataset, tmp_path, fake_timer,
                                                             monkeypatch, capsys):
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    monkeypatch.setattr(cd, "MEASURE_SHARE", 100.0)  # measure even this tiny run
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out)]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["picked"]["how"] == "measured" and cfg["picked"]["precision"] == "fp32"
    assert cfg["precision"] == "auto"  # the user's setting is kept beside what was picked
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["channels_last"] is False and summary["fast_depthwise"]
    n_calls = len(fake_timer)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert "from the run's record" in capsys.readouterr().out
    assert len(fake_timer) == n_calls  # nothing measured again
    assert json.loads((out / "summary.json").read_text())["precision"] == "fp32"


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="fast_depthwise must be auto, true or false"):
        resolve_config(model="convmixer_256_8", overrides=["fast_depthwise=maybe"])
    with pytest.raises(ValueError, match="autotune must be true or false"):
        resolve_config(model="convmixer_256_8", overrides=["autotune=sometimes"])


def test_fast_gelu_is_on_by_default_off_when_asked_and_resumed_as_recorded(make_folder_dataset, tmp_path):
    from mixlab.ops.gelu import fast_gelu_available

    if not fast_gelu_available():
        pytest.skip("the GELU kernel is not built here")
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    base = ["train", "--model", "convmixer_256_8", "--data", str(data), "--dataset", "folder", "--epochs", "1",
            "--batch-size", "8", "--set", "autotune=false"]
    runs = {}
    for name, extra in (("auto", []), ("off", ["--set", "fast_gelu=false"])):
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0
        runs[name] = yaml.safe_load((out / "config.yaml").read_text())["picked"]["fast_gelu"]
        assert json.loads((out / "summary.json").read_text())["fast_gelu"] is runs[name]
    assert runs == {"auto": True, "off": False}
    # a run recorded before the setting existed did not fuse: its resume does not either
    out = tmp_path / "auto"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["picked"]["fast_gelu"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["fast_gelu"] is False
    with pytest.raises(ValueError, match="fast_gelu must be auto, true or false"):
        resolve_config(model="convmixer_256_8", overrides=["fast_gelu=sometimes"])


@pytest.mark.parametrize("key", ["fast_layernorm", "fast_pointwise", "fast_dense_conv"])
def test_cpu_ops_are_on_by_default_off_when_asked_and_resumed_as_recorded(make_folder_dataset, tmp_path, key):
    from mixlab.ops.layernorm import fast_layernorm_available

    if key == "fast_layernorm" and not fast_layernorm_available():
        pytest.skip("the LayerNorm kernel is not built here")
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    base = ["train", "--model", "conv2former_n_cifar", "--data", str(data), "--dataset", "folder", "--epochs", "1",
            "--batch-size", "8", "--set", "autotune=false"]
    runs = {}
    for name, extra in (("auto", []), ("off", ["--set", f"{key}=false"])):
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0
        runs[name] = yaml.safe_load((out / "config.yaml").read_text())["picked"][key]
        assert json.loads((out / "summary.json").read_text())[key] is runs[name]
    assert runs == {"auto": True, "off": False}
    # a run recorded before the setting existed did not use it: its resume does not either
    out = tmp_path / "auto"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["picked"][key]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())[key] is False
    with pytest.raises(ValueError, match=f"{key} must be auto, true or false"):
        resolve_config(model="conv2former_n_cifar", overrides=[f"{key}=sometimes"])


def test_fast_resample_is_on_for_unext_off_when_asked_and_resumed_as_recorded(make_folder_dataset, tmp_path):
    from mixlab.ops.resample import fast_resample_available
    from test_seg_train import TINY as SEG_TINY, _make_busi_like

    if not fast_resample_available():
        pytest.skip("the resampling kernel is not built here")
    data = _make_busi_like(tmp_path / "busi", n=8)
    base = ["seg", "train", *SEG_TINY, "--data", str(data), "--epochs", "1", "--set", "autotune=false"]
    runs = {}
    for name, extra in (("auto", []), ("off", ["--set", "fast_resample=false"])):
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0
        runs[name] = yaml.safe_load((out / "config.yaml").read_text())["picked"]["fast_resample"]
        assert json.loads((out / "summary.json").read_text())["fast_resample"] is runs[name]
    assert runs == {"auto": True, "off": False}
    # a classifier names nothing to fuse: off, whatever was asked
    cls_data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    out = tmp_path / "cls_run"
    assert main(["train", "--model", "convmixer_256_8", "--data", str(cls_data), "--dataset", "folder", "--epochs", "1",
                 "--batch-size", "8", "--set", "autotune=false", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["picked"]["fast_resample"] is False
    # a run recorded before the setting existed did not fuse: its resume does not either
    out = tmp_path / "auto"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["picked"]["fast_resample"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["seg", "train", "--resume", str(out), "--epochs", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["fast_resample"] is False
    with pytest.raises(ValueError, match="fast_resample must be auto, true or false"):
        resolve_config(model="unext_s", overrides=["fast_resample=sometimes"])


def test_fast_bn_relu_is_on_where_pairs_are_off_when_asked_and_resumed_as_recorded(make_folder_dataset, tmp_path):
    from mixlab.ops.bn_relu import fast_bn_relu_available

    if not fast_bn_relu_available():
        pytest.skip("the BatchNorm + ReLU kernel is not built here")
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=32)
    base = ["train", "--model", "vgg16_bn_cifar", "--data", str(data), "--dataset", "folder", "--epochs", "1",
            "--batch-size", "8", "--set", "autotune=false"]
    runs = {}
    for name, extra in (("auto", []), ("off", ["--set", "fast_bn_relu=false"])):
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0
        runs[name] = yaml.safe_load((out / "config.yaml").read_text())["picked"]["fast_bn_relu"]
        assert json.loads((out / "summary.json").read_text())["fast_bn_relu"] is runs[name]
    assert runs == {"auto": True, "off": False}
    out = tmp_path / "auto"  # a run recorded before the setting existed did not fuse: its resume does not either
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["picked"]["fast_bn_relu"]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["fast_bn_relu"] is False
    with pytest.raises(ValueError, match="fast_bn_relu must be auto, true or false"):
        resolve_config(model="vgg16_bn_cifar", overrides=["fast_bn_relu=sometimes"])
