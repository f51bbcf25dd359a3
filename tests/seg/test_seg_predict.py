"""Predicted masks and overlays are valid PNGs that read back; predictions keep each image's size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mixlab
from mixlab.seg.data import normalize_images, read_unext_folder
from mixlab.seg.predict import overlay_panel, predict_images, read_predict_inputs, save_mask_png, write_predictions


def test_save_mask_png_reads_back(tmp_path):
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[5:12, 3:17] = True
    path = save_mask_png(mask, tmp_path / "sub" / "m.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (30, 20)
        arr = np.asarray(im)
    assert set(np.unique(arr).tolist()) == {0, 255}
    assert np.array_equal(arr == 255, mask.numpy())
    assert not list(tmp_path.glob("sub/.*.tmp"))  # written atomically, no temporary left
    with pytest.raises(ValueError, match=r"one \(H, W\) mask"):
        save_mask_png(torch.zeros(1, 4, 4), tmp_path / "bad.png")


def test_overlay_panel_layout_and_colours():
    image = torch.full((3, 24, 32), 100, dtype=torch.uint8)
    truth = torch.zeros(24, 32, dtype=torch.bool)
    truth[4:20, 4:20] = True
    pred = torch.zeros(24, 32, dtype=torch.bool)
    pred[8:16, 8:16] = True
    panel = overlay_panel(image, pred, truth)
    assert panel.size == (3 * 32 + 2 * 4, 24 + 16)  # image | truth | prediction, caption strip on top
    arr = np.asarray(panel)
    top = 16
    assert tuple(arr[top + 1, 1]) == (100, 100, 100)  # the plain image
    inside_truth = arr[top + 10, 36 + 10]  # tinted green, inside the truth panel
    assert inside_truth[1] > inside_truth[0] and inside_truth[1] > inside_truth[2]
    inside_pred = arr[top + 12, 2 * 36 + 12]  # tinted red, inside the prediction panel
    assert inside_pred[0] > inside_pred[1]
    assert tuple(arr[top + 2, 2 * 36 + 2]) == (100, 100, 100)  # outside the prediction: untouched
    assert overlay_panel(image, pred).size == (2 * 32 + 4, 24 + 16)  # no ground truth: two panels


def _tiny_data(root, n=3, size=(64, 64)):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks" / "0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"x{i}.png")
        m = np.zeros(size, np.uint8)
        m[10:30, 5:25 + i] = 255
        Image.fromarray(m).save(root / "masks" / "0" / f"x{i}.png")


def test_predict_and_write_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mixlab.create_model("unext_s").eval()
    _tiny_data(tmp_path / "data")
    names, images, truths = read_predict_inputs(tmp_path / "data")
    assert names == ["x0", "x1", "x2"] and all(t is not None and t.shape == (1, 64, 64) for t in truths)
    images = images[:2] + [images[2][:, :40, :50].contiguous()]  # another size: resized there and back
    probs = predict_images(model, images, size=(64, 64), batch_size=2)
    assert [tuple(p.shape) for p in probs] == [(1, 64, 64), (1, 64, 64), (1, 40, 50)]
    assert all(float(p.min()) >= 0 and float(p.max()) <= 1 for p in probs)
    with torch.no_grad():
        direct = torch.sigmoid(model(normalize_images(torch.stack(images[:2]))))
    torch.testing.assert_close(torch.stack(probs[:2]), direct)

    out = tmp_path / "pred"
    written = write_predictions(out, names, images, probs, truths=[truths[0], truths[1], None])
    assert len(written["masks"]) == 3 and len(written["overlays"]) == 3
    for name, p in zip(names, probs):
        with Image.open(out / "masks" / "0" / f"{name}.png") as im:
            im.load()
            assert im.format == "PNG" and im.size == (p.shape[2], p.shape[1])
            assert np.array_equal(np.asarray(im) == 255, (p[0] > 0.5).numpy())
        with Image.open(out / "overlays" / f"{name}.png") as im:
            im.load()
            assert im.format == "PNG" and im.mode == "RGB"
    with Image.open(out / "overlays" / "x0.png") as im:
        assert im.size == (3 * 64 + 2 * 4, 64 + 32)  # title, captions, three panels
    with Image.open(out / "overlays" / "x2.png") as im:
        assert im.size == (2 * 50 + 4, 40 + 32)  # no ground truth given: two panels


def test_prediction_folder_reads_back_as_masks(tmp_path):
    _tiny_data(tmp_path / "data", n=2)
    ds = read_unext_folder(tmp_path / "data")
    probs = [m.float() for m in ds.masks]  # a perfect "prediction"
    write_predictions(tmp_path / "pred", ds.names, list(ds.images), probs, overlays=False)
    (tmp_path / "pred" / "images").symlink_to(tmp_path / "data" / "images")
    again = read_unext_folder(tmp_path / "pred")
    assert torch.equal(again.masks, ds.masks)


def test_single_image_input(tmp_path):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "one.png")
    names, images, truths = read_predict_inputs(tmp_path / "one.png")
    assert names == ["one"] and images[0].shape == (3, 10, 12) and truths == [None]
    with pytest.raises(FileNotFoundError, match="no such image or folder"):
        read_predict_inputs(tmp_path / "missing.png")
