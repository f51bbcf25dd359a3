"""`mixlab train`: train a classifier and write a run directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError, as_usage_error


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with "(default: X)" only where X tells something: not for flags whose default is
    None, False, "" or [] (their help says what happens without them), nor where the help
    text already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (not action.option_strings or "default" in text or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, (str, list)) and not d)):
            return text
        return text + " (default: %(default)s)"


def add_run_options(p, model_help: str, data_help: str, recipe_help: str, set_example: str) -> None:
    """The options `mixlab train` and `mixlab seg train` share (help texts per command)."""
    p.formatter_class = HelpFormatter
    p.add_argument("--model", help=model_help)
    p.add_argument("--data", help=data_help)
    p.add_argument("--epochs", type=int, help="epochs to train (default: the recipe's, else the command's default)")
    p.add_argument("--batch-size", type=int, help="images per training step (default: the recipe's)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling and augmentation (default: the recipe's)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default: measured on the CPU, bf16 where supported on CUDA), or fixed")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (default: auto, tried on the CPU for long runs)")
    p.add_argument("--out", help="run directory to write (must not hold another run; "
                   "default: runs/MODEL-YYYYMMDD-HHMMSS)")
    p.add_argument("--recipe", help=recipe_help)
    p.add_argument("--config", help="a YAML file of settings (same keys as the recipes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any setting, e.g. {set_example}")
    p.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="architecture arguments, e.g. dim=256,depth=8 (values are YAML)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--init", metavar="FILE|RUN_DIR", help="start from trained weights: a .safetensors / torch "
                   "weights file or a run directory (its best weights); a classifier of another size starts new")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="with --init: train only the classifier")
    p.add_argument("--logger", metavar="csv,tensorboard", help="also log the loss and lr every "
                   "log.every_n_steps steps and each epoch's figures: csv (steps.csv), tensorboard (tensorboard/)")


def config_from_args(args, task: str, overrides: list[str], **explicit) -> dict:
    """resolve_config from the shared options, ``overrides`` (the --set items) and ``explicit`` flags."""
    from ..kv import parse_kv
    from ..train.config import resolve_config

    if args.logger is not None:
        overrides = [*overrides, f"log.loggers=[{args.logger}]"]
    try:
        return resolve_config(model=args.model, recipe=args.recipe, config_file=args.config, overrides=overrides,
                              task=task, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                              seed=args.seed, device=args.device, precision=args.precision, compile=args.compile,
                              model_kwargs=parse_kv(args.model_kwargs) or None, init=args.init,
                              freeze_backbone=args.freeze_backbone, **explicit)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise as_usage_error(e) from None  # resolving a configuration only refuses input


# (argparse attribute, flag) of the settings a resumed run keeps from its config.yaml
_FIXED_ON_RESUME = (("batch_size", "--batch-size"), ("seed", "--seed"), ("device", "--device"),
                    ("precision", "--precision"), ("compile", "--compile"), ("out", "--out"),
                    ("recipe", "--recipe"), ("config", "--config"), ("set", "--set"),
                    ("model_kwargs", "--model-kwargs"), ("dataset", "--dataset"), ("download", "--download"),
                    ("train_split", "--train-split"), ("val_split", "--val-split"), ("test_split", "--test-split"),
                    ("init", "--init"), ("freeze_backbone", "--freeze-backbone"), ("logger", "--logger"))


def refuse_ignored_on_resume(args, command: str) -> None:
    """--resume continues a run with the settings in its config.yaml; only --epochs (extend the
    run), --data (its data moved) and --model (checked against the run's) apply. Any other
    setting given with it would be ignored, so it is refused, naming the flags."""
    given = [flag for attr, flag in _FIXED_ON_RESUME if getattr(args, attr, None) not in (None, False, "", [])]
    if given:
        raise UsageError(f"--resume continues {args.resume} with the settings in its config.yaml, so "
                         f"{', '.join(given)} would be ignored: drop {'it' if len(given) == 1 else 'them'}, or start "
                         f"a new run with `{command} --out NEW_DIR ...`. With --resume only --epochs (to extend the "
                         f"run) and --data (if its data moved) apply")


def resume_run(args, task: str, command: str, finished=None) -> int:
    """``--resume RUN_DIR`` of every training command: refuse flags it would ignore, continue the
    run, or print the result of one that has finished (``finished(summary)``: the line)."""
    from ..train import rundir as rd
    from ..train import run_training

    refuse_ignored_on_resume(args, command)
    cfg = rd.resume_config(args.resume, task, args.model, args.epochs, args.data)
    if cfg is None:
        summary = rd.read_summary(args.resume)
        print(finished(summary) if finished else f"{args.resume} already finished {summary['epochs_done']} epochs")
        return 0
    run_training(cfg, Path(args.resume), resume=True)
    return 0


def split_overrides(args) -> list[str]:
    """The --set items plus --train-split / --val-split FILE as their config keys."""
    overrides = list(args.set)
    for flag, key in ((getattr(args, "train_split", None), "data.train_split_file"),
                      (getattr(args, "val_split", None), "data.val_split_file")):
        if flag:
            overrides.append(f"{key}={flag}")
    return overrides


def start_run(args, task: str, command: str, overrides: list[str], folder_name=None, **explicit) -> int:
    """A new run of every training command: resolve the config, make the run folder, train."""
    from ..train import rundir as rd
    from ..train import run_training

    cfg = config_from_args(args, task, overrides, **explicit)
    out = rd.new_run_dir(args.out, folder_name(cfg) if folder_name else cfg["model"], command)
    if getattr(args, "download", False):
        cfg["data"]["download"] = True
    run_training(cfg, out)
    return 0


def configure(p):
    add_run_options(p, model_help="registered model name (see `mixlab models`)",
                    data_help="data root (default: $MIXLAB_DATA, then ~/.cache/mixlab/data)",
                    recipe_help="a shipped recipe (see `mixlab recipes`)",
                    set_example="--set optimizer.lr=0.01 --set augment.hflip=0")
    p.add_argument("--dataset", help="cifar10 (default), cifar100, or folder (any train/<class>/, test/<class>/ tree)")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is not found (needs a network)")


def run(args) -> int:
    if args.resume:
        return resume_run(args, "classification", "mixlab train", lambda summary: (
            f"{args.resume} already finished {summary['epochs_done']} epochs: test accuracy "
            f"{summary.get('test_acc'):.2f}%" + (" (selected on the test set: val = test)"
                                                  if summary.get("selected_on_test") else "")))
    return start_run(args, "classification", "mixlab train", list(args.set), dataset=args.dataset)
