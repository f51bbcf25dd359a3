"""`mixlab eval`: per-class accuracy of a class with no images in the split is n/a, not 0%."""
from __future__ import annotations

import json
import shutil

from mixlab.cli import main


def test_a_class_without_test_images_shows_na_not_zero(make_folder_dataset, tmp_path, capsys):
    root = make_folder_dataset(n_classes=3, per_class=(4, 2), size=8)
    out = tmp_path / "run"
    assert main(["train", "--model", "convmixer_256_8", "--model-kwargs", "dim=8,depth=1", "--dataset", "folder",
                 "--data", str(root), "--epochs", "1", "--batch-size", "4", "--precision", "fp32",
                 "--set", "progress=false", "--set", "autotune=false", "--set", "data.val_split=0",
                 "--out", str(out)]) == 0
    for f in (root / "test" / "class2").iterdir():  # the class folder stays, empty
        f.unlink()
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [row] = [ln for ln in lines if ln.strip().startswith("class2")]
    assert "n/a" in row and "%" not in row
    assert all("%" in ln for ln in lines if ln.strip().startswith(("class0", "class1")))
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["per_class_accuracy"]["class2"] is None and result["n"] == 4
    assert all(isinstance(result["per_class_accuracy"][c], float) for c in ("class0", "class1"))
