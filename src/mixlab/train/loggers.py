"""What a training writes as it goes, besides metrics.jsonl: the console (train.log), the loss
and learning rate every N steps (steps.csv), and TensorBoard event files (tensorboard/).

    config ``log.loggers``: a list of csv | tensorboard (``--logger csv,tensorboard``)
    config ``log.every_n_steps``: how often the step loss and lr are written (each write reads
    the loss from the device, so it is not every step)

A resumed run continues the files: rows and events after the checkpoint's epoch (written by the
interrupted run) are dropped first, so a resumed run's logs equal an uninterrupted run's.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from ..errors import UsageError

TRAIN_LOG, STEPS_CSV, TB_DIR = "train.log", "steps.csv", "tensorboard"
LOGGERS = ("csv", "tensorboard")
_STEP_FIELDS = ("step", "epoch", "loss", "lr")


def parse_loggers(value) -> list[str]:
    """``"csv,tensorboard"`` or a list -> checked list of logger names."""
    if value is None or value == "":
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UsageError(f"unknown logger {', '.join(map(repr, unknown))}: choose from {', '.join(LOGGERS)} "
                         "(e.g. --logger csv,tensorboard)")
    return names


class ConsoleLog:
    """Copies everything printed to stdout while it is entered: kept in memory until
    :meth:`attach` names the file (a run folder that ends up holding no run gets no log),
    then appended to it as it is printed."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.buffer, self.file, self.stream = enabled, [], None, None

    def __enter__(self):
        if self.enabled:
            self.stream, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc):
        if self.enabled:
            sys.stdout = self.stream
            if self.file is not None:
                self.file.close()
        return False

    def attach(self, path: Path) -> None:
        if self.enabled and self.file is None:
            self.file = open(path, "a", buffering=1)
            self.file.write("".join(self.buffer))
            self.buffer = []

    def write(self, text: str) -> int:
        if self.file is not None:
            self.file.write(text)
        else:
            self.buffer.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        if self.file is not None:
            self.file.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno ... of the console
        return getattr(self.stream, name)


class StepLoggers:
    """The loggers a run asked for, fed by the loop: :meth:`step` every ``every_n_steps``
    optimizer steps, :meth:`epoch` with each metrics row."""

    def __init__(self, run_dir: Path, names: list[str], every_n_steps: int, steps_per_epoch: int, start_epoch: int):
        self.every = max(int(every_n_steps), 1)
        self.steps_per_epoch = steps_per_epoch
        self.csv = self.tb = None
        first_step = start_epoch * steps_per_epoch
        if "csv" in names:
            self.csv_path = run_dir / STEPS_CSV
            kept = []
            if self.csv_path.is_file() and start_epoch > 0:
                with open(self.csv_path, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if int(r["step"]) <= first_step]
            self.csv = open(self.csv_path, "w", newline="", buffering=1)
            self.writer = csv.DictWriter(self.csv, fieldnames=_STEP_FIELDS)
            self.writer.writeheader()
            self.writer.writerows(kept)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--logger tensorboard needs the tensorboard package: pip install tensorboard "
                                 "(or pip install 'mixlab[tensorboard]')") from None
            # purge_step: events an interrupted run wrote after the checkpoint are dropped
            self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=first_step + 1 if start_epoch > 0 else None)

    @property
    def enabled(self) -> bool:
        return self.csv is not None or self.tb is not None

    def wants(self, step_in_epoch: int) -> bool:
        return self.enabled and step_in_epoch % self.every == 0

    def step(self, epoch: int, step_in_epoch: int, loss: float, lr: float) -> None:
        global_step = epoch * self.steps_per_epoch + step_in_epoch
        if self.csv is not None:
            self.writer.writerow(dict(step=global_step, epoch=epoch + 1, loss=loss, lr=lr))
        if self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, global_step)
            self.tb.add_scalar("train/lr", lr, global_step)

    def epoch(self, row: dict) -> None:
        if self.tb is None:
            return
        step = row["epoch"] * self.steps_per_epoch
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                group = "val" if key.startswith("val_") else "time" if key.endswith(("seconds", "per_sec")) else \
                    "train" if key.startswith("train_") else "epoch"
                self.tb.add_scalar(f"{group}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.tb is not None:
            self.tb.close()
