"""`mixlab det train / eval / predict` end to end on the synthetic instance set."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from mixlab.cli import main
from mixlab.train import rundir as rd

# convmlp_s shrunk, 64x64 images, few proposals: seconds per epoch on one thread
TINY = ["--backbone", "convmlp_s", "--model-kwargs", "dims=[16,32,64],blocks=[1,1,1],channels=16",
        "--batch-size", "2", "--set", "progress=false", "--set", "data.val_split=0.25",
        "--set", "detector.min_size=64", "--set", "detector.max_size=64", "--set", "detector.fpn_channels=16",
        "--set", "detector.anchor_sizes=[8,16,32,64,128]", "--set", "detector.rpn_post_nms_top_n_train=50",
        "--set", "detector.rpn_post_nms_top_n_test=30", "--set", "detector.box_batch_size_per_image=16",
        "--set", "detector.box_detections_per_img=5", "--set", "detector.mask_head_convs=1",
        "--set", "detector.box_score_thresh=0.0", "--set", "optimizer.lr=0.001"]
KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "union_iou", "union_dice",
        "n_images")


def det(*args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["det", *args]) == 0
    return out.getvalue()


def _pycocotools(gt_path, results_path, iou_type) -> list[float]:
    """COCOeval straight from the files, as a user would run it (detectron2's segm convention:
    results without their boxes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        results = json.loads(results_path.read_text())
        if iou_type == "segm":
            results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [None if s < 0 else 100 * s for s in ev.stats]


def test_train_eval_predict(mask_folder, tmp_path):
    run = tmp_path / "run"
    log = det("train", *TINY, "--data", str(mask_folder), "--epochs", "2", "--out", str(run))
    assert "model: Mask R-CNN on convmlp_s" in log
    # the CPU settings picker cannot time a detector's step: its static choice, said so
    assert "static defaults: this task's steps are not timed" in log
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best.safetensors", "last.safetensors",
                 "curves.png", "pr_curves.png", "coco_eval.txt", "split_train.txt", "split_val.txt"):
        assert (run / name).is_file(), name
    from mixlab.seg.data import split_names

    # the split `mixlab seg train` draws on the same folder (seed 41)
    assert (run / "split_val.txt").read_text().split() == split_names([f"case{i:02d}" for i in range(8)], 0.25, 41)[1]
    rows = rd.read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_loss"] == pytest.approx(sum(r[f"train_{k}"] for k in (
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"))) for r in rows)
    summary = rd.read_summary(run)
    assert summary["finished"] and summary["task"] == "detection" and summary["val_images"] == 2
    assert summary["best_val_segm_AP"] == max(r["val_segm_AP"] for r in rows)
    assert Image.open(run / "pr_curves.png").format == "PNG"

    # eval of the best weights on the run's own split repeats the summary's figures
    r = json.loads(det("eval", "--checkpoint", str(run), "--json"))
    assert all(k in r for k in KEYS) and r["n_images"] == 2
    for k in KEYS[:-1]:
        assert r[k] == pytest.approx(summary["val"][k], abs=1e-9), k

    # predict on the whole folder, then pycocotools on its files == det eval --data on that folder
    pred = tmp_path / "pred"
    det("predict", "--checkpoint", str(run), "--input", str(mask_folder), "--out", str(pred),
        "--score-threshold", "0.0")
    results = json.loads((pred / "predictions.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert len(list((pred / "overlays").glob("*.png"))) == 8
    assert len(list((pred / "masks").glob("*.png"))) == len(results)  # threshold 0: every detection

    # --union-score: every detection joins the union at 0, none at 1 (no score reaches 1 here)
    low = json.loads(det("eval", "--checkpoint", str(run), "--union-score", "0", "--json"))
    high = json.loads(det("eval", "--checkpoint", str(run), "--union-score", "1", "--json"))
    assert (low["union_score"], high["union_score"]) == (0.0, 1.0)
    assert low["segm_AP"] == high["segm_AP"] == r["segm_AP"]  # COCO AP does not depend on it
    assert max(d["score"] for d in results) < 1.0 and low["n_detections"] > 0
    assert low["union_recall"] > 0 and high["union_recall"] == pytest.approx(0, abs=1e-5)  # (the formulas add 1e-5)
    full = json.loads(det("eval", "--checkpoint", str(run), "--data", str(mask_folder), "--json"))
    assert full["n_images"] == 8 and full["n_detections"] == len(results)
    for iou_type in ("bbox", "segm"):
        ours = [full[f"{iou_type}_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                                     "ARs", "ARm", "ARl")]
        theirs = _pycocotools(pred / "ground_truth.json", pred / "predictions.json", iou_type)
        assert ours == pytest.approx(theirs, abs=1e-9), iou_type


def test_interrupted_and_resumed_run_equals_uninterrupted(mask_folder, tmp_path, monkeypatch):
    extra = ["--data", str(mask_folder), "--epochs", "3", "--set", "augment.vflip=0.5", "--set", "augment.rot90=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    det("train", *TINY, *extra, "--out", str(full))

    import mixlab.train.loop as loop

    real_evaluate, calls = loop.evaluate, {"n": 0}

    def interrupt_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after epoch 2's training steps, before its checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", interrupt_in_epoch_2)
    assert main(["det", "train", *TINY, *extra, "--out", str(part)]) == 130
    assert len(rd.read_metrics(part)) == 1 and not rd.read_summary(part)["finished"]
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    det("train", "--resume", str(part))
    drop = {"epoch_seconds", "train_seconds", "images_per_sec"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(rd.read_metrics(part)) == strip(rd.read_metrics(full))
    assert {k: v for k, v in rd.read_summary(part)["val"].items() if k != "infer_ms_per_image"} == \
        {k: v for k, v in rd.read_summary(full)["val"].items() if k != "infer_ms_per_image"}


def test_det_errors_are_one_line(mask_folder, tmp_path, capsys):
    assert main(["det", "train", *TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["det", "train", "--backbone", "resnet18_imagenet", "--data", str(mask_folder),
                 "--set", "detector.norm=bn", "--out", str(tmp_path / "r")]) == 2
    assert "detector.norm must be gn or none" in capsys.readouterr().err
    assert main(["train", "--recipe", "maskrcnn-busi", "--model", "resnet18_imagenet"]) == 2
    assert "run it with `mixlab det train`" in capsys.readouterr().err
    assert main(["det", "eval", "--checkpoint", str(tmp_path / "r"), "--union-score", "2"]) == 2
    assert "--union-score must be a score between 0 and 1, got 2.0" in capsys.readouterr().err
    empty = tmp_path / "empty_only"
    (empty / "images").mkdir(parents=True)
    (empty / "masks" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(empty / "images" / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty / "masks" / "0" / "a.png")
    from mixlab.det.data import load_det_folder

    ds = load_det_folder(empty)  # an image without instances is allowed, and counted
    assert len(ds) == 1 and ds.empty_images == 1 and ds.num_instances == 0


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(mask_folder, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixlab",
           "det", "train", *TINY, "--device", "cpu", "--data", str(mask_folder), "--epochs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = rd.read_summary(out)
    assert s["finished"] and s["world_size"] == 2 and "x 2 ranks" in proc.stdout
    assert len(rd.read_metrics(out)) == 2 and "segm_AP" in s["val"]
