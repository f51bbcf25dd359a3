"""The ``mixlab`` command line: a thin dispatcher over ``mixlab.commands.*``.

Each subcommand lives in its own module and is imported only when it runs, so
``mixlab models`` does not pay for the training stack's imports.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# name -> (module, one-line help). Order is the order of `mixlab --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("mixlab.commands.models", "list the registered models"),
    "info": ("mixlab.commands.info", "exact parameters, MACs/FLOPs and feature shapes of a model"),
    "bench": ("mixlab.commands.bench", "time training or inference steps (optionally against timm)"),
    "recipes": ("mixlab.commands.recipes", "list the shipped training recipes"),
    "train": ("mixlab.commands.train", "train a classifier (CIFAR-10/100 or an image folder)"),
    "eval": ("mixlab.commands.eval", "evaluate a trained run: accuracy, per-class, confusion matrix"),
    "predict": ("mixlab.commands.predict", "classify image files with a trained run (top-k classes, CSV/JSON)"),
    "export": ("mixlab.commands.export", "export a run or a model to ONNX or torch.export (.pt2), checked"),
    "seg": ("mixlab.commands.seg", "segmentation: `seg train`, `seg eval`, `seg predict` (UNeXt on BUSI, any images + masks)"),
    "refine": ("mixlab.commands.refine", "boundary patch refinement: `refine coarse`, `refine train`, `refine eval`, `refine apply`"),
    "det": ("mixlab.commands.det", "instance segmentation: `det train`, `det eval`, `det predict` (Mask R-CNN on any backbone)"),
    "compare": ("mixlab.commands.compare", "train several models with one recipe and seed, resumably"),
    "report": ("mixlab.commands.report", "one table and plots over training runs (params, MACs, speed, accuracy)"),
    "viz": ("mixlab.commands.viz", "pictures inside a model: filters, kernels, feature maps, saliency"),
    "rf": ("mixlab.commands.rf", "receptive fields: dilated-stack counts, HDC checks, model and effective RF"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="mixlab", formatter_class=_Formatter,
        description="mixlab: vision backbones that mix patches with convolutions, MLPs and attention.",
        epilog=f"commands:\n{lines}\n\nRun `mixlab COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"mixlab {command}", description=COMMANDS[command][1],
                                     formatter_class=_Formatter)
    module.configure(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"mixlab {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"mixlab: unknown command {command!r}.{hint} Run `mixlab --help`.", file=sys.stderr)
        return 2
    from .runtime import flush_denormals, tune_malloc

    tune_malloc()  # before any large tensor is allocated; see runtime.py for why
    flush_denormals()  # before torch starts its worker threads, which copy the mode; see runtime.py
    parser, module = build_parser(command)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\nmixlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_message(e)
        if message is None or os.environ.get("MIXLAB_DEBUG"):
            raise  # a bug (or MIXLAB_DEBUG=1): the traceback is what a report needs
        print(f"mixlab {command}: error: {message}", file=sys.stderr)
        return 2


# errno values of an OSError that the user fixes outside mixlab (permissions, space, a
# read-only mount); with the file named, one line says all there is to say
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def user_message(e: BaseException) -> str | None:
    """The one-line message the CLI prints for ``e``, or None for an error that is a bug.

    mixlab's own errors (:class:`mixlab.errors.MixlabError`: bad input, a locked run, a
    diverged training...) carry a message written for the user. An ``OSError`` for a named
    file that the user fixes outside mixlab (no permission, a full disk, a read-only mount)
    is shown as one line too. Everything else, including a ``ValueError`` or ``TypeError``
    that is not a :class:`~mixlab.errors.UsageError`, is a bug and gets its traceback.
    """
    from .errors import MixlabError

    if isinstance(e, MixlabError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS and e.filename:
        return f"cannot write {e.filename}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) \
            else f"{e.filename}: {e.strerror} (check the permissions of the file and its folder)"
    return None
