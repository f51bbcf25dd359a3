"""The provenance lines and output of the benchmarks that print a text report (command, commit,
CPU, torch, threads, date first), shared by bench_gelu_bn.py and profile_train_step.py."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import torch

from mixlab.train.cpu_defaults import cpu_model_name


def provenance() -> list[str]:
    """The report's first two lines: the command as run, then commit, CPU, torch, threads, date."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return [f"python {' '.join(sys.argv)}",
            f"commit {commit}, {cpu_model_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{datetime.date.today().isoformat()}"]


def emit(lines: list[str], out: str | None) -> None:
    """Print the report, and write it to ``out`` too when given."""
    report = "\n".join(lines)
    print(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report + "\n")
