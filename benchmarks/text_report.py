"""The provenance lines and output of the benchmarks that print a text report (command, commit,
CPU, torch, threads, date first), shared by bench_gelu_bn.py, profile_train_step.py,
bench_layernorm.py and bench_pointwise.py."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import torch

from mixlab.train.cpu_defaults import cpu_model_name


def provenance_fields() -> dict:
    """The command as run, commit, CPU, threads, torch version and date (for a JSON record)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return dict(command=f"python {' '.join(sys.argv)}", commit=commit, cpu=cpu_model_name(),
                threads=torch.get_num_threads(), torch=torch.__version__, date=datetime.date.today().isoformat())


def provenance() -> list[str]:
    """The report's first two lines: the command as run, then commit, CPU, torch, threads, date."""
    f = provenance_fields()
    return [f["command"], f"commit {f['commit']}, {f['cpu']}, torch {f['torch']}, {f['threads']} threads, {f['date']}"]


def emit(lines: list[str], out: str | None) -> None:
    """Print the report, and write it to ``out`` too when given."""
    report = "\n".join(lines)
    print(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report + "\n")
