"""`mixlab viz ...` and `mixlab rf ...` end to end: each writes a PNG of the expected size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import mixlab
from mixlab.cli import main
from mixlab.data import classification

N_TEST = 12


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A hand-built run of convmixer_256_8 (weights with non-trivial BatchNorms) and a fake
    CIFAR-10 test split served through the data loader."""
    torch.manual_seed(0)
    model = mixlab.create_model("convmixer_256_8")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    run = tmp_path / "run"
    run.mkdir()
    config = dict(model="convmixer_256_8", model_kwargs={}, num_classes=10, img_size=32, epochs=1, seed=0,
                  data=dict(dataset="cifar10", root=str(tmp_path / "nowhere"), mean=[0.49, 0.48, 0.45],
                            std=[0.25, 0.24, 0.26]))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "best.safetensors"))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_TEST, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(N_TEST) % 10
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    calls = []

    def fake_loader(cfg, verbose=False):
        calls.append(cfg)
        split = classification.Split(images, labels)
        return classification.ClassificationData("cifar10", names, split, None, split, "fake")

    monkeypatch.setattr(classification, "load_classification_data", fake_loader)
    return run, model, images, labels, calls


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a whole, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cat" / "0001.png"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)  # resized to 32x32
    return path


def test_viz_filters_and_kernels(tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["viz", "filters", "--model", "convmixer_256_8", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == "stem.0" and info["mode"] == "rgb" and info["grid"] == [16, 16]
    assert np.array(info["weights"]).shape == (256, 3, 2, 2)
    assert png_size(out) == (925, 900)  # 16 x 0.5 in + 1.25 in wide, + 1 in high, at 100 dpi
    out = tmp_path / "k.png"
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--block", "2", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == "blocks.2.0.fn.0" and info["mode"] == "single" and info["weight_shape"] == [256, 1, 5, 5]
    torch.manual_seed(0)  # the command builds the untrained model after the same seed
    model = mixlab.create_model("convmixer_256_8")
    np.testing.assert_allclose(np.array(info["weights"]), model.blocks[2][0].fn[0].weight.detach().numpy(),
                               atol=1e-6)
    assert png_size(out) == (925, 900)
    out = tmp_path / "k64.png"
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--max-tiles", "64", "--dpi", "50",
                 "--out", str(out)]) == 0
    assert png_size(out) == (int((8 * 0.5 + 1.25) * 50), int((8 * 0.5 + 1.0) * 50))


def test_viz_list_layers(capsys):
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--list-layers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    tagged = {r["name"]: r["tags"] for r in rows}
    assert tagged["stem.0"] == ["stem"] and "auto" in tagged["blocks.3.0.fn.0"]
    assert "depthwise, --block 7" in tagged["blocks.7.0.fn.0"]
    assert main(["viz", "saliency", "--model", "convmixer_256_8", "--list-layers"]) == 0
    text = capsys.readouterr().out
    assert "blocks " in text and "auto (Grad-CAM)" in text.splitlines()[-1]


def test_viz_features(run_dir, image_file, tmp_path, capsys):
    run, *_ = run_dir
    out = tmp_path / "feat.png"
    assert main(["viz", "features", "--checkpoint", str(run), "--image", str(image_file), "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in info["layers"]] == ["blocks.0", "blocks.2", "blocks.5", "blocks.7"]
    assert info["true"] == 3  # the image sits in a folder named after a CIFAR-10 class
    assert png_size(out) == (1200, 575)  # (8 + 1) x 1.25 + 0.75 in by 4 x 1.25 + 0.75 in
    assert main(["viz", "features", "--checkpoint", str(run), "--index", "4", "--layers", "blocks",
                 "--top", "4"]) == 0
    assert png_size(run / "viz" / "features.png") == (700, 200)


def test_viz_saliency_misclassified(run_dir, tmp_path, capsys):
    run, model, images, labels, calls = run_dir
    out = tmp_path / "sal.png"
    assert main(["viz", "saliency", "--checkpoint", str(run), "--misclassified", "3", "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert calls and calls[0]["data"]["dataset"] == "cifar10"
    # the first three test images the run's model gets wrong, computed here independently
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model.eval()((images.float() / 255 - mean) / std).argmax(1)
    wrong = (pred != labels).nonzero().flatten()[:3].tolist()
    assert [item["source"] for item in info["images"]] == [f"test #{i}" for i in wrong]
    assert [item["pred"] for item in info["images"]] == pred[wrong].tolist()
    assert all(item["true"] != item["pred"] for item in info["images"])
    assert info["layer"] == "blocks" and np.array(info["maps"]).shape == (3, 32, 32)
    assert png_size(out) == (975, 275)  # 3 x (2 x 1.5 in) + 0.75 in by 2.25 + 0.5 in
    out = tmp_path / "sal5.png"
    assert main(["viz", "saliency", "--checkpoint", str(run), "--index", "0", "1", "2", "3", "4",
                 "--method", "gradients", "--target", "true", "--out", str(out)]) == 0
    assert png_size(out) == (1275, 500)  # 4 per row, 2 rows


def test_viz_errors(run_dir, capsys):
    run, *_ = run_dir
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--block", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["viz", "saliency", "--model", "convmixer_256_8", "--index", "0"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["viz", "features", "--checkpoint", str(run), "--index", str(N_TEST)]) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["viz", "filters"])  # --checkpoint or --model is required


def test_rf_dilated_stack(tmp_path, capsys):
    out = tmp_path / "rf.png"
    assert main(["rf", "--kernel", "3", "--dilations", "1,2,5", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rf_size"] == 17 and info["gridding_share"] == 0 and info["hdc"]["passes"]
    assert png_size(out) == (1000, 1000)  # 17 cells: capped at 10 in, + 1.5 in
    out = tmp_path / "rf222.png"
    assert main(["rf", "--dilations", "2,2,2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "71.0%" in text and "HDC: fails" in text and "gcd 2" in text
    assert png_size(out) == (800, 800)  # 13 x 0.5 + 1.5 in
    out = tmp_path / "rf_big.png"
    assert main(["rf", "--dilations", "1,2,5", "--size", "25", "--out", str(out), "--json"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["counts"]).shape == (25, 25)
    with pytest.raises(SystemExit):
        main(["rf", "--dilations", "1,x"])


def test_rf_sawtooth_of_hdc_groups_passes(tmp_path, capsys):
    assert main(["rf", "--kernel", "3", "--dilations", "1,2,5,1,2,5", "--out", str(tmp_path / "saw.png")]) == 0
    text = capsys.readouterr().out
    assert "(gridding): 0.0%" in text and "HDC: passes (each sawtooth group passes; no gridding)" in text
    assert "HDC, sawtooth group [1, 2, 5] (x2): rule 2, M_2 <= K: pass" in text
    assert "as one group: rule 2, M_2 <= K: FAIL (M = [3, 5, 9, 1, 2, 5], M_2 = 5, K = 3)" in text
    assert main(["rf", "--dilations", "1,2,9", "--cmap", "viridis", "--out", str(tmp_path / "gap.png")]) == 0
    text = capsys.readouterr().out
    assert "HDC: fails: whole stack [1, 2, 9]: rule 2 (M_2 <= K) fails: M_2 = 5 > K = 3" in text
    assert main(["rf", "--dilations", "1,2,5", "--cmap", "nope"]) == 2
    assert "colour map" in capsys.readouterr().err


def test_viz_weights_default_to_the_seeds_block_and_scaling(tmp_path, capsys):
    out = tmp_path / "k.png"
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == "blocks.3.0.fn.0" and info["normalize"] == "global"
    assert main(["viz", "filters", "--model", "convmixer_256_8", "--normalize", "tile", "--cmap", "viridis",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["normalize"] == "tile"
    assert main(["viz", "kernels", "--model", "convmixer_256_8", "--cmap", "nope", "--out", str(out)]) == 2
    assert "colour map" in capsys.readouterr().err


def test_rf_model_and_effective(run_dir, tmp_path, capsys):
    run, *_ = run_dir
    out = tmp_path / "rf_model.png"
    assert main(["rf", "--model", "convmixer_256_8", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rf_size"] == 66 and info["target"] == "blocks" and info["note"] == ""
    assert png_size(out) == (750, 650)
    out = tmp_path / "erf.png"
    assert main(["rf", "--effective", "--checkpoint", str(run), "--images", "4", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_images"] == 4 and info["images"] == "test images"
    assert 1 <= info["side_50"] <= info["side_90"] <= info["side_95"] <= 33
    assert info["mass_inside_theoretical"] == pytest.approx(1.0)
    assert png_size(out) == (700, 625)
    assert main(["rf", "--effective", "--model", "convmixer_256_8"]) == 2
    assert "--random-inputs" in capsys.readouterr().err


def test_rf_json_without_out_writes_no_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["rf", "--kernel", "3", "--dilations", "1,2,5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["out"] is None and info["rf_size"] == 17
    assert list(tmp_path.iterdir()) == []
    assert main(["rf", "--kernel", "3", "--dilations", "1,2,5"]) == 0  # without --json the picture is the point
    assert [p.name for p in tmp_path.iterdir()] == ["rf_k3_d1-2-5.png"]
