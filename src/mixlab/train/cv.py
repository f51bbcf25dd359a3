"""`mixlab seg cv`: one segmentation recipe over K folds or N random splits, mean ± std of the
figures on each split's held-out part.

    OUT/splits/<part>_{train,val,test}.txt   the cases of each part (written once, then checked)
    OUT/<part>/                              a `mixlab seg train` run directory per part
    OUT/cv.json                              per-part figures, mean and standard deviation

A part's test cases are never trained on nor used to select its weights; its validation cases
select the weights (the recipe's ``select``) as in a single run. ``--folds K``: a seeded
K-fold partition, each case held out exactly once; ``--repeats N``: N seeded random splits
(test fraction ``test_split``, the recipe's ``val_split`` of the rest), seeds recorded. A rerun
skips finished parts and resumes interrupted ones, as `mixlab compare` does.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable
from ..errors import UsageError

# the held-out figures of each part, as summary.json["test"] holds them (percent)
FIGURES = ("iou", "dice", "iou_per_image", "dice_per_image")
CV_JSON = "cv.json"


def plan_parts(names: list[str], folds: int | None, repeats: int | None, val_split: float, test_split: float,
               seed: int) -> list[dict]:
    """[{name, seed, train, val, test}] of the parts (sorted name lists)."""
    from ..seg.data import kfold_names, split_names

    if (folds is None) == (repeats is None):
        raise UsageError("give one of --folds K (each case held out once) or --repeats N (N random splits)")

    def train_val(rest: list[str], s: int):
        if val_split and val_split > 0:
            return split_names(rest, val_split, s)
        return sorted(rest), []

    parts = []
    if folds is not None:
        for i, test in enumerate(kfold_names(names, int(folds), seed)):
            rest = [n for n in names if n not in set(test)]
            train, val = train_val(rest, seed)
            parts.append(dict(name=f"fold{i + 1}", seed=seed, train=train, val=val, test=test))
    else:
        if int(repeats) < 1:
            raise UsageError(f"--repeats must be 1 or more, got {repeats}")
        if not 0.0 < float(test_split) < 1.0:
            raise UsageError(f"--test-split must be a fraction between 0 and 1 for --repeats, got {test_split}")
        for r in range(int(repeats)):
            s = seed + r
            rest, test = split_names(names, float(test_split), s + 1_000_003)
            train, val = train_val(rest, s)
            parts.append(dict(name=f"repeat{r + 1}", seed=s, train=train, val=val, test=test))
    return parts


def _write_or_check_splits(out: Path, part: dict) -> dict[str, Path]:
    from ..seg.data import read_split_file, write_split_file

    paths = {}
    for k in ("train", "val", "test"):
        if not part[k]:
            continue
        path = out / "splits" / f"{part['name']}_{k}.txt"
        if path.is_file():
            if read_split_file(path) != part[k]:
                raise UsageError(f"{path} lists other cases than this command draws (another data folder, seed or "
                                 "--folds/--repeats?); use another --out, or delete the folder to start over")
        else:
            write_split_file(path, part[k])
        paths[k] = path
    return paths


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(results: list[dict]) -> dict:
    """{figure: {mean, std, n}} over the parts with held-out figures, for ``test`` and ``val``."""
    out = {}
    for split in ("test", "val"):
        rows = [r[split] for r in results if r.get(split)]
        if rows:
            out[split] = {f: dict(zip(("mean", "std"), mean_std([row[f] for row in rows])), n=len(rows))
                          for f in FIGURES}
    return out


def run_cv(out: str | Path, data: str, *, folds: int | None = None, repeats: int | None = None,
           test_split: float = 0.2, recipe: str | None = None, model: str | None = None,
           config_file: str | None = None, overrides: list[str] | None = None, epochs: int | None = None,
           dry_run: bool = False, say: Callable[[str], None] = print, **explicit) -> dict:
    """Train every part (see the module docstring); returns what cv.json holds."""
    from ..io import atomic_write_json
    from ..seg.data import load_segmentation_data
    from ..data.classification import default_cache_dir
    from ..tasks.segmentation import image_hw
    from . import rundir as rd
    from .compare import _state_of
    from .config import resolve_config

    base = resolve_config(model=model, recipe=recipe, config_file=config_file, overrides=overrides,
                          task="segmentation", epochs=epochs, data=data, **explicit)
    if base["data"].get("train_split_file") or base["data"].get("val_split_file") \
            or base["data"].get("test_split_file"):
        raise UsageError("seg cv draws its own splits: leave data.*_split_file unset")
    ds = load_segmentation_data(data, size=image_hw(base.get("img_size")), cache_dir=default_cache_dir() / "seg",
                                mask_threshold=base["data"].get("mask_threshold"),
                                mask_values=base["data"].get("mask_values"))
    seed = int(base["data"]["split_seed"])
    parts = plan_parts(list(ds.names), folds, repeats, float(base["data"]["val_split"]), float(test_split), seed)
    out = Path(out)
    say(f"seg cv: {len(parts)} {'folds' if folds else 'random splits'} of {len(ds.names)} cases from {data} "
        f"({base['model']}, {base['epochs']} epochs{', recipe ' + recipe if recipe else ''}) in {out}")
    plan = []
    for p in parts:
        action, reason = _state_of(out / p["name"], int(base["epochs"]))
        plan.append((p, action, reason))
        say(f"  {p['name']:<9} {len(p['train'])} train / {len(p['val'])} val / {len(p['test'])} test  "
            f"{action}: {reason}")
    if dry_run:
        return dict(parts=[dict(name=p["name"], action=a) for p, a, _ in plan])

    from .. import train as training

    results = []
    for p, action, reason in plan:
        run_dir = out / p["name"]
        if action != "skip":
            paths = _write_or_check_splits(out, p)
            if action in ("resume", "extend"):
                cfg = rd.read_config(run_dir)
                cfg["epochs"] = int(base["epochs"])
                cfg["data"]["root"] = data
            else:
                cfg = copy.deepcopy(base)
                cfg["data"]["test_split_file"] = str(paths["test"])
                if p["val"]:
                    cfg["data"].update(train_split_file=str(paths["train"]), val_split_file=str(paths["val"]))
            say(f"[{p['name']}] {action} ({reason})")
            training.run_training(cfg, run_dir, resume=action in ("resume", "extend"))
        summary = rd.read_summary(run_dir) or {}
        results.append(dict(name=p["name"], split_seed=p["seed"], run_dir=str(run_dir),
                            train_images=len(p["train"]), val_images=len(p["val"]), test_images=len(p["test"]),
                            best_epoch=summary.get("best_epoch"),
                            test={f: summary["test"][f] for f in FIGURES} if summary.get("test") else None,
                            val={f: summary["val"][f] for f in FIGURES} if summary.get("val") else None))
    report = dict(data=str(data), model=base["model"], recipe=recipe, epochs=int(base["epochs"]),
                  scheme=f"{folds}-fold" if folds else f"{repeats} random splits (test {test_split:g})",
                  std="sample standard deviation (n - 1)", parts=results, summary=summarize(results))
    atomic_write_json(out / CV_JSON, report)
    say(format_cv(report))
    return report


def format_cv(report: dict) -> str:
    """The table `mixlab seg cv` prints: each part's held-out figures, then mean ± std."""
    lines = [f"{report['model']} on {report['data']}, {report['scheme']}, {report['epochs']} epochs "
             "(test: held out, never trained on nor used to select; val: selected the weights)",
             f"{'part':<9} {'test IoU':>9} {'test Dice':>10} {'IoU/img':>8} {'Dice/img':>9} {'val IoU':>8}"]
    for r in report["parts"]:
        t, v = r.get("test") or {}, r.get("val") or {}
        lines.append(f"{r['name']:<9} {t.get('iou', float('nan')):9.2f} {t.get('dice', float('nan')):10.2f} "
                     f"{t.get('iou_per_image', float('nan')):8.2f} {t.get('dice_per_image', float('nan')):9.2f} "
                     f"{v.get('iou', float('nan')):8.2f}")
    s = report["summary"]
    if "test" in s:
        t, v = s["test"], s.get("val", {})
        pm = lambda d, k: f"{d[k]['mean']:.2f} ± {d[k]['std']:.2f}" if k in d else "n/a"  # noqa: E731
        lines.append(f"mean ± std over {t['iou']['n']}: test IoU {pm(t, 'iou')}, Dice {pm(t, 'dice')} "
                     f"(per image IoU {pm(t, 'iou_per_image')}, Dice {pm(t, 'dice_per_image')}); "
                     f"val IoU {pm(v, 'iou')}")
    return "\n".join(lines)
