"""Reading a run directory back: damaged, edited or foreign files are refused naming the file;
nothing a user left in --out is overwritten; files get the mode every other file gets."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from mixlab.cli import main
from mixlab.train import rundir as rd

TINY = ["--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--dataset", "folder", "--batch-size", "8",
        "--set", "progress=false", "--precision", "fp32", "--set", "autotune=false", "--set", "fast_depthwise=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(data root, a finished 1-epoch run) to copy and damage."""
    from data_helpers import _class_image
    from PIL import Image
    import numpy as np

    base = tmp_path_factory.mktemp("runfiles")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for k in range(2):
            d = base / "data" / split / f"class{k}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_class_image(rng, k, 8)).save(d / f"{i}.png")
    run = base / "run"
    old = os.environ.get("MIXLAB_CACHE")
    os.environ["MIXLAB_CACHE"] = str(base / "cache")
    try:
        assert main(["train", *TINY, "--data", str(base / "data"), "--epochs", "1", "--out", str(run)]) == 0
    finally:
        os.environ.pop("MIXLAB_CACHE") if old is None else os.environ.__setitem__("MIXLAB_CACHE", old)
    return base / "data", run


@pytest.fixture
def run_copy(finished, tmp_path):
    data, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return data, copy


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", ["last.safetensors", "last_state.pt"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_changed(run_copy, capsys, name, damage):
    _, run = run_copy
    path = run / name
    if damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    err = _error(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert f"{path} is damaged or is not a" in err and ("empty" in err if damage == "empty" else "100 bytes" in err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("name", ["best.safetensors", "last.safetensors"])
def test_eval_names_damaged_weights(run_copy, capsys, name):
    _, run = run_copy
    (run / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header cut short
    err = _error(capsys, ["eval", "--checkpoint", str(run), "--weights", name.split(".")[0]])
    assert f"{run / name} is damaged" in err


@pytest.mark.parametrize("name,text,expected", [
    ("config.yaml", "model: [\n", "config.yaml is not valid YAML at line 2"),
    ("config.yaml", "- 1\n", "config.yaml does not hold a run's settings"),
    ("summary.json", "{bad", "summary.json is not valid JSON"),
    ("metrics.jsonl", '{"epoch": 1}\n{bad\n', "metrics.jsonl, line 2, is not valid JSON"),
    ("checkpoint.json", "{bad", "checkpoint.json is not valid JSON"),
])
def test_broken_json_or_yaml_in_a_run_directory_is_named(run_copy, capsys, name, text, expected):
    _, run = run_copy
    (run / name).write_text(text)
    err = _error(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert str(run) in err and expected in err
    if name == "config.yaml":
        assert expected in _error(capsys, ["eval", "--checkpoint", str(run)])
        assert expected in _error(capsys, ["report", str(run)])


def test_a_training_state_that_would_run_code_is_refused_without_torchs_advice(run_copy, capsys, tmp_path):
    _, run = run_copy
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    state = torch.load(run / "last_state.pt", weights_only=True)
    state["extra"] = Evil()
    torch.save(state, run / "last_state.pt")
    err = _error(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert f"{run / 'last_state.pt'} asks to run code while it is loaded (eval)" in err
    assert "safe_globals" not in err and "weights_only" not in err
    assert not marker.exists()


def test_an_out_folder_with_a_users_own_files_is_not_overwritten(finished, tmp_path, capsys):
    data, _ = finished
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "result"}')
    (out / "best.safetensors").write_bytes(b"my weights")
    err = _error(capsys, ["train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out)])
    assert f"{out} holds best.safetensors, summary.json but no config.yaml" in err
    assert (out / "summary.json").read_text() == '{"my": "result"}' and (out / "best.safetensors").read_bytes() == \
        b"my weights"
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "summary.json"]
    # a folder a run was stopped in before it wrote its config (an empty metrics.jsonl) is not foreign
    other = tmp_path / "stopped"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    rd.refuse_foreign_files(other)
    # ... nor is one of unrelated files
    (other / "notes.txt").write_text("x")
    rd.refuse_foreign_files(other)


def test_an_output_folder_that_cannot_be_written_is_refused_first(finished, tmp_path, capsys, monkeypatch):
    data, _ = finished
    out = tmp_path / "ro" / "run"
    real_access = os.access
    monkeypatch.setattr(rd.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    err = _error(capsys, ["train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(out)])
    assert f"cannot write to {out}: {tmp_path} is not writable" in err
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(finished, tmp_path, capsys):
    data, _ = finished
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _error(capsys, ["train", *TINY, "--data", str(data), "--epochs", "1", "--out", str(ro / "run")])
        assert f"{ro} is not writable" in err
    finally:
        ro.chmod(0o755)


def test_weights_and_cache_files_get_the_mode_of_every_other_file(finished):
    data, run = finished
    expected = 0o666 & ~rd_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
    assert set(modes.values()) == {expected}, modes
    cache = run.parent / "cache" / "datasets"
    assert {stat.S_IMODE(p.stat().st_mode) for p in cache.iterdir()} == {expected}


def rd_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
