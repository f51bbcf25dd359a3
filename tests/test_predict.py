"""`mixlab predict` and `mixlab eval`'s library metrics on a tiny trained run."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mixlab.cli import main
from mixlab.evaluate import evaluate_run, library_metrics
from mixlab.predict import list_images, predict_files, run_classes, write_predictions
from mixlab.train import rundir as rd

CLASSES = ["cat", "dog", "eel", "fox", "gnu", "hen"]


def _write_tree(root, per_class=(6, 3), size=16, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                q = size // 2
                r, c = divmod(k % 4, 2)
                img[r * q:(r + 1) * q, c * q:(c + 1) * q, k % 3] = 150 + 20 * (k // 3)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run_dir, data_root): four epochs of a tiny ConvMixer on a 6-class folder (enough to predict
    several classes, so that agreeing with eval image by image means something)."""
    base = tmp_path_factory.mktemp("predict")
    data = _write_tree(base / "data")
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXLAB_CACHE", str(base / "cache"))
        assert main(["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=16,depth=2", "--dataset", "folder",
                     "--data", str(data), "--epochs", "4", "--batch-size", "9", "--set", "data.val_split=0.25",
                     "--set", "optimizer.lr=0.03",
                     "--set", "progress=false", "--precision", "fp32", "--out", str(run)]) == 0
    return run, data


def test_top1_equals_eval_for_the_same_images(trained):
    run, data = trained
    r = evaluate_run(run, split="test", batch_size=7, return_predictions=True)
    files = list_images(data / "test")
    preds, info = predict_files(run, files, top_k=3, batch_size=5, say=None)
    assert [p.file for p in preds] == [str(f) for f in files]
    assert [p.top[0][1] for p in preds] == r["predictions"]
    assert len(set(r["predictions"])) >= 3
    assert info["classes"] == CLASSES and r["classes"] == CLASSES
    # the same images' accuracy, counted from predict's answers
    truth = [CLASSES.index(f.parent.name) for f in files]
    acc = 100.0 * sum(p.top[0][1] == t for p, t in zip(preds, truth)) / len(files)
    assert acc == pytest.approx(r["accuracy"])


def test_eval_library_metrics_agree_with_its_confusion_matrix(trained):
    run, _ = trained
    r = evaluate_run(run, split="test")
    conf = np.array(r["confusion"])
    tp = np.diag(conf).astype(float)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    assert r["macro_f1"] == pytest.approx(100 * f1.mean())
    assert r["top5_accuracy"] is not None and r["accuracy"] <= r["top5_accuracy"] <= 100


def test_library_metrics_against_a_naive_count():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 7, generator=g), torch.randint(0, 7, (200,), generator=g)
    m = library_metrics(logits, labels)
    top5 = logits.topk(5, 1).indices
    assert m["top5_accuracy"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    pred = logits.argmax(1)
    f1s = []
    for k in range(7):
        tp = ((pred == k) & (labels == k)).sum().item()
        fp = ((pred == k) & (labels != k)).sum().item()
        fn = ((pred != k) & (labels == k)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert m["macro_f1"] == pytest.approx(100 * sum(f1s) / 7)
    assert library_metrics(logits[:, :5], labels % 5)["top5_accuracy"] is None  # trivially 100% with 5 classes


def test_csv_and_json_schemas(trained, tmp_path):
    run, data = trained
    files = list_images(data / "test" / "dog")
    preds, info = predict_files(run, files, top_k=2, say=None)
    rows = list(csv.reader(write_predictions(preds, info, tmp_path / "p.csv").open()))
    assert rows[0] == ["file", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(rows) == 1 + len(files) and rows[1][0] == str(files[0])
    for row in rows[1:]:
        assert row[1] in CLASSES and row[3] in CLASSES and row[1] != row[3]
        assert 1.0 >= float(row[2]) >= float(row[4]) >= 0.0
    doc = json.loads(write_predictions(preds, info, tmp_path / "p.json").read_text())
    assert {"run", "model", "weights", "classes", "classes_from", "img_size", "mean", "std", "precision", "top_k",
            "predictions"} <= set(doc)
    assert doc["model"] == "convmixer_256_8" and doc["img_size"] == 16 and doc["top_k"] == 2
    first = doc["predictions"][0]
    assert first["file"] == str(files[0]) and [set(t) for t in first["top"]] == [{"class", "index", "prob"}] * 2
    assert CLASSES[first["top"][0]["index"]] == first["top"][0]["class"]
    with pytest.raises(ValueError, match="must end in .csv or .json"):
        write_predictions(preds, info, tmp_path / "p.txt")


def test_cli_predict(trained, tmp_path, capsys):
    run, data = trained
    img = data / "test" / "eel" / "000.png"
    assert main(["predict", "--checkpoint", str(run), "--input", str(img), "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{img}: " in out and "classes read from" not in out  # the run stores its class names
    big = tmp_path / "big.png"  # another size: resized to the run's 16x16 as training data would be
    Image.open(img).resize((40, 40)).save(big)
    assert main(["predict", "--checkpoint", str(run), "--input", str(big), "--out", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top"]) == 5
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    assert main(["predict", "--checkpoint", str(run), "--input", str(bad)]) == 2
    assert "x.png: not a readable image" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(run), "--input", str(tmp_path / "nothing")]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err


def test_classes_are_numbered_when_the_data_is_gone(trained, tmp_path):
    run, _ = trained
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    names, how = run_classes(moved, rd.read_config(moved), say=None)
    assert how == "the run" and names == rd.read_summary(moved)["classes"] and len(names) == 6
    summary = rd.read_summary(moved)  # a run written before run folders recorded their classes
    del summary["classes"]
    rd.write_summary(moved, summary)
    names, how = run_classes(moved, rd.read_config(moved), say=None)
    assert "read from the run's data" in how and len(names) == 6
    cfg = rd.read_config(moved)
    cfg["data"]["root"] = str(tmp_path / "gone")
    said = []
    names, how = run_classes(moved, cfg, say=said.append)
    assert names == [str(i) for i in range(6)] and "stores no class names" in how and said
