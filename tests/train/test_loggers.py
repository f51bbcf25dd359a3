"""train.log, steps.csv and TensorBoard events of a run, written and read back."""
from __future__ import annotations

import csv
import json

import pytest

from mixlab.cli import main
from mixlab.train import rundir as rd
from mixlab.train.loggers import STEPS_CSV, TB_DIR, TRAIN_LOG

TINY = ["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--dataset", "folder",
        "--batch-size", "4", "--precision", "fp32", "--set", "progress=false", "--set", "autotune=false"]


def _steps(run) -> list[dict]:
    with open(run / STEPS_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_tensorboard_and_train_log_hold_what_the_run_printed(make_folder_dataset, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_folder_dataset(n_classes=2, per_class=(10, 2), size=8)  # 18 train / 2 val: 5 steps of 4
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(data), "--epochs", "2", "--logger", "csv,tensorboard",
                 "--set", "log.every_n_steps=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    log = (out / TRAIN_LOG).read_text()
    epoch_lines = [ln for ln in printed.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(ln in log for ln in epoch_lines) and "test accuracy" in log

    rows = _steps(out)
    assert [int(r["step"]) for r in rows] == [2, 4, 7, 9]  # every 2nd step of each 5-step epoch
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    assert all(float(r["lr"]) == pytest.approx(1e-3) for r in rows)

    acc = EventAccumulator(str(out / TB_DIR))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss_step")] == [2, 4, 7, 9]
    assert [e.value for e in acc.Scalars("train/loss_step")] == pytest.approx([float(r["loss"]) for r in rows])
    metrics = rd.read_metrics(out)
    assert [e.value for e in acc.Scalars("val/val_acc")] == pytest.approx([m["val_acc"] for m in metrics])
    assert [e.step for e in acc.Scalars("train/train_loss")] == [5, 10]


def test_a_resumed_run_logs_what_an_uninterrupted_one_does(make_folder_dataset, tmp_path, monkeypatch):
    data = make_folder_dataset(n_classes=2, per_class=(10, 2), size=8)
    args = [*TINY, "--data", str(data), "--epochs", "3", "--logger", "csv", "--set", "log.every_n_steps=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*args, "--out", str(full)]) == 0

    import mixlab.train.loop as loop

    real, calls = loop.evaluate, {"n": 0}

    def stop_in_epoch_2(*a, **k):  # after epoch 2's steps were logged, before its checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate", stop_in_epoch_2)
    assert main([*args, "--out", str(part)]) == 130
    assert len(_steps(part)) == 10  # epoch 2's steps are in the file, its checkpoint is not
    monkeypatch.setattr(loop, "evaluate", real)
    assert main(["train", "--resume", str(part)]) == 0
    assert _steps(part) == _steps(full)
    assert (part / TRAIN_LOG).read_text().count("epoch 1/3:") == 1  # appended, not rewritten
    assert "resuming" in (part / TRAIN_LOG).read_text()


def test_bad_logging_and_init_settings_are_refused_before_anything_runs(make_folder_dataset, tmp_path, capsys):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    assert main([*TINY, "--data", str(data), "--logger", "csv,wandb", "--out", str(tmp_path / "a")]) == 2
    assert "unknown logger 'wandb'" in capsys.readouterr().err
    assert main([*TINY, "--data", str(data), "--set", "log.every_n_steps=0", "--out", str(tmp_path / "b")]) == 2
    assert "log.every_n_steps" in capsys.readouterr().err
    assert main([*TINY, "--data", str(data), "--freeze-backbone", "--out", str(tmp_path / "c")]) == 2
    assert "--init" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_runs_without_loggers_write_no_log_files_but_train_log(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(data), "--epochs", "1", "--out", str(out)]) == 0
    assert (out / TRAIN_LOG).is_file() and not (out / STEPS_CSV).exists() and not (out / TB_DIR).exists()
    assert json.loads((out / "summary.json").read_text())["finished"]
