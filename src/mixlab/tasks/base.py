"""What a kind of training is: the :class:`Task` interface the training loop drives.

The loop (:func:`mixlab.train.loop.run_training`) owns everything every task shares: the
device, precision and CPU settings, the optimizer and learning-rate schedule, the training
step, EMA, DDP, per-epoch reseeding, the run directory (checkpoints, metrics, summary,
curves) and the choice of the weights to report. A task owns what differs:

    defaults, command            its configuration defaults and the command that trains it
    setup(cfg, ...)              read the data, complete the config (num_classes, img_size, ...)
    build_model(cfg)             the architecture, fresh weights
    train_loader                 a DeviceLoader yielding prepared (inputs, targets) batches
    forward_loss(net, x, t)      the loss of one batch (and the outputs the meter needs)
    train_meter()                accumulates the per-epoch training figures
    validate(model)              the per-epoch validation figures (a metrics row's val_* part)
    best_key                     the row key that selects the best epoch (higher is better)
    finish(model, which, ...)    the final evaluation of the selected weights: summary fields

Adding a task is one file under ``mixlab/tasks/`` and one line in ``mixlab/tasks/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class RunContext:
    """What the loop has decided, shared with the task: filled as the run is set up."""

    device: torch.device
    dist: object  # mixlab.train.distributed.Distributed
    say: object = print
    precision: str = "fp32"
    memory_format: torch.memory_format = torch.contiguous_format
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)


class Task:
    """The base of every task; subclasses set the class attributes and implement the methods."""

    name: str = ""
    command: str = ""  # the CLI command that trains it, for messages
    defaults: dict = {}
    best_key: str = ""  # metrics-row key selecting the best epoch, e.g. "val_acc"
    best_summary_key: str = ""  # its name in summary.json, e.g. "best_val_acc"
    curves: tuple = ()  # ((metrics key, legend label), ...) for the score plot in curves.png
    curves_label: str = ""
    check_every: int = 20  # steps between reads of the running loss (each read syncs the device)
    rate_digits: int = 0  # decimals of the images/s figure in the epoch line
    init_in_loop: bool = True  # --init loads the whole model (mixlab.finetune) before training

    @property
    def model_task(self) -> str | None:
        """The kind of registered model this task trains (``mixlab models --task``); None: any."""
        return self.name

    @property
    def config_kind(self) -> str | None:
        """Whose shared settings checks (``mixlab.train.validation``) its config passes: its own
        kind's, another's (a refiner's config is a segmentation config plus its keys), or None
        when :meth:`validate_config` checks everything."""
        return self.name

    def __init__(self):
        self.ctx: RunContext | None = None
        self.train_loader = None
        self.has_val = False

    # --- configuration -------------------------------------------------------------------
    def validate_config(self, cfg: dict) -> None:
        """Task-specific checks of a resolved configuration (raise ValueError naming the key)."""

    # --- data and model --------------------------------------------------------------------
    def setup(self, cfg: dict, ctx: RunContext, resume_dir: Path | None) -> None:
        """Read the data (held on the task), build ``self.train_loader``, set ``self.has_val``
        and fill the data-derived config values, so that the config is complete before the
        run writes it. ``resume_dir``: the run directory when resuming (its split files)."""
        raise NotImplementedError

    def build_model(self, cfg: dict, for_eval: bool = False) -> nn.Module:
        """The model ``cfg`` describes, fresh weights (``for_eval``: without stochastic depth)."""
        raise NotImplementedError

    def new_classifier_for(self, source) -> bool:
        """Whether a model initialised from ``source`` (--init) keeps a new classifier even where
        the source's has the same shape: yes unless the source is known to predict the same
        classes (reusing a head trained on other classes maps them onto the old ones)."""
        return True

    def describe_data(self) -> str:
        """A short name of the data for plot titles."""
        return ""

    def model_line(self, cfg: dict, params: int, macs: int) -> str:
        """The start of the line printed once the model is built: name, size, cost."""
        return f"model: {cfg['model']} ({params:,} params, {macs / 1e6:.1f}M MACs)"

    def loss_note(self, cfg: dict) -> str:
        """What the start-of-run line says about the loss (``"; loss NAME"``), if anything."""
        return ""

    def input_shape(self, cfg: dict) -> tuple:
        """(C, H, W) of one input, for counting MACs."""
        raise NotImplementedError

    def timing_batch(self, batch_size: int):
        """An (inputs, targets) batch of the training shape for the CPU settings picker, or
        None when the task's steps cannot be timed that way (the defaults are used)."""
        return None

    picker_loss = None  # loss_fn(outputs, targets) the picker times the step with

    # --- training --------------------------------------------------------------------------
    def forward_loss(self, net: nn.Module, x, target):
        """(loss, outputs) of one training batch; runs inside autocast."""
        raise NotImplementedError

    def train_meter(self):
        """A fresh per-epoch accumulator: ``update(loss, outputs, target)``, ``running_loss()``,
        ``postfix()`` (progress-bar figures), ``compute() -> (row fields, images seen)``."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict:
        """The validation part of an epoch's metrics row (``val_*`` keys), or ``{}`` without
        a validation split."""
        raise NotImplementedError

    def epoch_line(self, row: dict) -> str:
        """The figures of the printed epoch line between the epoch number and the lr."""
        raise NotImplementedError

    def pending_summary(self) -> dict:
        """Summary fields that are not known until the end (written as null meanwhile)."""
        return {}

    def run_summary(self, cfg: dict) -> dict:
        """Task fields of summary.json known at the start."""
        return {}

    def on_new_run(self, run_dir: Path) -> None:
        """Write the task's own files into a run directory that starts from epoch 0."""

    # --- the end ----------------------------------------------------------------------------
    def finish(self, model: nn.Module, which: str, best_val: float, best_epoch: int, run_dir: Path) -> dict:
        """Evaluate the selected weights (``which`` says which they are); print the result
        line; return the summary fields of the result."""
        raise NotImplementedError
