"""CPU training speed of ConvMixer-256/8 (batch 128, 32x32): mixlab's defaults against timm.

Each configuration runs in a fresh Python process (`mixlab bench --json`), so allocator and
thread settings of one cannot leak into another:

  A. timm's ConvMixer, plain fp32 NCHW, untuned process (what a user gets without mixlab)
  B. mixlab's training defaults on a CPU (bf16 autocast + channels_last + malloc tuning)
     side by side with timm's same model in the same settings (alternating windows)
  C. the same as B with glibc's default malloc (MIXLAB_MALLOC_TUNING=0)
  D. fp32 with and without malloc tuning

    python benchmarks/cpu_train_speed.py [--out benchmarks/results/cpu_train_speed.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

TIMM = ["--vs", "timm:convmixer.ConvMixer", "--vs-kwargs", "dim=256,depth=8,kernel_size=5,patch_size=2,num_classes=10"]
BASE = ["convmixer_256_8", "--mode", "train", "--batch-size", "128", "--img-size", "32", "--device", "cpu", "--json"]


def bench(extra, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "mixlab", "bench", *BASE, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    d["command"] = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items()) + " mixlab bench " + " ".join(BASE + extra)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    fast = ["--precision", "bf16", "--channels-last"]
    runs = {
        "B_defaults_vs_timm_same_settings": bench(fast + TIMM),
        "C_defaults_glibc_malloc_vs_timm": bench(fast + TIMM, {"MIXLAB_MALLOC_TUNING": "0"}),
        "D_fp32_vs_timm": bench(TIMM),
        "D_fp32_glibc_malloc_vs_timm": bench(TIMM, {"MIXLAB_MALLOC_TUNING": "0"}),
        "fp32_channels_last": bench(["--channels-last"]),
        "bf16_nchw": bench(["--precision", "bf16"]),
    }
    # A: timm's model in a plain, untuned process: fp32, NCHW, glibc malloc (timing it through
    # `--vs` would put it in mixlab's tuned process; here it is the only model in its own).
    plain = bench(TIMM + ["--windows", "5"], {"MIXLAB_MALLOC_TUNING": "0"})
    runs["A_timm_plain_fp32_untuned"] = {"images_per_sec_median": plain["other"]["images_per_sec_median"],
                                         "command": plain["command"]}
    print(f"{'configuration':<40} {'mixlab img/s':>12} {'timm img/s':>11} {'ratio':>6}")
    for name, d in runs.items():
        if "result" in d:
            other = d.get("other", {}).get("images_per_sec_median")
            print(f"{name:<40} {d['result']['images_per_sec_median']:12.1f} "
                  f"{other if other is None else round(other, 1)!s:>11} {d.get('ratio', float('nan')):6.3f}")
        else:
            print(f"{name:<40} {'':>12} {d['images_per_sec_median']:11.1f}")
    speedup = runs["B_defaults_vs_timm_same_settings"]["result"]["images_per_sec_median"] / runs["A_timm_plain_fp32_untuned"]["images_per_sec_median"]
    print(f"mixlab defaults vs plain fp32 timm in an untuned process: {speedup:.2f}x")
    if args.out:
        from mixlab.io import atomic_write_json

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        atomic_write_json(args.out, dict(command="python benchmarks/cpu_train_speed.py --out " + args.out,
                                         git_commit=commit, device=f"CPU: {platform.processor() or platform.machine()}, "
                                         f"{os.cpu_count()} cores", date=datetime.date.today().isoformat(),
                                         speedup_vs_plain_timm=speedup, runs=runs))


if __name__ == "__main__":
    main()
