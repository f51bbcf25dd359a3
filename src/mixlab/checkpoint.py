"""Loading weights into mixlab models: mixlab's own files and official checkpoints.

``load_official`` converts a state_dict saved from a paper's official implementation to
mixlab's layout. Each model family registers its converter with
:func:`register_official_converter`; a family whose key names already match needs none.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .io import normalize_state_dict, read_state_dict

__all__ = ["load_weights", "load_official", "register_official_converter", "convert_official", "key_diff_lines"]

Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
_CONVERTERS: dict[type, Converter] = {}


def register_official_converter(*model_classes: type):
    """Decorator: ``fn(official_state_dict, model) -> mixlab_state_dict`` for these classes."""

    def decorator(fn: Converter) -> Converter:
        for cls in model_classes:
            _CONVERTERS[cls] = fn
        return fn

    return decorator


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
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True)


def convert_official(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` (an official implementation's state_dict) in mixlab's layout for ``model``:
    the family's registered converter, or ``sd`` itself where the key names already match."""
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls](sd, model)
    return sd


def load_weights(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Load mixlab-layout weights (strict), from a dict or a safetensors/torch file."""
    _strict_load(model, _as_state_dict(state_dict_or_path), "the weights do not match")
    return model


def load_official(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Load a state_dict saved from the official implementation of ``model``'s paper.

    Keys and layouts are converted where mixlab's differ, then matched strictly: every
    tensor of the model must be in the file and nothing else may be.
    """
    sd = convert_official(_as_state_dict(state_dict_or_path), model)
    _strict_load(model, sd, "the official checkpoint does not match")
    return model
