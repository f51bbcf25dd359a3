"""`mixlab seg train / eval / predict` end to end on a tiny generated UNeXt-layout folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import make_mask_folder
from mixlab.cli import main
from mixlab.train import rundir as rd
from mixlab.train.config import resolve_config
from mixlab.tasks.segmentation import SPLIT_TRAIN, SPLIT_VAL
from mixlab.train.optim import lr_factor

# unext_s at 32x32 in fp32 on one thread: a few seconds per run
TINY = ["--model", "unext_s", "--batch-size", "4", "--precision", "fp32", "--set", "img_size=32",
        "--set", "progress=false", "--set", "data.val_split=0.25"]


def _make_busi_like(root: Path, n: int = 12, size: int = 32) -> Path:
    """Images with a bright blob on noise; the mask is the blob (so IoU can rise above chance)."""
    return make_mask_folder(root, n, size)


def seg(*args) -> None:
    assert main(["seg", *args]) == 0


def metrics_without_timing(run: Path) -> list[dict]:
    drop = {"epoch_seconds", "train_seconds", "images_per_sec"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rd.read_metrics(run)]


def test_seg_run_directory_eval_and_predict(tmp_path, capsys):
    data = _make_busi_like(tmp_path / "busi")
    out = tmp_path / "run"
    seg("train", *TINY, "--data", str(data), "--epochs", "2", "--out", str(out))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors", "last.safetensors",
                 "last_state.pt", "curves.png", SPLIT_TRAIN, SPLIT_VAL):
        assert (out / name).is_file(), name
    train_names = (out / SPLIT_TRAIN).read_text().split()
    val_names = (out / SPLIT_VAL).read_text().split()
    assert len(val_names) == 3 and len(train_names) == 9  # ceil(12 * 0.25) held out
    assert sorted(train_names + val_names) == [f"case{i:02d}" for i in range(12)]
    rows = rd.read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = rd.read_summary(out)
    assert summary["finished"] and summary["task"] == "segmentation" and summary["params"] == 253_561
    assert summary["best_val_iou"] == max(r["val_iou"] for r in rows)
    assert Image.open(out / "curves.png").format == "PNG"

    # eval of the best weights on the run's own val split gives the summary's figures
    capsys.readouterr()
    seg("eval", "--checkpoint", str(out), "--json")
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 3 and r["official_batch_size"] == 4
    assert 100 * r["iou"] == pytest.approx(summary["val"]["iou"], abs=1e-9)
    assert 100 * r["dice"] == pytest.approx(summary["val"]["dice"], abs=1e-9)
    assert r["per_image"]["name"] == val_names and len(r["per_image"]["iou"]) == 3
    # the last epoch's logged val IoU/Dice are those of the last weights
    seg("eval", "--checkpoint", str(out), "--weights", "last", "--json")
    last = json.loads(capsys.readouterr().out)
    assert 100 * last["iou"] == pytest.approx(rows[-1]["val_iou"], abs=1e-9)
    assert 100 * last["dice"] == pytest.approx(rows[-1]["val_dice"], abs=1e-9)

    # predict on the data folder: a 0/255 mask per image at the image's size, and overlays
    pred = tmp_path / "pred"
    capsys.readouterr()
    seg("predict", "--checkpoint", str(out), "--input", str(data), "--out", str(pred), "--json")
    p = json.loads(capsys.readouterr().out)
    assert p["images"] == 12 and p["with_truth"] == 12 and p["masks"] == 12 and p["overlays"] == 12
    m = np.asarray(Image.open(pred / "masks" / "0" / "case00.png"))
    assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255}
    assert Image.open(pred / "overlays" / "case00.png").format == "PNG"


def test_interrupted_and_resumed_seg_run_equals_uninterrupted(tmp_path, monkeypatch):
    data = _make_busi_like(tmp_path / "busi")
    extra = ["--data", str(data), "--epochs", "3", "--set", "schedule.name=cosine",
             "--set", "schedule.min_lr=0.0001", "--set", "augment.crop_scale=[0.5,1.0]",
             "--set", "augment.brightness=0.2"]
    full, part = tmp_path / "full", tmp_path / "part"
    seg("train", *TINY, *extra, "--out", str(full))

    import mixlab.train.loop as st

    real_evaluate, calls = st.evaluate, {"n": 0}

    def interrupt_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after epoch 2's training steps, before its checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(st, "evaluate", interrupt_in_epoch_2)
    assert main(["seg", "train", *TINY, *extra, "--out", str(part)]) == 130
    assert len(rd.read_metrics(part)) == 1 and not rd.read_summary(part)["finished"]
    monkeypatch.setattr(st, "evaluate", real_evaluate)
    seg("train", "--resume", str(part))
    assert metrics_without_timing(part) == metrics_without_timing(full)
    assert rd.read_summary(part)["val"] == rd.read_summary(full)["val"]


def test_split_files_are_used_and_checked(tmp_path, capsys):
    data = _make_busi_like(tmp_path / "busi")
    (tmp_path / "val.txt").write_text("# held out\ncase00\ncase01.png\n")
    out = tmp_path / "run"
    seg("train", *TINY, "--data", str(data), "--epochs", "1", "--val-split", str(tmp_path / "val.txt"),
        "--out", str(out))
    assert (out / SPLIT_VAL).read_text().split() == ["case00", "case01"]
    assert len((out / SPLIT_TRAIN).read_text().split()) == 10
    (tmp_path / "bad.txt").write_text("case00\nnot_a_case\n")
    assert main(["seg", "train", *TINY, "--data", str(data), "--epochs", "1", "--val-split",
                 str(tmp_path / "bad.txt"), "--out", str(tmp_path / "r2")]) == 2
    assert "not_a_case" in capsys.readouterr().err


def test_wrong_task_and_bad_settings_are_refused_with_a_message(tmp_path, capsys):
    data = _make_busi_like(tmp_path / "busi", n=8)  # 6 train / 2 val
    cases = [
        (["seg", "train", "--model", "convmixer_256_8", "--data", str(data), "--out", str(tmp_path / "a")],
         "classification model"),
        (["train", "--recipe", "unext-busi", "--out", str(tmp_path / "b")], "mixlab seg train"),
        (["seg", "train", "--recipe", "seed-convmixer-keras", "--data", str(data)], "`mixlab train`"),
        (["seg", "train", "--model", "unext", "--set", "loss.name=jaccard", "--data", str(data)], "bce_dice"),
        (["seg", "train", "--model", "unext", "--set", "augment.mixup_alpha=0.2", "--data", str(data)],
         "mixup_alpha"),
        (["seg", "train", "--model", "unext"], "--data"),
        (["seg", "train", *TINY, "--data", str(data), "--set", "img_size=40", "--out", str(tmp_path / "c")],
         "multiples of 32"),
        (["seg", "train", *TINY, "--data", str(data), "--batch-size", "8", "--out", str(tmp_path / "e")],
         "fewer than one batch"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="mixlab seg train"):  # e.g. `mixlab compare --models unext,...`
        resolve_config(model="unext", task="classification")
    for bad, needle in ((["schedule.name=cosine", "schedule.per_epoch=true", "schedule.warmup_epochs=2"], "per_epoch"),
                        (["augment.crop_scale=0.5"], "crop_scale"), (["loss.name=null"], "loss.name"),
                        (["threshold=null"], "threshold")):
        with pytest.raises(ValueError, match=needle):
            resolve_config(model="unext", task="segmentation", overrides=bad)
    assert not any((tmp_path / d).exists() for d in "ace")


def test_a_classification_run_is_not_resumed_or_evaluated_as_segmentation(tmp_path, make_folder_dataset, capsys):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    out = tmp_path / "cls"
    assert main(["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--data", str(data),
                 "--dataset", "folder", "--epochs", "1", "--batch-size", "4", "--set", "progress=false",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["seg", "train", "--resume", str(out)]) == 2
    assert "mixlab train --resume" in capsys.readouterr().err
    assert main(["seg", "eval", "--checkpoint", str(out)]) == 2
    assert "mixlab eval" in capsys.readouterr().err


def test_per_epoch_cosine_equals_torch_cosine_annealing_stepped_each_epoch():
    """The unext-busi schedule: CosineAnnealingLR(T_max=epochs, eta_min=1e-5), stepped per epoch."""
    sched = dict(name="cosine", min_lr=1e-5, per_epoch=True)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-4)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=1e-5)
    steps = 7
    for epoch in range(40):
        expected = opt.param_groups[0]["lr"]
        for i in range(steps):  # every step of the epoch gets the epoch's rate
            assert 1e-4 * lr_factor(sched, 40, epoch + (i + 1) / steps, 1e-4) == pytest.approx(expected, rel=1e-12)
        opt.step()
        ref.step()
    # min_lr is absolute: per-step cosine ends exactly at it
    assert 1e-4 * lr_factor(dict(name="cosine", min_lr=1e-5), 40, 40, 1e-4) == pytest.approx(1e-5)


def test_unext_busi_recipe_is_the_papers_setup():
    cfg = resolve_config(recipe="unext-busi", task="segmentation")
    assert cfg["model"] == "unext" and cfg["batch_size"] == 8 and cfg["img_size"] == 256
    assert cfg["optimizer"]["name"] == "adam" and cfg["optimizer"]["lr"] == 1e-4
    assert cfg["schedule"] == dict(name="cosine", warmup_epochs=0.0, min_lr=1e-5, per_epoch=True)
    assert cfg["loss"]["name"] == "bce_dice" and cfg["data"]["val_split"] == 0.2


def test_native_size_run_without_val_split_resumes_evaluates_and_predicts(tmp_path, capsys):
    """img_size null keeps the files' size ([H, W] in config.yaml); val_split 0 trains on everything."""
    data = _make_busi_like(tmp_path / "busi", n=8)
    out = tmp_path / "run"
    seg("train", *TINY, "--data", str(data), "--epochs", "1", "--set", "img_size=null", "--set", "data.val_split=0",
        "--out", str(out))
    assert rd.read_config(out)["img_size"] == [32, 32] and not (out / SPLIT_VAL).exists()
    assert not (out / "best.safetensors").exists() and rd.read_summary(out)["val_images"] == 0
    seg("train", "--resume", str(out), "--epochs", "2")
    assert [r["epoch"] for r in rd.read_metrics(out)] == [1, 2] and rd.read_summary(out)["epochs_done"] == 2
    assert main(["seg", "eval", "--checkpoint", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    seg("eval", "--checkpoint", str(out), "--data", str(data), "--json")
    assert json.loads(capsys.readouterr().out)["images"] == 8
    seg("predict", "--checkpoint", str(out), "--input", str(data / "images" / "case03.png"), "--out", str(tmp_path / "p"))
    assert np.asarray(Image.open(tmp_path / "p" / "masks" / "0" / "case03.png")).shape == (32, 32)


def test_predict_refuses_ground_truth_with_other_classes_before_writing(tmp_path, capsys):
    data = _make_busi_like(tmp_path / "busi", n=8)
    out = tmp_path / "run"
    seg("train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    two = tmp_path / "two"
    (two / "images").mkdir(parents=True)
    for k in (0, 1):
        (two / "masks" / str(k)).mkdir(parents=True)
    img = np.asarray(Image.open(data / "images" / "case00.png"))
    Image.fromarray(img).save(two / "images" / "x.png")
    for k in (0, 1):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(two / "masks" / str(k) / "x.png")
    capsys.readouterr()
    assert main(["seg", "predict", "--checkpoint", str(out), "--input", str(two), "--out", str(tmp_path / "p")]) == 2
    assert "2" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_seg_runs_are_refused_by_classification_commands_and_left_out_of_reports(tmp_path, capsys):
    from mixlab.analysis.report import collect_runs

    data = _make_busi_like(tmp_path / "busi", n=8)
    out = tmp_path / "runs" / "seg"
    seg("train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert "mixlab seg eval" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "mixlab seg train --resume" in capsys.readouterr().err
    assert collect_runs(tmp_path / "runs") == []


def test_diverged_seg_training_prints_a_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import mixlab.train.loop as st

    data = _make_busi_like(tmp_path / "busi", n=8)
    out = tmp_path / "run"
    real_call = st.TrainStep.__call__

    def nan_in_epoch_2(self, x, y):
        loss, logits = real_call(self, x, y)
        return (loss * float("nan") if len(rd.read_metrics(out)) >= 1 else loss), logits

    monkeypatch.setattr(st.TrainStep, "__call__", nan_in_epoch_2)
    assert main(["seg", "train", *TINY, "--data", str(data), "--epochs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "last good checkpoint (epoch 1)" in err and "Traceback" not in err
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 1


def test_resume_refuses_last_weights_and_state_of_different_epochs(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    data = _make_busi_like(tmp_path / "busi", n=8)
    out = tmp_path / "run"
    seg("train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out))
    weights = load_file(str(out / "last.safetensors"))
    save_file(weights, str(out / "last.safetensors"), metadata={"model": "unext_s", "format": "mixlab", "epoch": "2"})
    capsys.readouterr()
    assert main(["seg", "train", "--resume", str(out), "--epochs", "3"]) == 2
    assert "epoch 2" in capsys.readouterr().err and len(rd.read_metrics(out)) == 1
