"""`mixlab refine coarse / train / eval / apply / sampling` end to end on a tiny synthetic set:
ellipses on noise, coarse masks 2 px too large (a refiner learns to pull them in)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refine_data import make_refine_data


from mixlab.cli import main
from mixlab.refine.patches import boundary_boxes
from mixlab.refine.use import evaluate_refine_run
from mixlab.train import rundir as rd


@pytest.fixture
def refine_data(tmp_path):
    """make(n=12, size=64, grow=2) -> (data folder, coarse-mask folder) under tmp_path."""
    return lambda **kw: make_refine_data(tmp_path, **kw)

TINY = ["--batch-size", "8", "--precision", "fp32", "--set", "img_size=64", "--set", "patch.size=16",
        "--set", "patch.input_size=32", "--set", "data.val_split=0.25", "--set", "optimizer.lr=0.005",
        "--set", "progress=false"]
SEG_TINY = ["--model", "unext_s", "--batch-size", "4", "--precision", "fp32", "--set", "img_size=64",
            "--set", "progress=false", "--set", "data.val_split=0.25"]


def refine(*args) -> int:
    return main(["refine", *args])


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A refiner trained for 8 epochs (once for the module); case11 has no coarse mask."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("refine")
    data, coarse = make_refine_data(root, n=12, size=64)
    (coarse / "masks" / "0" / "case11.png").unlink()
    run = root / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("MIXLAB_CACHE", str(root / "cache"))  # module scope: before the per-test cache fixture
        assert refine("train", "--coarse", str(coarse), "--data", str(data), "--out", str(run), "--epochs", "8",
                      *TINY) == 0
    return data, coarse, run, printed.getvalue()


def test_train_writes_a_run_that_refines_and_eval_apply_agree(trained, tmp_path, capsys):
    data, coarse, run, out = trained
    assert "1 of 12 images have no coarse mask" in out and "case11" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors", "last.safetensors",
                 "curves.png", "split_train.txt", "split_val.txt"):
        assert (run / name).is_file(), name
    train_names = (run / "split_train.txt").read_text().split()
    val_names = (run / "split_val.txt").read_text().split()
    assert len(val_names) == 3 and len(train_names) == 8 and "case11" not in train_names + val_names
    s = rd.read_summary(run)
    assert s["task"] == "refine" and s["finished"] and s["skipped_no_coarse"] == 1
    # the patch count, independently: boxes at the training NMS threshold on the training masks
    masks = torch.stack([torch.from_numpy(_mask(coarse / "masks" / "0" / f"{n}.png"))[None] for n in train_names])
    assert s["train_patches"] == len(boundary_boxes(masks, 16, 0.25)[0])
    assert s["val"]["iou_after"] > s["val"]["iou_before"] + 10
    assert s["val"]["boundary_f_after"] > s["val"]["boundary_f_before"] + 10

    assert refine("eval", "--checkpoint", str(run), "--coarse", str(coarse), "--data", str(data),
                  "--split", str(run / "split_val.txt"), "--json") == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("iou_before", "iou_after", "dice_before", "dice_after", "boundary_f_before", "boundary_f_after",
                "n_images", "n_patches"):
        assert key in r, key
    assert r["n_images"] == 3 and r["seen_by_refiner"] == 0 and r["per_image"]["name"] == val_names
    for key in ("iou_before", "iou_after", "dice_after", "boundary_f_after"):
        assert r[key] == pytest.approx(s["val"][key], abs=1e-9), key
    assert r["n_patches"] == sum(r["per_image"]["patches"])

    # every image with a coarse mask: the refiner's training images are flagged, case11 listed
    overlays = tmp_path / "cases.png"
    assert refine("eval", "--checkpoint", str(run), "--coarse", str(coarse), "--data", str(data),
                  "--overlays", str(overlays)) == 0
    text = capsys.readouterr().out
    assert "8 of the 11 images are images the refiner trained on" in text and "case11" in text
    assert Image.open(overlays).format == "PNG"

    out_dir = tmp_path / "applied"
    assert refine("apply", "--checkpoint", str(run), "--coarse", str(coarse), "--input", str(data), "--out",
                  str(out_dir), "--json") == 0
    a = json.loads(capsys.readouterr().out)
    assert a["images"] == 11 and a["masks"] == 11 and a["skipped_no_coarse"] == ["case11"]
    assert sorted(p.stem for p in (out_dir / "masks" / "0").iterdir()) == sorted(train_names + val_names)
    _, arrays = evaluate_refine_run(run, coarse, data, run / "split_val.txt")
    for i, name in enumerate(val_names):
        assert np.array_equal(_mask(out_dir / "masks" / "0" / f"{name}.png"), arrays["refined"][i, 0].numpy())
    assert (out_dir / "overlays" / f"{val_names[0]}.png").is_file()


def test_eval_passes_an_empty_mask_through_and_refuses_masks_of_another_size(trained, tmp_path, capsys):
    data, coarse, run, _ = trained
    val_names = (run / "split_val.txt").read_text().split()
    edited = tmp_path / "edited"
    shutil.copytree(coarse, edited)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(edited / "masks" / "0" / f"{val_names[0]}.png")
    assert refine("eval", "--checkpoint", str(run), "--coarse", str(edited), "--data", str(data),
                  "--split", str(run / "split_val.txt"), "--json") == 0
    r = json.loads(capsys.readouterr().out)["per_image"]
    assert r["patches"][0] == 0 and r["iou_after"][0] == r["iou_before"][0]

    Image.fromarray(np.zeros((32, 48), np.uint8)).save(edited / "masks" / "0" / f"{val_names[1]}.png")
    assert refine("eval", "--checkpoint", str(run), "--coarse", str(edited), "--data", str(data)) == 2
    err = capsys.readouterr().err
    assert f"{val_names[1]}.png is 48x32 (WxH) but its image" in err and "64x64" in err

    assert refine("train", "--resume", str(run), "--coarse", str(coarse)) == 2
    assert "drop --coarse" in capsys.readouterr().err
    assert refine("eval", "--checkpoint", str(run), "--coarse", str(tmp_path / "nowhere"), "--data",
                  str(data)) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_instance_masks_of_an_image_are_merged_into_its_coarse_mask(trained, tmp_path, capsys):
    data, coarse, run, _ = trained
    val_names = (run / "split_val.txt").read_text().split()
    split = tmp_path / "instances"
    shutil.copytree(coarse, split)
    whole = split / "masks" / "0" / f"{val_names[2]}.png"
    m = np.asarray(Image.open(whole))
    left, right = m.copy(), m.copy()
    left[:, 32:], right[:, :32] = 0, 0  # two "detections" whose union is the mask
    whole.unlink()
    Image.fromarray(left).save(split / "masks" / "0" / f"{val_names[2]}_0.png")
    Image.fromarray(right).save(split / "masks" / "0" / f"{val_names[2]}_1.png")
    figures = []
    for folder in (coarse, split):
        assert refine("eval", "--checkpoint", str(run), "--coarse", str(folder), "--data", str(data),
                      "--split", str(run / "split_val.txt"), "--json") == 0
        figures.append(json.loads(capsys.readouterr().out))
    assert figures[0]["per_image"] == figures[1]["per_image"] and figures[1]["skipped_no_coarse"] == []


def test_a_seg_run_gives_coarse_masks_of_its_val_split_and_is_refused_for_its_training_images(
        trained, tmp_path, capsys):
    data, _, run, _ = trained
    seg_run = tmp_path / "seg"
    assert main(["seg", "train", *SEG_TINY, "--data", str(data), "--epochs", "2", "--out", str(seg_run)]) == 0
    capsys.readouterr()
    assert main(["seg", "eval", "--checkpoint", str(seg_run), "--json"]) == 0
    seg_eval = json.loads(capsys.readouterr().out)
    assert refine("eval", "--checkpoint", str(run), "--coarse", str(seg_run), "--data", str(data), "--json") == 0
    r = json.loads(capsys.readouterr().out)
    # the figures before refinement are the seg run's own on its validation split
    assert r["per_image"]["name"] == (seg_run / "split_val.txt").read_text().split()
    assert r["iou_before"] == pytest.approx(100 * seg_eval["iou"], abs=1e-9)
    assert r["dice_before"] == pytest.approx(100 * seg_eval["dice"], abs=1e-9)
    assert r["official_batch_size"] == 4 and r["seen_by_coarse_model"] == 0

    assert refine("train", "--coarse", str(seg_run), "--data", str(data), "--out", str(tmp_path / "r2"),
                  "--epochs", "1", *TINY) == 2
    assert "memorised" in capsys.readouterr().err and not (tmp_path / "r2" / "summary.json").exists()


def test_out_of_fold_masks_come_from_models_that_did_not_see_the_image(refine_data, tmp_path, capsys):
    from mixlab.seg.data import split_names

    data, _ = refine_data(n=10, size=64)
    out = tmp_path / "oof"
    args = ["coarse", "--data", str(data), "--folds", "2", "--epochs", "1", "--out", str(out), *SEG_TINY,
            "--batch-size", "2"]
    assert refine(*args) == 0
    info = json.loads((out / "coarse.json").read_text())
    folds = info["folds"]
    assert info["kind"] == "out_of_fold" and info["finished"] and len(folds) == 2
    # the images `mixlab seg train` would train on (10, ceil(10 * 0.25) held out), each predicted once
    expected = split_names([f"case{i:02d}" for i in range(10)], 0.25, 41)[0]
    predicted = sorted(n for f in folds for n in f)
    assert predicted == expected and len(predicted) == 7
    assert sorted(p.stem for p in (out / "masks" / "0").iterdir()) == predicted
    for k, fold in enumerate(folds):
        seen = set((out / f"fold{k}" / "split_train.txt").read_text().split())
        assert not seen & set(fold) and seen | set(fold) == set(predicted)
        assert rd.read_config(out / f"fold{k}")["select"] == "last"
    capsys.readouterr()
    assert refine(*args) == 0  # again: the finished folds are kept
    assert capsys.readouterr().out.count("trained already") == 2


def test_sampling_picture(tmp_path):
    assert refine("sampling", "--out", str(tmp_path / "s.png")) == 0
    assert Image.open(tmp_path / "s.png").format == "PNG"


def test_a_resumed_refine_run_ends_as_an_uninterrupted_one(refine_data, tmp_path):
    data, coarse = refine_data(n=8, size=64)
    # a constant rate: a cosine schedule depends on the number of epochs, which --resume extends
    common = ["--coarse", str(coarse), "--data", str(data), *TINY, "--set", "schedule.name=constant"]
    assert refine("train", *common, "--epochs", "2", "--out", str(tmp_path / "whole")) == 0
    assert refine("train", *common, "--epochs", "1", "--out", str(tmp_path / "parts")) == 0
    assert refine("train", "--resume", str(tmp_path / "parts"), "--epochs", "2") == 0
    drop = {"epoch_seconds", "train_seconds", "images_per_sec"}
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in rd.read_metrics(tmp_path / run)]
            for run in ("whole", "parts")]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert (tmp_path / "whole" / "split_val.txt").read_text() == (tmp_path / "parts" / "split_val.txt").read_text()
