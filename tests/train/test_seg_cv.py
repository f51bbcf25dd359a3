"""Held-out test splits in `mixlab seg train` and the `mixlab seg cv` driver, on tiny mask sets."""
from __future__ import annotations

import json
import math

import pytest

from mixlab.cli import main
from mixlab.seg.data import kfold_names, load_segmentation_data, split_dataset, three_way_split
from mixlab.tasks.segmentation import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL
from mixlab.train import rundir as rd
from mixlab.train.cv import CV_JSON, mean_std

# unext_s at 32x32 in fp32: a few seconds per run
FAST = ["--model", "unext_s", "--batch-size", "4", "--precision", "fp32", "--set", "img_size=32",
        "--set", "progress=false", "--set", "data.val_split=0.25", "--set", "autotune=false"]


def test_three_way_split_is_disjoint_reproducible_and_leaves_the_papers_split_alone(tmp_path, make_mask_dataset):
    ds = load_segmentation_data(make_mask_dataset(tmp_path / "d", n=20))
    train, val, test = three_way_split(ds, 0.25, 0.2, seed=7)
    parts = [set(train.names), set(val.names), set(test.names)]
    assert len(test) == 4 and len(val) == 4 and len(train) == 12  # ceil(20 * .2); ceil(16 * .25)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(ds.names)
    again = three_way_split(ds, 0.25, 0.2, seed=7)
    assert [p.names for p in again] == [train.names, val.names, test.names]
    assert three_way_split(ds, 0.25, 0.2, seed=8)[2].names != test.names
    # without a test split: exactly the two-way split (the UNeXt paper's protocol)
    t2, v2, none = three_way_split(ds, 0.25, 0.0, seed=7)
    ref_t, ref_v = split_dataset(ds, 0.25, 7)
    assert none is None and t2.names == ref_t.names and v2.names == ref_v.names


def test_split_files_that_overlap_the_test_split_are_refused(tmp_path, make_mask_dataset):
    ds = load_segmentation_data(make_mask_dataset(tmp_path / "d", n=10))
    (tmp_path / "test.txt").write_text("case00\ncase01\n")
    (tmp_path / "val.txt").write_text("case01\ncase02\n")
    with pytest.raises(ValueError, match="in the test split too"):
        three_way_split(ds, test_file=tmp_path / "test.txt", val_file=tmp_path / "val.txt")


def test_kfold_covers_every_case_exactly_once():
    names = [f"n{i:02d}" for i in range(23)]
    folds = kfold_names(names, 4, seed=3)
    assert sorted(n for f in folds for n in f) == names
    assert sorted(len(f) for f in folds) == [5, 6, 6, 6]
    assert folds == kfold_names(list(reversed(names)), 4, seed=3)  # independent of the listing order
    with pytest.raises(ValueError, match="folds must be between 2"):
        kfold_names(names, 1)


def test_train_with_a_test_split_writes_it_resumes_with_it_and_evaluates_it(tmp_path, capsys, make_mask_dataset):
    data = make_mask_dataset(tmp_path / "busi", n=16)
    out = tmp_path / "run"
    assert main(["seg", "train", *FAST, "--data", str(data), "--epochs", "1", "--test-split", "0.25",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test, held out: never trained on nor used to select (4 images)" in printed
    names = {k: (out / f).read_text().split() for k, f in (("train", SPLIT_TRAIN), ("val", SPLIT_VAL),
                                                             ("test", SPLIT_TEST))}
    assert [len(names[k]) for k in ("train", "val", "test")] == [9, 3, 4]  # 16 -> 4 test; 12 -> ceil(3) val
    assert not set(names["test"]) & (set(names["train"]) | set(names["val"]))
    summary = rd.read_summary(out)
    assert summary["test_images"] == 4 and summary["selected_on"] == "val" and "iou" in summary["test"]
    # resume (extending the run) keeps the split; eval --split test evaluates those 4 cases
    (out / SPLIT_TEST).write_text("".join(f"{n}\n" for n in names["test"]))
    assert main(["seg", "train", "--resume", str(out), "--epochs", "2"]) == 0
    assert (out / SPLIT_TEST).read_text().split() == names["test"]
    capsys.readouterr()
    assert main(["seg", "eval", "--checkpoint", str(out), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert sorted(r["per_image"]["name"]) == sorted(names["test"]) and "held-out test split" in r["split"]
    assert r["iou"] * 100 == pytest.approx(rd.read_summary(out)["test"]["iou"], abs=1e-6)


def test_eval_split_test_of_a_run_without_one_says_so(tmp_path, capsys, make_mask_dataset):
    data = make_mask_dataset(tmp_path / "busi", n=8)
    out = tmp_path / "run"
    assert main(["seg", "train", *FAST, "--data", str(data), "--epochs", "1", "--out", str(out)]) == 0
    assert main(["seg", "eval", "--checkpoint", str(out), "--split", "test"]) == 2
    assert "trained without a test split" in capsys.readouterr().err


def test_cv_folds_hold_out_every_case_once_summarise_and_skip_on_rerun(tmp_path, capsys, monkeypatch, make_mask_dataset):
    data = make_mask_dataset(tmp_path / "busi", n=12)
    out = tmp_path / "cv"
    args = ["seg", "cv", *FAST, "--data", str(data), "--folds", "3", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / CV_JSON).read_text())
    held_out = [(out / "splits" / f"fold{i}_test.txt").read_text().split() for i in (1, 2, 3)]
    assert sorted(n for part in held_out for n in part) == [f"case{i:02d}" for i in range(12)]
    for i, part in enumerate(report["parts"], 1):
        run = out / f"fold{i}"
        assert (run / SPLIT_TEST).read_text().split() == held_out[i - 1]
        assert part["test"]["iou"] == rd.read_summary(run)["test"]["iou"]
    ious = [p["test"]["iou"] for p in report["parts"]]
    mean = sum(ious) / 3
    assert report["summary"]["test"]["iou"]["mean"] == pytest.approx(mean)
    assert report["summary"]["test"]["iou"]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in ious) / 2))
    assert "mean ± std over 3" in capsys.readouterr().out

    import mixlab.train as training

    def must_not_train(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(training, "run_training", must_not_train)
    assert main(args) == 0
    assert "skip" in capsys.readouterr().out
    assert json.loads((out / CV_JSON).read_text())["summary"] == report["summary"]


def test_cv_repeats_record_their_seeds_and_refuse_a_changed_split(tmp_path, capsys, make_mask_dataset):
    data = make_mask_dataset(tmp_path / "busi", n=10)
    out = tmp_path / "cv"
    base = ["seg", "cv", "--model", "unext_s", "--batch-size", "4", "--set", "img_size=32", "--set", "progress=false",
            "--set", "autotune=false", "--set", "precision=fp32", "--data", str(data), "--epochs", "1",
            "--out", str(out)]
    assert main([*base, "--repeats", "2", "--test-split", "0.3", "--dry-run"]) == 0
    assert not out.exists()  # a dry run writes nothing
    capsys.readouterr()
    from mixlab.train.cv import plan_parts

    parts = plan_parts([f"case{i:02d}" for i in range(10)], None, 2, 0.25, 0.3, seed=41)
    assert [p["seed"] for p in parts] == [41, 42] and all(len(p["test"]) == 3 for p in parts)
    assert parts[0]["test"] != parts[1]["test"]
    (out / "splits").mkdir(parents=True)
    (out / "splits" / "repeat1_test.txt").write_text("case00\n")
    assert main([*base, "--repeats", "2", "--test-split", "0.3"]) == 2
    assert "lists other cases than this command draws" in capsys.readouterr().err


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(1.2909944487))
    assert mean_std([5.0]) == (5.0, 0.0)
