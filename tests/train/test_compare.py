"""`mixlab compare`: one recipe for every model, skipping finished runs and resuming interrupted ones.

A fake trainer stands in for ``run_training``: it writes the run-directory files an epoch at a
time (config.yaml, metrics.jsonl, summary.json, a state file) and can be told to be killed
after some epoch, so the skip / resume / restart logic is checked without training. One test
at the end runs the real trainer on a tiny image folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import mixlab.train
from mixlab.cli import main
from mixlab.train.compare import MANIFEST, config_differences, plan_compare, run_compare

MODELS = ["resnet18_cifar", "mobilenetv2_cifar", "vit_tiny_cifar"]


class FakeTrainer:
    """run_training(cfg, out_dir, resume) writing what the real one writes, one epoch at a time."""

    def __init__(self, interrupt: tuple[str, int] | None = None, fail: set[str] = frozenset()):
        self.calls: list[dict] = []
        self.interrupt, self.fail = interrupt, set(fail)

    def __call__(self, cfg, out_dir, resume=False):
        out_dir = Path(out_dir)
        self.calls.append(dict(model=cfg["model"], resume=resume, cfg=copy.deepcopy(cfg)))
        if cfg["model"] in self.fail:
            raise RuntimeError(f"{cfg['model']} diverged")
        start, rows = 0, []
        if resume:
            start = json.loads((out_dir / "last_state.pt").read_text())["epoch"]
            rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()][:start]
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
            (out_dir / "metrics.jsonl").write_text("")
        summary = dict(model=cfg["model"], params=1000, macs=2000, epochs=cfg["epochs"], device="cpu")
        for epoch in range(start, int(cfg["epochs"])):
            if self.interrupt == (cfg["model"], epoch):
                raise KeyboardInterrupt  # killed during this epoch: the previous one is on disk
            rows.append(dict(epoch=epoch + 1, train_loss=1.0, train_acc=50.0, val_loss=1.0, val_acc=10.0 * (epoch + 1),
                             lr=cfg["optimizer"]["lr"], epoch_seconds=1.0, images_per_sec=100.0))
            (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out_dir / "last_state.pt").write_text(json.dumps(dict(epoch=epoch + 1)))
            (out_dir / "summary.json").write_text(json.dumps(dict(
                summary, best_val_acc=rows[-1]["val_acc"], best_epoch=epoch + 1, test_acc=None,
                epochs_done=epoch + 1, finished=False, wall_seconds=float(epoch + 1), images_per_sec=100.0)))
        final = dict(summary, best_val_acc=rows[-1]["val_acc"], best_epoch=len(rows), test_acc=rows[-1]["val_acc"] - 1,
                     epochs_done=int(cfg["epochs"]), finished=True, wall_seconds=float(len(rows)), images_per_sec=100.0)
        (out_dir / "summary.json").write_text(json.dumps(final))
        return final


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        trainer = FakeTrainer(**kw)
        monkeypatch.setattr(mixlab.train, "run_training", trainer, raising=False)
        return trainer

    return install


@pytest.fixture
def recipe_file(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(dict(seed=7, batch_size=16, optimizer=dict(name="sgd", lr=0.05))))
    return str(f)


def _compare(out, recipe_file, **kw):
    kw.setdefault("epochs", 2)
    return run_compare(kw.pop("models", MODELS), out, config_file=recipe_file, data="/data/here",
                       say=lambda *_: None, **kw)


def test_every_model_trains_with_the_same_settings_then_a_rerun_skips_them(tmp_path, recipe_file, fake):
    trainer = fake()
    out = tmp_path / "cmp"
    results = _compare(out, recipe_file)
    assert [c["model"] for c in trainer.calls] == MODELS and not any(c["resume"] for c in trainer.calls)
    for c in trainer.calls:
        cfg = c["cfg"]
        assert (cfg["seed"], cfg["batch_size"], cfg["optimizer"]["lr"], cfg["epochs"]) == (7, 16, 0.05, 2)
        assert cfg["data"]["root"] == "/data/here"
    assert [r["status"] for r in results] == ["finished"] * 3
    assert all(json.loads((out / m / "summary.json").read_text())["finished"] for m in MODELS)

    again = fake()
    results = _compare(out, recipe_file)
    assert again.calls == [] and [r["status"] for r in results] == ["skipped"] * 3
    assert results[0]["summary"]["test_acc"] == 19.0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"]["models"] == MODELS and manifest["command"]["epochs"] == 2
    assert {m: manifest["runs"][m]["status"] for m in MODELS} == dict.fromkeys(MODELS, "finished")


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, recipe_file, fake):
    out = tmp_path / "cmp"
    fake(interrupt=("mobilenetv2_cifar", 1))  # killed during its second epoch
    with pytest.raises(KeyboardInterrupt):
        _compare(out, recipe_file)
    assert not (out / "vit_tiny_cifar").exists()
    assert json.loads((out / MANIFEST).read_text())["runs"]["mobilenetv2_cifar"]["status"] == "interrupted"
    plan = plan_compare(MODELS, out, 2)
    assert [p.action for p in plan] == ["skip", "resume", "start"]
    assert plan[1].reason == "interrupted after epoch 1/2"

    trainer = fake()
    lines = []
    results = run_compare(MODELS, out, config_file=recipe_file, data="/data/here", epochs=2,
                          overrides=["optimizer.lr=0.1"], say=lines.append)
    assert [(c["model"], c["resume"]) for c in trainer.calls] == [("mobilenetv2_cifar", True),
                                                                 ("vit_tiny_cifar", False)]
    # the resumed run keeps the settings it started with; the new one takes this command's
    assert trainer.calls[0]["cfg"]["optimizer"]["lr"] == 0.05 and trainer.calls[1]["cfg"]["optimizer"]["lr"] == 0.1
    assert any("optimizer.lr: 0.05 -> 0.1" in ln for ln in lines)
    assert [r["status"] for r in results] == ["skipped", "finished", "finished"]
    rows = [json.loads(x) for x in (out / "mobilenetv2_cifar" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # epoch 1 not trained twice


def test_more_epochs_extend_a_finished_run_and_a_run_without_checkpoint_restarts(tmp_path, recipe_file, fake):
    out = tmp_path / "cmp"
    fake()
    _compare(out, recipe_file, models=MODELS[:1])
    (out / "vit_tiny_cifar").mkdir(parents=True)  # died before its first epoch ended
    (out / "vit_tiny_cifar" / "config.yaml").write_text(yaml.safe_dump(dict(model="vit_tiny_cifar", epochs=3)))
    assert [p.action for p in plan_compare(["resnet18_cifar", "vit_tiny_cifar"], out, 3)] == ["extend", "restart"]
    trainer = fake()
    _compare(out, recipe_file, models=["resnet18_cifar", "vit_tiny_cifar"], epochs=3)
    assert [(c["model"], c["resume"], c["cfg"]["epochs"]) for c in trainer.calls] == [
        ("resnet18_cifar", True, 3), ("vit_tiny_cifar", False, 3)]
    assert json.loads((out / "resnet18_cifar" / "summary.json").read_text())["epochs_done"] == 3


def test_a_failing_model_stops_the_rest_unless_keep_going(tmp_path, recipe_file, fake):
    trainer = fake(fail={"mobilenetv2_cifar"})
    with pytest.raises(RuntimeError, match="diverged"):
        _compare(tmp_path / "a", recipe_file)
    assert [c["model"] for c in trainer.calls] == MODELS[:2]
    trainer = fake(fail={"mobilenetv2_cifar"})
    results = _compare(tmp_path / "b", recipe_file, keep_going=True)
    assert [r["status"] for r in results] == ["finished", "failed", "finished"]
    assert "diverged" in results[1]["error"]
    runs = json.loads((tmp_path / "b" / MANIFEST).read_text())["runs"]
    assert runs["mobilenetv2_cifar"]["status"] == "failed" and "diverged" in runs["mobilenetv2_cifar"]["error"]


def test_only_and_bad_input(tmp_path, recipe_file, fake):
    trainer = fake()
    _compare(tmp_path / "o", recipe_file, only=["vit_tiny_cifar", "resnet18_cifar"])
    assert [c["model"] for c in trainer.calls] == ["resnet18_cifar", "vit_tiny_cifar"]  # --models order
    with pytest.raises(ValueError, match="--only names mobilenetv1_cifar"):
        _compare(tmp_path / "o", recipe_file, only=["mobilenetv1_cifar"])
    with pytest.raises(KeyError, match="resnet18_cifar"):
        _compare(tmp_path / "o", recipe_file, models=["resnet18_cifarr"])
    with pytest.raises(ValueError, match="more than once"):
        _compare(tmp_path / "o", recipe_file, models=["resnet18_cifar", "resnet18_cifar"])
    other = tmp_path / "x" / "resnet18_cifar"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text(yaml.safe_dump(dict(model="vgg16_bn_cifar")))
    with pytest.raises(ValueError, match="holds a run of 'vgg16_bn_cifar'"):
        _compare(tmp_path / "x", recipe_file, models=["resnet18_cifar"])
    # a shared setting one model cannot take is refused before the first model trains
    with pytest.raises(ValueError, match="vgg16_bn_cifar has no stochastic depth"):
        _compare(tmp_path / "d", recipe_file, models=["resnet18_cifar", "vgg16_bn_cifar"],
                 overrides=["drop_path_rate=0.1"])
    assert len(trainer.calls) == 2  # nothing trained by the refused commands


def test_config_differences_ignore_what_the_trainer_fills_in():
    a = dict(model="m", epochs=3, img_size=32, data=dict(root="/a", mean=[0.5]), optimizer=dict(lr=0.1))
    b = dict(model="m", epochs=5, img_size=None, data=dict(root="/b", mean=None), optimizer=dict(lr=0.2))
    assert config_differences(a, b) == ["optimizer.lr: 0.1 -> 0.2"]
    # a recipe's first_or_random against the holdout a run resolved it to, and the order it recorded
    stored = dict(data=dict(val_holdout="first", release_order=True))
    assert config_differences(stored, dict(data=dict(val_holdout="first_or_random", release_order=None))) == []
    assert config_differences(stored, dict(data=dict(val_holdout="test"))) == ["data.val_holdout: 'first' -> 'test'"]


def test_compare_command(tmp_path, recipe_file, fake, capsys):
    trainer = fake()
    out = tmp_path / "cmp"
    args = ["compare", "--models", "resnet18_cifar,vit_tiny_cifar", "--out", str(out), "--config", recipe_file,
            "--epochs", "2", "--data", str(tmp_path), "--seed", "3"]
    assert main(args + ["--dry-run"]) == 0
    assert trainer.calls == [] and "start" in capsys.readouterr().out
    assert main(args) == 0
    text = capsys.readouterr().out
    assert [c["cfg"]["seed"] for c in trainer.calls] == [3, 3]
    table = text[text.index("| model"):]
    assert "| resnet18_cifar " in table and "| vit_tiny_cifar " in table and "19.00" in table
    assert main(args) == 0 and "skip" in capsys.readouterr().out and len(trainer.calls) == 2


def test_real_training_run_then_skip(tmp_path, make_folder_dataset, monkeypatch):
    """The real trainer, 1 epoch of a small CIFAR form on a 2-class 32x32 image folder."""
    root = make_folder_dataset(n_classes=2, per_class=(10, 4), size=32)
    out = tmp_path / "cmp"
    args = ["compare", "--models", "regnetx_200mf_cifar", "--out", str(out), "--data", str(root), "--dataset",
            "folder", "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--set", "batch_size=8",
            "--set", "progress=false", "--no-report"]
    assert main(args) == 0
    run = out / "regnetx_200mf_cifar"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 1 and summary["test_acc"] is not None
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "regnetx_200mf_cifar"
    assert (run / "last_state.pt").is_file() and (run / "last.safetensors").is_file()
    stamp = (run / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (run / "summary.json").stat().st_mtime_ns == stamp  # skipped, not retrained
