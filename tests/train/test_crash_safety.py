"""Crash-safe checkpoints, one writer per run directory, and no dead ends on resume.

The fault-injection tests SIGKILL a real `python -m mixlab train` at every named point of a
checkpoint write (``MIXLAB_TEST_CRASH_AT=EVENT:EPOCH``, see ``rundir.CRASH_EVENTS``), then
resume it and compare its metrics with an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixlab.cli import main
from mixlab.train import rundir as rd
from mixlab.train import runlock

TINY = ["--model", "convmixer_256_8", "--model-kwargs", "dim=16,depth=2", "--dataset", "folder",
        "--batch-size", "8", "--set", "data.val_split=0.25", "--set", "progress=false", "--precision", "fp32",
        "--set", "fast_depthwise=false", "--set", "autotune=false", "--set", "schedule.name=cosine",
        "--set", "augment.crop_padding=2"]
EPOCHS = ["--epochs", "3"]


def _folder_dataset(root: Path, n_classes=3, per_class=(12, 4), size=16) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(n_classes):
            d = root / split / f"class{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                q = size // 2
                r, c = divmod(k % 4, 2)
                img[r * q:(r + 1) * q, c * q:(c + 1) * q, k % 3] = 200
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def metrics_without_timing(run_dir):
    keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    return [{k: r[k] for k in keep} for r in rd.read_metrics(run_dir)]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", MIXLAB_NO_PROGRESS="1", MIXLAB_DEVICE="cpu", **extra)


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name.endswith(".tmp") or p.name.startswith(".ckpt-") or p.name == runlock.LOCK)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """(data root, an uninterrupted 3-epoch run directory)."""
    base = tmp_path_factory.mktemp("crash")
    data = _folder_dataset(base / "data")
    full = base / "full"
    assert main(["train", *TINY, *EPOCHS, "--data", str(data), "--out", str(full)]) == 0
    return data, full


# every point of the checkpoint of epoch 2 (a previous checkpoint exists), and points of
# epoch 1 (none yet; best.safetensors is written only when validation improves, which the
# first epoch always does)
POINTS = ([(e, 2) for e in rd.CRASH_EVENTS if not e.startswith("best")]
          + [("best.tmp", 1), ("best", 1), ("manifest.tmp", 1), ("renamed-state", 1)])


def test_the_crash_points_are_enumerated():
    assert {e for e, _ in POINTS} == set(rd.CRASH_EVENTS)


@pytest.mark.slow
@pytest.mark.parametrize("event,epoch", POINTS, ids=[f"{e}@{n}" for e, n in POINTS])
def test_a_kill_at_any_point_of_a_checkpoint_resumes_to_the_same_metrics(baseline, tmp_path, event, epoch):
    data, full = baseline
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixlab", "train", *TINY, *EPOCHS, "--data", str(data), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(MIXLAB_TEST_CRASH_AT=f"{event}:{epoch}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    committed = rd.CRASH_EVENTS.index(event) >= rd.CRASH_EVENTS.index("manifest")
    done = epoch if committed else epoch - 1
    assert (rd.checkpoint_epoch(out) or 0) == done
    if epoch == 2 and not committed:  # the previous checkpoint is whole at its public paths
        assert rd._weights_epoch(out / rd.LAST) == 1 and rd.load_state(out)["epoch"] == 1
        assert len(rd.read_metrics(out)) == 1
    # the dead run left its lock: the resume takes it over
    assert runlock.read_lock(out)["pid"] != os.getpid()
    assert main(["train", "--resume", str(out)]) == 0
    assert metrics_without_timing(out) == metrics_without_timing(full)
    assert rd.read_summary(out)["test_acc"] == rd.read_summary(full)["test_acc"]
    assert rd.read_summary(out)["best_epoch"] == rd.read_summary(full)["best_epoch"]
    assert _leftovers(out) == []
    m = rd.read_manifest(out)
    assert m["epoch"] == 3 and all(not (out / f).exists() for f in m["files"].values())


@pytest.mark.slow
def test_a_killed_seg_checkpoint_resumes_to_the_same_metrics(tmp_path):
    from test_seg_train import TINY as SEG_TINY, _make_busi_like, metrics_without_timing as seg_metrics

    data = _make_busi_like(tmp_path / "busi", n=8)
    args = [*SEG_TINY, "--set", "fast_depthwise=false", "--set", "autotune=false", "--data", str(data),
            "--epochs", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["seg", "train", *args, "--out", str(full)]) == 0
    for event, out in (("metrics", part), ("renamed-last", tmp_path / "part2")):
        cmd = [sys.executable, "-m", "mixlab", "seg", "train", *args, "--out", str(out)]
        proc = subprocess.run(cmd, env=_env(MIXLAB_TEST_CRASH_AT=f"{event}:2"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert main(["seg", "train", "--resume", str(out)]) == 0
        assert seg_metrics(out) == seg_metrics(full)
        assert rd.read_summary(out)["val"] == rd.read_summary(full)["val"]
        assert _leftovers(out) == []


# ----------------------------------------------------------------------------- Ctrl-C (SIGINT)
# A SIGINT is raised by Python as KeyboardInterrupt in the main thread, at the point the
# signal arrives: the CLI ends with 130 after the context managers ran (temp file removed,
# lock released), so these runs stay in this process (no interpreter start per point). Both
# tasks, every event of a checkpoint write, with 2 epochs (the interrupted checkpoint is
# epoch 2's, so a previous one exists; best.* are the points of epoch 1).

SIGINT_POINTS = ([(e, 2) for e in rd.CRASH_EVENTS if not e.startswith("best")]
                 + [("best.tmp", 1), ("best", 1)])


def _interrupt_then_resume(argv: list[str], out: Path, event: str, epoch: int, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MIXLAB_TEST_CRASH_AT", f"{event}:{epoch}")
    monkeypatch.setenv("MIXLAB_TEST_CRASH_SIGNAL", "INT")
    # Python's own Ctrl-C behaviour (KeyboardInterrupt), whatever handler an earlier test left
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main([*argv, "--out", str(out)]) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    assert "interrupted" in capsys.readouterr().err
    assert not (out / runlock.LOCK).exists()  # released on the way out
    committed = rd.CRASH_EVENTS.index(event) >= rd.CRASH_EVENTS.index("manifest")
    assert (rd.checkpoint_epoch(out) or 0) == (epoch if committed else epoch - 1)
    monkeypatch.delenv("MIXLAB_TEST_CRASH_AT")
    assert main([*argv[:2 if argv[0] == "seg" else 1], "--resume", str(out)]) == 0
    assert _leftovers(out) == []


@pytest.fixture(scope="module")
def sigint_runs(tmp_path_factory):
    """{task: (argv without --out, an uninterrupted run)} for 2-epoch runs of both tasks."""
    from test_seg_train import TINY as SEG_TINY, _make_busi_like

    base = tmp_path_factory.mktemp("sigint")
    data = _folder_dataset(base / "cls")
    seg_data = _make_busi_like(base / "seg", n=8)
    runs = {"classification": ["train", *TINY, "--epochs", "2", "--data", str(data)],
            "segmentation": ["seg", "train", *SEG_TINY, "--set", "fast_depthwise=false", "--set", "autotune=false",
                             "--epochs", "2", "--data", str(seg_data)]}
    out = {}
    for task, argv in runs.items():
        full = base / f"full-{task}"
        assert main([*argv, "--out", str(full)]) == 0
        out[task] = (argv, full)
    return out


def test_the_sigint_points_cover_every_event():
    assert {e for e, _ in SIGINT_POINTS} == set(rd.CRASH_EVENTS)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("event,epoch", SIGINT_POINTS, ids=[f"{e}@{n}" for e, n in SIGINT_POINTS])
def test_a_ctrl_c_at_any_point_of_a_checkpoint_resumes_to_the_same_metrics(sigint_runs, tmp_path, task, event,
                                                                         epoch, monkeypatch, capsys):
    from test_seg_train import metrics_without_timing as seg_metrics

    argv, full = sigint_runs[task]
    out = tmp_path / "run"
    _interrupt_then_resume(argv, out, event, epoch, monkeypatch, capsys)
    if task == "classification":
        assert metrics_without_timing(out) == metrics_without_timing(full)
        assert rd.read_summary(out)["test_acc"] == rd.read_summary(full)["test_acc"]
    else:
        assert seg_metrics(out) == seg_metrics(full)
        assert rd.read_summary(out)["val"] == rd.read_summary(full)["val"]


def test_a_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(baseline, tmp_path, monkeypatch, capsys):
    data, full = baseline
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", *TINY, *EPOCHS, "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("mixlab train: error:")]
    assert "Traceback" not in err and "inline_container" not in err
    assert f"{out / 'last_state.pt'} (" in line and "file write failed" in line
    assert "the checkpoint of epoch 1 is intact" in line and f"--resume {out}" in line
    assert rd.checkpoint_epoch(out) == 1 and len(rd.read_metrics(out)) == 1 and _leftovers(out) == []

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(rd, "_save_safetensors", no_space)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert ".safetensors (no space left on device)" in err and "epoch 1 is intact" in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    assert metrics_without_timing(out) == metrics_without_timing(full)


def test_stale_temp_files_are_removed_at_resume(baseline, tmp_path):
    data, _ = baseline
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(out)]) == 0
    (out / ".last.safetensors.abc123.tmp").write_bytes(b"x")
    (out / ".ckpt-000002.last_state.pt").write_bytes(b"x")  # staged, never committed
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert _leftovers(out) == [] and rd.checkpoint_epoch(out) == 2


# ----------------------------------------------------------------------------- one writer per run

def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK).write_text(json.dumps(dict(pid=pid, host=host or socket.gethostname(),
                                                        since="2026-01-01 00:00:00", token="t")))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_training_into_a_locked_folder_is_refused(baseline, tmp_path, capsys):
    data, _ = baseline
    out = tmp_path / "run"
    _write_lock(out, os.getpid())  # a live training (this process) holds it
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "another training" in err
    assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK]  # nothing written

    # ... also while it is past its first checkpoint, and for --resume
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(tmp_path / "b")]) == 0
    _write_lock(tmp_path / "b", os.getpid())
    before = (tmp_path / "b" / rd.LAST).read_bytes()
    assert main(["train", "--resume", str(tmp_path / "b"), "--epochs", "2"]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert (tmp_path / "b" / rd.LAST).read_bytes() == before and rd.checkpoint_epoch(tmp_path / "b") == 1

    # a lock from another host cannot be checked: refused, saying how to clear it
    _write_lock(out, 1, host="elsewhere.invalid")
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(out)]) == 2
    assert "delete" in capsys.readouterr().err


def test_a_stale_lock_is_taken_over(baseline, tmp_path, capsys):
    data, _ = baseline
    out = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(out, dead)
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(out)]) == 0
    assert f"lock of pid {dead}, which is no longer running" in capsys.readouterr().out
    assert not (out / runlock.LOCK).exists() and rd.checkpoint_epoch(out) == 1


def test_the_lock_is_held_during_training_and_released_after(tmp_path):
    run = tmp_path / "run"
    with runlock.holding(run):
        info = runlock.read_lock(run)
        assert info["pid"] == os.getpid()
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            runlock.acquire(run)
    assert not run.exists()  # created by the lock, empty: removed again
    # a lock whose pid now belongs to another process (started later) is stale
    run.mkdir()
    (run / runlock.LOCK).write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), start_ticks=1,
                                                    since="x", token="t")))
    lock = runlock.acquire(run, say=lambda s: None)
    runlock.release(lock)
    assert not (run / runlock.LOCK).exists()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with runlock.holding(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- no dead ends

def test_a_run_stopped_before_its_first_checkpoint_resumes_or_starts_again(baseline, tmp_path, capsys,
                                                                              monkeypatch):
    data, _ = baseline
    out = tmp_path / "run"
    import mixlab.train.loop as trainer

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", stop)  # stopped in epoch 1
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(out)]) == 130
    monkeypatch.undo()
    assert (out / rd.CONFIG).is_file() and not rd.has_checkpoint(out)
    config = (out / rd.CONFIG).read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    assert "starting it again from epoch 0" in capsys.readouterr().out
    assert rd.read_summary(out)["finished"] and (out / rd.CONFIG).read_text() == config

    # a fresh start into a folder holding only a never-checkpointed run
    other = tmp_path / "other"
    monkeypatch.setattr(trainer, "evaluate", stop)
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(other)]) == 130
    monkeypatch.undo()
    (other / rd.BEST).write_bytes(b"left over")
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--data", str(data), "--out", str(other)]) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    assert rd.read_summary(other)["finished"] and rd.read_summary(other)["epochs_done"] == 1
    assert rd.weights_model_name(other / rd.BEST) == "convmixer_256_8"


def test_resume_with_fewer_epochs_than_done_is_refused(baseline, tmp_path, capsys):
    data, _ = baseline
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--data", str(data), "--out", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 epochs" in err and "--epochs 1" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    # the trainer refuses too (as `mixlab compare` calls it)
    cfg = rd.read_config(out)
    cfg["epochs"] = 1
    from mixlab.train import run_training

    with pytest.raises(ValueError, match="already done 2 epochs"):
        run_training(cfg, out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
