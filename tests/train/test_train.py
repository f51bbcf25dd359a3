"""`mixlab train` / `mixlab eval` end to end on tiny data: files, resume, DDP, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mixlab.cli import main
from mixlab.train import rundir as rd
from mixlab.train.config import resolve_config
from mixlab.errors import TrainingDiverged
from mixlab.train import run_training
from mixlab.train.optim import lr_factor
from mixlab.tasks import load_run_model

TINY = ["--model", "convmixer_256_8", "--model-kwargs", "dim=16,depth=2", "--dataset", "folder",
        "--batch-size", "8", "--set", "data.val_split=0.25", "--set", "progress=false", "--precision", "fp32"]


def train(*argv):
    assert main(["train", *argv]) == 0


def metrics_without_timing(run_dir):
    keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    return [{k: r[k] for k in keep} for r in rd.read_metrics(run_dir)]


def test_run_directory_contents(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    out = tmp_path / "run"
    train(*TINY, "--data", str(data), "--epochs", "2", "--out", str(out))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "convmixer_256_8" and cfg["num_classes"] == 3 and cfg["img_size"] == 16
    rows = rd.read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_sec"):
        assert rows[0][key] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 2 and 0 <= summary["test_acc"] <= 100
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert summary["selected_on_test"] is False and summary["selected_on"] == "val"
    assert "25% of train held out" in summary["protocol"]
    assert summary["params"] == sum(p.numel() for p in load_run_model(out)[0].parameters())
    from PIL import Image

    assert Image.open(out / "curves.png").size[0] > 200
    for name in ("best.safetensors", "last.safetensors", "last_state.pt"):
        assert (out / name).is_file()
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 2
    assert not list(out.glob("*.tmp"))


def test_an_existing_run_is_never_overwritten(make_folder_dataset, tmp_path, capsys):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    out = tmp_path / "run"
    train(*TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    before = (out / "last.safetensors").read_bytes()
    assert main(["train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "last.safetensors").read_bytes() == before


def test_interrupted_and_resumed_run_equals_uninterrupted(make_folder_dataset, tmp_path, monkeypatch):
    data = make_folder_dataset(n_classes=3, per_class=(12, 4), size=16)
    extra = ["--data", str(data), "--epochs", "3", "--set", "schedule.name=cosine",
             "--set", "augment.crop_padding=2", "--set", "augment.mixup_alpha=0.2", "--set", "augment.rotate=10"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(*TINY, *extra, "--out", str(full))

    import mixlab.train.loop as trainer

    real_evaluate, calls = trainer.evaluate, {"n": 0}

    def interrupt_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after epoch 2's training steps, before its checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(trainer, "evaluate", interrupt_in_epoch_2)
    assert main(["train", *TINY, *extra, "--out", str(part)]) == 130
    assert len(rd.read_metrics(part)) == 1 and not rd.read_summary(part)["finished"]
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    train("--resume", str(part))
    assert metrics_without_timing(part) == metrics_without_timing(full)
    assert rd.read_summary(part)["test_acc"] == rd.read_summary(full)["test_acc"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_folder_dataset, tmp_path, monkeypatch):
    data = make_folder_dataset(n_classes=2, per_class=(8, 2), size=8)
    out = tmp_path / "run"
    import mixlab.train.loop as trainer

    real_call, epochs_seen = trainer.TrainStep.__call__, []

    def nan_in_epoch_2(self, x, y):
        loss, logits = real_call(self, x, y)
        return (loss * float("nan") if len(rd.read_metrics(out)) >= 1 else loss), logits

    monkeypatch.setattr(trainer.TrainStep, "__call__", nan_in_epoch_2)
    cfg = resolve_config(model="convmixer_256_8", data=str(data), dataset="folder", epochs=3, batch_size=4,
                         model_kwargs={"dim": 8, "depth": 1}, overrides=["progress=false", "precision=fp32"])
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        run_training(cfg, out)
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(t.float()).all() for t in load_file(str(out / "last.safetensors")).values())


def test_resume_with_another_architecture_is_refused(make_folder_dataset, tmp_path, capsys):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    out = tmp_path / "run"
    train(*TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    assert main(["train", "--resume", str(out), "--model", "convmixer_768_32_k7_p7"]) == 2
    assert "does not match" in capsys.readouterr().err


def test_resume_on_data_of_the_other_order_is_refused(make_cifar_pickle, make_folder_dataset, tmp_path, capsys):
    release = make_cifar_pickle("cifar10", n_train=40, n_test=10)
    tree = make_folder_dataset(n_classes=10, per_class=(4, 1), size=32, root=tmp_path / "tree")
    out = tmp_path / "run"
    argv = ["cifar10" if a == "folder" else a for a in TINY]
    train(*argv, "--data", str(release), "--epochs", "1", "--set", "data.val_holdout=first_or_random",
          "--out", str(out))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    # the run's config says what the recipe's first_or_random became on this source
    assert cfg["data"]["val_holdout"] == "first" and cfg["data"]["release_order"] is True
    assert main(["train", "--resume", str(out), "--epochs", "2", "--data", str(tree)]) == 2
    err = capsys.readouterr().err
    assert "trained on the python release" in err and "image-folder tree" in err
    assert main(["train", "--resume", str(out), "--epochs", "2", "--data", str(release)]) == 0


def test_eval_of_a_checkpoint_with_other_weights_names_the_mismatch(make_folder_dataset, tmp_path, capsys):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    a, b = tmp_path / "a", tmp_path / "b"
    train(*TINY, "--data", str(data), "--epochs", "1", "--out", str(a))
    train("--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", *TINY[4:], "--data", str(data),
          "--epochs", "1", "--out", str(b))
    (a / "best.safetensors").write_bytes((b / "best.safetensors").read_bytes())
    assert main(["eval", "--checkpoint", str(a)]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "Traceback" not in err


def test_eval_json_and_plot(make_folder_dataset, tmp_path, capsys):
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    out = tmp_path / "run"
    train(*TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json", "--plot"]) == 0
    r = json.loads(capsys.readouterr().out)
    conf = torch.tensor(r["confusion"])
    assert conf.sum() == 12 and r["accuracy"] == pytest.approx(100 * conf.diag().sum().item() / 12)
    assert r["accuracy"] == pytest.approx(rd.read_summary(out)["test_acc"])  # same weights, same numbers
    assert set(r["per_class_accuracy"]) == {"class0", "class1", "class2"}
    from PIL import Image

    assert Image.open(out / "confusion_test.png").format == "PNG"


def test_unknown_recipe_and_config_keys_are_named(tmp_path, capsys):
    assert main(["train", "--recipe", "seed-convmixer-kears", "--out", str(tmp_path / "x")]) == 2
    assert "seed-convmixer-keras" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: convmixer_256_8\noptimizer: {lr: 0.1, momentun: 0.9}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 2
    assert "momentun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_recipes_resolve():
    for name, model in (("seed-convmixer-keras", "convmixer_256_8"), ("convmixer-cifar10-25ep", "convmixer_256_8")):
        assert resolve_config(recipe=name)["model"] == model
    c = resolve_config(recipe="convmixer-cifar10-25ep")
    assert c["optimizer"]["lr"] == 0.05 and c["augment"]["randaugment_n"] == 2 and c["epochs"] == 25


def test_onecycle_matches_the_public_script():
    sched = {"name": "onecycle"}
    assert lr_factor(sched, 25, 0) == 0 and lr_factor(sched, 25, 10) == 1
    assert lr_factor(sched, 25, 20) == pytest.approx(1 / 20) and lr_factor(sched, 25, 25) == 0
    assert lr_factor(sched, 25, 5) == pytest.approx(0.5)


def test_ddp_two_cpu_processes_gloo(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_classes=2, per_class=(8, 4), size=8)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", MIXLAB_DEVICE="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mixlab", "train", *TINY, "--device", "cpu", "--data", str(data), "--epochs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = rd.read_summary(out)
    assert s["finished"] and s["world_size"] == 2
    rows = rd.read_metrics(out)
    assert len(rows) == 2
    assert "x 2 ranks" in proc.stdout


def test_resume_refuses_the_flags_it_would_ignore(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--resume", run, "--batch-size", "4", "--set", "optimizer.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size, --set would be ignored" in err and "--epochs" in err
    assert main(["seg", "train", "--resume", run, "--precision", "fp32"]) == 2
    assert "--precision would be ignored" in capsys.readouterr().err


def test_validating_on_the_test_set_is_the_seeds_protocol_and_says_so(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    out = tmp_path / "run"
    train(*TINY, "--data", str(data), "--epochs", "2", "--out", str(out), "--set", "data.val_holdout=test")
    summary = json.loads((out / "summary.json").read_text())
    # the kept "val" weights are the best on the test set: tested, they score the best "val" accuracy
    assert summary["selected_on_test"] is True and summary["selected_on"] == "test"
    assert "selected on the test set" in summary["protocol"]
    assert summary["test_acc"] == summary["best_val_acc"]


def test_init_from_a_run_keeps_its_backbone_and_gives_other_classes_a_new_head(make_folder_dataset, tmp_path,
                                                                               capsys):
    from safetensors.torch import load_file

    from mixlab.cli import main
    from mixlab.tasks.classification import ClassificationTask

    base = ["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--dataset", "folder",
            "--batch-size", "4", "--epochs", "1", "--precision", "fp32", "--set", "progress=false",
            "--set", "autotune=false"]
    src_data = make_folder_dataset(n_classes=3, per_class=(6, 2), size=8)
    source = tmp_path / "source"
    assert main([*base, "--data", str(src_data), "--out", str(source)]) == 0
    other = tmp_path / "other"
    for split in ("train", "test"):  # two classes of other names
        for old, new in (("class0", "x"), ("class1", "y")):
            import shutil

            shutil.copytree(src_data / split / old, other / split / new)
    run = tmp_path / "tuned"
    capsys.readouterr()
    assert main([*base, "--data", str(other), "--init", str(source), "--freeze-backbone", "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "loaded" in printed and str(source) in printed
    start, end = load_file(str(source / "best.safetensors")), load_file(str(run / "last.safetensors"))
    convs = [k for k, v in start.items() if v.ndim == 4]
    assert convs and all(torch.equal(start[k], end[k]) for k in convs)  # frozen, as loaded
    head = [k for k in end if k.startswith("head.")]
    assert head and end["head.weight"].shape[0] == 2
    # the classifier is reused only from a run that predicts the same classes
    task = ClassificationTask()
    task.data = type("D", (), {"classes": rd.read_summary(source)["classes"]})()
    assert task.new_classifier_for(source) is False
    task.data.classes = ["x", "y"]
    assert task.new_classifier_for(source) is True and task.new_classifier_for(source / "best.safetensors")


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(make_folder_dataset, tmp_path, capsys):
    from mixlab.cli import main

    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=16)
    args = ["train", "--model", "convmixer_256_8", "--dataset", "folder", "--data", str(data), "--epochs", "1",
            "--batch-size", "50000000", "--set", "progress=false", "--set", "autotune=false", "--precision", "fp32"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "a training step of convmixer_256_8 with batch 50000000 at 16x16 needs about" in err
    assert "memory_check=false" in err and not rd.has_checkpoint(tmp_path / "run")
