"""Boundary patch refinement on BUSI: what BPR buys on top of a UNeXt run's validation masks.

    python benchmarks/refine_busi.py --data ../shared/data/busi --coarse runs/unext-busi-400ep \\
        --out benchmarks/results/refine-busi-YYYY-MM-DD [--folds 5] [--oof-epochs 100] [--refine-epochs 30]

Steps, each a `mixlab` command run in a fresh process (run the script again to continue: the
finished steps are kept, a stopped training resumes):

1. `mixlab refine coarse --recipe unext-busi --epochs E --folds K`: out-of-fold UNeXt masks
   of the 420 training images (each predicted by a model trained on the other folds), the
   refiner's training set; in runs/refine-busi/oof.
2. `mixlab refine train --coarse runs/refine-busi/oof`: the refiner (its defaults), with 10%
   of those images held out to pick its best epoch; in runs/refine-busi/refiner.
3. `mixlab refine eval --coarse RUN`: before and after on RUN's 105 validation images, which
   neither the refiner nor the out-of-fold models saw; the figures before are those `mixlab
   seg eval --checkpoint RUN` prints. Also the three cases picture.
4. With --det DIR (a `mixlab det predict` folder of the same validation images): the same on
   its masks.

Writes OUT/eval.json (and eval-det.json), OUT/cases.png, OUT/refiner/ (config, metrics,
summary, curves, split files; no weights) and OUT/README.md with the table, the commands,
the CPU and the times.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def mixlab(*args: str, capture: bool = False) -> tuple[str, float]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mixlab", *args]
    print("$ mixlab " + " ".join(args), flush=True)
    done = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None,
                          env=dict(os.environ, MIXLAB_NO_PROGRESS="1"))
    if done.returncode != 0:
        sys.exit(f"stopped: `mixlab {' '.join(args)}` failed (exit {done.returncode}); run this script again to "
                 "continue once it is fixed")
    return (done.stdout or ""), time.perf_counter() - t0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def table(r: dict, label: str) -> list[str]:
    rows = [f"| {label} | before | after | change |", "|---|---:|---:|---:|"]
    for name, key in (("IoU (seg eval's)", "iou"), ("Dice (seg eval's)", "dice"), ("IoU per image", "iou_per_image"),
                      (f"boundary F@{r['boundary_tolerance_px']}px", "boundary_f")):
        b, a = r[f"{key}_before"], r[f"{key}_after"]
        rows.append(f"| {name} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    rows.append(f"| patches / time | {r['n_patches']} on {r['n_images']} images | "
                f"{1000 * r['seconds_per_image']:.1f} ms per image | |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--coarse", required=True, metavar="UNEXT_RUN", help="a finished `mixlab seg train` run")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="runs/refine-busi")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--oof-epochs", type=int, default=100)
    p.add_argument("--refine-epochs", type=int, default=30)
    p.add_argument("--det", metavar="DIR", help="a `mixlab det predict` folder of the validation images")
    p.add_argument("--coarse-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the out-of-fold UNeXt trainings")
    p.add_argument("--refine-set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the refiner")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    times, commands = {}, []

    oof, refiner = work / "oof", work / "refiner"
    step = ["refine", "coarse", "--recipe", "unext-busi", "--data", args.data, "--folds", str(args.folds),
            "--epochs", str(args.oof_epochs), "--out", str(oof), *[a for kv in args.coarse_set for a in ("--set", kv)]]
    commands.append(step)
    _, times["out-of-fold coarse masks"] = mixlab(*step)
    step = ["refine", "train", "--coarse", str(oof), "--data", args.data, "--epochs", str(args.refine_epochs)]
    step += ["--resume", str(refiner)] if (refiner / "config.yaml").is_file() else [
        "--out", str(refiner), *[a for kv in args.refine_set for a in ("--set", kv)]]
    commands.append(step)
    _, times["refiner training"] = mixlab(*step)
    results = {}
    for label, source, name in (("UNeXt", args.coarse, "eval.json"), ("det", args.det, "eval-det.json")):
        if not source:
            continue
        step = ["refine", "eval", "--checkpoint", str(refiner), "--coarse", source, "--data", args.data, "--json"]
        if label == "det":
            step += ["--split", str(Path(args.coarse) / "split_val.txt")]
        else:
            step += ["--overlays", str(out / "cases.png")]
        commands.append(step)
        text, times[f"evaluation on {label} masks"] = mixlab(*step, capture=True)
        results[label] = json.loads(text)
        (out / name).write_text(json.dumps(results[label], indent=2) + "\n")

    keep = out / "refiner"
    keep.mkdir(exist_ok=True)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "split_train.txt", "split_val.txt"):
        if (refiner / f).is_file():
            shutil.copy2(refiner / f, keep / f)
    lines = [f"# BPR on BUSI ({datetime.date.today().isoformat()})", "",
             f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}.", "",
             "Commands (`python benchmarks/refine_busi.py " + " ".join(sys.argv[1:]) + "`):", ""]
    lines += [f"    mixlab {' '.join(c)}" for c in commands] + [""]
    for label, r in results.items():
        lines += table(r, f"on {label} masks ({r['split']})") + [""]
    lines += ["Wall times: " + "; ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + ".", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
