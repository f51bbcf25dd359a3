"""This CPU's measured matmul peak (bf16 and fp32), the yardstick for a training step's efficiency.

    python benchmarks/bf16_matmul_peak.py [--json OUT.json]

Times square matmuls (2048, 4096) and the shape of ConvMixer-256/8's 1x1 convolution at batch 128
(32768 x 256 x 256) with torch's threads; reports GFLOP/s (2 FLOPs per multiply-add), best of 10.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from mixlab.runtime import tune_malloc
from mixlab.train.cpu_defaults import cpu_model_name


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    tune_malloc()  # as the CLI does: outputs are not page-faulted in again at every call
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((2048, 2048, 2048), (4096, 4096, 4096), (32768, 256, 256)):
            g = gflops(*shape, dtype)
            rows.append(dict(dtype=str(dtype)[6:], shape=list(shape), gflops=round(g, 1)))
            print(f"{str(dtype)[6:]:9s} {'x'.join(map(str, shape)):18s} {g:7.1f} GFLOP/s")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps(dict(
            command=f"python benchmarks/bf16_matmul_peak.py --json {args.json}", commit=commit, cpu=cpu_model_name(),
            threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows),
            indent=2) + "\n")


if __name__ == "__main__":
    main()
