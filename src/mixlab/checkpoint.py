"""Loading weights into mixlab models: mixlab's own files and official checkpoints.

Every mixlab family keeps the module names and parameter shapes of its paper's official
code, so ``load_official`` loads an official state_dict as it is, strictly.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .io import normalize_state_dict, read_state_dict
from .errors import UsageError

__all__ = ["load_weights", "load_official", "key_diff_lines"]


def _as_state_dict(state_dict_or_path) -> dict[str, torch.Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        return read_state_dict(state_dict_or_path)
    return normalize_state_dict(state_dict_or_path)


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def key_diff_lines(missing: list[str], unexpected: list[str], shape: list[str]) -> list[str]:
    """The lines of a "does not match" message: keys missing from the file, keys the model
    lacks, shape mismatches (each list summarised to its first few)."""
    lines = []
    if missing:
        lines.append(f"  missing in the file ({len(missing)}): {_few(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_few(unexpected)}")
    if shape:
        lines.append(f"  shape mismatch ({len(shape)}): {_few(shape)}")
    return lines


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` strictly; ``what``: the message's start up to the model's name ("the weights do not match")."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        lines = [f"{what} {type(model).__name__}:", *key_diff_lines(missing, unexpected, shape),
                 "  (is it a checkpoint of another architecture or variant?)"]
        raise UsageError("\n".join(lines))
    model.load_state_dict(sd, strict=True)


def load_weights(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Load mixlab-layout weights (strict), from a dict or a safetensors/torch file."""
    _strict_load(model, _as_state_dict(state_dict_or_path), "the weights do not match")
    return model


def load_official(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Load a state_dict saved from the official implementation of ``model``'s paper.

    mixlab keeps the official key names and layouts, so the keys are matched strictly as
    they are: every tensor of the model must be in the file and nothing else may be.
    """
    _strict_load(model, _as_state_dict(state_dict_or_path), "the official checkpoint does not match")
    return model
