"""`mixlab report` on hand-made run directories: the table, its CSV/JSON forms, plots, measuring."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import yaml
from PIL import Image

from mixlab.analysis import report as rp
from mixlab.analysis.profile import format_count
from mixlab.cli import main


def _write_run(d, model, epochs, metrics, summary=None):
    d.mkdir(parents=True)
    cfg = dict(model=model, model_kwargs={}, num_classes=10, img_size=32, epochs=epochs, seed=0,
               data=dict(dataset="cifar10", root=None))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def _rows(vals, secs, ips):
    return [dict(epoch=i + 1, train_loss=1.0, train_acc=50.0, val_loss=1.0, val_acc=v, lr=0.1, epoch_seconds=s,
                 images_per_sec=p) for i, (v, s, p) in enumerate(zip(vals, secs, ips))]


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    _write_run(root / "compare" / "resnet18_cifar", "resnet18_cifar", 3, _rows([50.0, 60.0, 70.0], [10, 10, 11.5],
                                                                               [100, 110, 120]),
               dict(model="resnet18_cifar", params=11173962, macs=555422720, best_val_acc=70.0, best_epoch=3,
                    test_acc=69.5, epochs_done=3, epochs=3, finished=True, wall_seconds=31.5,
                    images_per_sec=110.0, device="cpu", precision="fp32", channels_last=False))
    _write_run(root / "compare" / "mobilenetv2_cifar", "mobilenetv2_cifar", 3, _rows([40.0], [12.0], [250.0]),
               dict(model="mobilenetv2_cifar", params=2236682, macs=87966208, best_val_acc=40.0, best_epoch=1,
                    test_acc=None, epochs_done=1, epochs=3, finished=False, wall_seconds=12.0,
                    images_per_sec=250.0, device="cpu", precision="fp32", channels_last=False))
    # killed before its first summary: only config + metrics
    _write_run(root / "extra" / "old" / "vgg", "vgg16_bn_cifar", 5, _rows([55.5, 52.0], [20.0, 21.0], [80.0, 90.0]))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    return root


EXPECTED_MD = """\
| model             | params |   MACs | train img/s | infer img/s | best val acc % (epoch) | test acc % | wall time | epochs | status      |
|-------------------|-------:|-------:|------------:|------------:|-----------------------:|-----------:|----------:|-------:|-------------|
| mobilenetv2_cifar |  2.24M | 87.97M |         250 |           - |              40.00 (1) |          - |     12.0s |    1/3 | **partial** |
| resnet18_cifar    | 11.17M | 555.4M |         110 |           - |              70.00 (3) |      69.50 |     31.5s |    3/3 | finished    |"""


def test_table_of_two_runs_is_exactly_this(runs_root):
    runs = rp.collect_runs(runs_root / "compare")
    assert rp.format_table(runs, "md") == EXPECTED_MD


def test_runs_are_found_at_any_depth_and_partial_ones_read_from_metrics(runs_root):
    runs = rp.collect_runs([runs_root])
    assert [r.run for r in runs] == ["compare/mobilenetv2_cifar", "compare/resnet18_cifar", "extra/old/vgg"]
    vgg = runs[2]
    assert vgg.model == "vgg16_bn_cifar" and not vgg.finished and vgg.status == "partial (2/5 epochs)"
    assert (vgg.best_val_acc, vgg.best_epoch, vgg.epochs_done, vgg.epochs) == (55.5, 1, 2, 5)
    assert vgg.wall_seconds == 41.0 and vgg.train_images_per_sec == 85.0 and vgg.params is None
    assert vgg.val_curve == [(1, 55.5), (2, 52.0)]
    text = rp.format_table(runs, "md")
    assert text.splitlines()[0].startswith("| run ")  # run names differ from model names: shown
    assert "| extra/old/vgg " in text and "55.50 (1)" in text and "41.0s" in text and "2/5" in text


def test_csv_and_json_parse_back_with_the_numbers(runs_root):
    runs = rp.collect_runs(runs_root)
    rows = list(csv.DictReader(io.StringIO(rp.format_table(runs, "csv"))))
    assert [r["model"] for r in rows] == ["mobilenetv2_cifar", "resnet18_cifar", "vgg16_bn_cifar"]
    r18 = rows[1]
    assert int(r18["params"]) == 11173962 and int(r18["macs"]) == 555422720
    assert float(r18["test_acc"]) == 69.5 and float(r18["best_val_acc"]) == 70.0 and int(r18["best_epoch"]) == 3
    assert float(r18["wall_seconds"]) == 31.5 and float(r18["train_images_per_sec"]) == 110.0
    assert r18["status"] == "finished" and r18["finished"] == "True"
    assert rows[0]["test_acc"] == "" and rows[0]["status"] == "partial" and rows[0]["epochs_done"] == "1"
    data = json.loads(rp.format_table(runs, "json"))
    assert data[1]["params"] == 11173962 and data[1]["test_acc"] == 69.5 and data[1]["finished"] is True
    assert data[0]["test_acc"] is None and data[0]["status"] == "partial"
    assert data[2]["macs"] is None and data[2]["best_val_acc"] == 55.5 and data[2]["epochs"] == 5


def test_sorting_and_number_formats(runs_root):
    runs = rp.collect_runs(runs_root)
    assert [r.model for r in sorted(runs, key=rp.SORT_KEYS["val"])] == ["resnet18_cifar", "vgg16_bn_cifar",
                                                                        "mobilenetv2_cifar"]
    assert [r.model for r in sorted(runs, key=rp.SORT_KEYS["params"])][-1] == "vgg16_bn_cifar"  # unknown last
    assert format_count(1_297_829_888) == "1.30G" and format_count(555_422_720) == "555.4M"
    assert format_count(5_362_762) == "5.36M" and format_count(None) == "-"
    assert rp.fmt_seconds(3725) == "1h02m05s" and rp.fmt_seconds(754) == "12m34s" and rp.fmt_seconds(45.2) == "45.2s"


def test_plots_are_pngs_of_the_stated_size(runs_root, tmp_path):
    runs = rp.collect_runs(runs_root)
    written = rp.make_plots(runs, tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted(rp.PLOT_FILES.values())
    w, h = int(rp.PLOT_SIZE[0] * rp.PLOT_DPI), int(rp.PLOT_SIZE[1] * rp.PLOT_DPI)
    for p in written:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (w, h)
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # something is drawn, not a blank canvas
    # a plot without a single point is not drawn: only the vgg run lacks MACs and params
    only_vgg = [r for r in runs if r.model == "vgg16_bn_cifar"]
    names = [p.name for p in rp.make_plots(only_vgg, tmp_path / "plots2")]
    assert names == ["acc_vs_wall.png", "val_curves.png"]


def test_one_accuracy_metric_per_plot(runs_root):
    runs = rp.collect_runs(runs_root / "compare")
    assert rp._accuracy_of(runs)[0] == "best_val_acc"  # the partial run has no test accuracy
    assert rp._accuracy_of([r for r in runs if r.finished])[0] == "test_acc"


def test_measure_inference_uses_the_bench_code_on_the_run_device(runs_root, monkeypatch):
    import mixlab.analysis.bench as bench

    calls = []

    def fake_bench(model, **kw):
        calls.append((model, kw))
        return {"images_per_sec_median": 1234.5}

    monkeypatch.setattr(bench, "bench_model", fake_bench)
    run_dir = runs_root / "compare" / "resnet18_cifar"
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(dict(summary, device="cuda:0", precision="bf16")))
    rec = rp.load_run(run_dir)
    assert rp.measure_inference(rec, batch_size=16, windows=5, window_seconds=0.5) == 1234.5
    model, kw = calls[0]
    assert type(model).__name__ == "ResNet" and model.conv1.kernel_size == (3, 3)  # the run's architecture
    want_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert kw["mode"] == "infer" and kw["device"] == want_device and kw["precision"] == "bf16"
    assert kw["img_size"] == 32 and kw["batch_size"] == 16 and kw["windows"] == 5
    saved = json.loads((run_dir / rp.BENCH_FILE).read_text())
    assert saved["images_per_sec"] == 1234.5 and saved["device"] == want_device
    again = rp.load_run(run_dir)  # a later report shows the stored measurement
    assert again.infer_images_per_sec == 1234.5
    line = [ln for ln in rp.format_table([again], "md").splitlines() if "resnet18_cifar" in ln][0]
    assert ("1234 (cpu)" in line) == (want_device == "cpu")


def test_report_command_writes_table_and_plots(runs_root, tmp_path, capsys):
    out = tmp_path / "out" / "results.md"
    assert main(["report", str(runs_root / "compare"), "--out", str(out), "--plots"]) == 0
    text = out.read_text()
    assert text.startswith(EXPECTED_MD + "\n\n")
    assert "![acc vs params](acc_vs_params.png)" in text and "![val curves](val_curves.png)" in text
    assert all((out.parent / f).is_file() for f in rp.PLOT_FILES.values())
    capsys.readouterr()
    assert main(["report", str(runs_root), "--format", "json", "--sort", "val"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["resnet18_cifar", "vgg16_bn_cifar", "mobilenetv2_cifar"]


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no training runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_a_run_selected_on_the_test_set_says_so_in_every_table(tmp_path):
    from mixlab.train import rundir as rd
    from mixlab.train.config import evaluation_protocol

    root = tmp_path / "runs"
    c2f, held = root / "c2f", root / "keras"
    _write_run(c2f, "conv2former_n_cifar", 2, _rows([80.0, 81.0], [10, 10], [100, 100]))
    _write_run(held, "convmixer_256_8", 2, _rows([70.0, 71.0], [10, 10], [100, 100]))
    for run, holdout in ((c2f, "test"), (held, "random")):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"].update(val_split=0.1, val_holdout=holdout)
        cfg["select"] = "best_val"
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        # the trainer's summary, as written: the protocol comes from the run's config
        rd.write_summary(run, dict(model=cfg["model"], best_val_acc=81.0, best_epoch=2, test_acc=81.0,
                                   epochs_done=2, epochs=2, finished=True, **evaluation_protocol(cfg)))
    summary = json.loads((c2f / "summary.json").read_text())
    assert summary["selected_on_test"] is True and "test set" in summary["protocol"]
    assert json.loads((held / "summary.json").read_text())["selected_on_test"] is False
    runs = rp.collect_runs(root)
    md = rp.format_table(runs, "md")
    c2f_line = next(line for line in md.splitlines() if "conv2former_n_cifar" in line)
    keras_line = next(line for line in md.splitlines() if "convmixer_256_8" in line)
    assert c2f_line.count("(sel. on test)") == 2 and "(sel. on test)" not in keras_line
    assert md.splitlines()[-1].startswith("(sel. on test) the test set was this run's validation set")
    rows = {r["model"]: r for r in json.loads(rp.format_table(runs, "json"))}
    assert rows["conv2former_n_cifar"]["selected_on_test"] is True
    assert rows["convmixer_256_8"]["selected_on_test"] is False
    assert "selected_on_test" in next(csv.reader(io.StringIO(rp.format_table(runs, "csv"))))
    # an older summary without the fields: the report reads the protocol from config.yaml
    (c2f / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                   if k not in ("protocol", "selected_on_test")}))
    assert rp.load_run(c2f).selected_on_test
