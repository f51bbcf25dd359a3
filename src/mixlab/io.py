"""Atomic file writes and safe reads.

A result or checkpoint is written to a temporary file in the same folder, flushed to disk,
then renamed over the target: a crash, a kill or a full disk during the write leaves the
previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "atomic_save_safetensors", "read_state_dict", "normalize_state_dict",
]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # make the bytes durable before the rename
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage and non-contiguous tensors: give it clean copies
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from a file a user handed us, without unpickling arbitrary objects.

    ``.safetensors`` is read with safetensors; anything else with
    ``torch.load(weights_only=True)``. Checkpoints that wrap the weights (``{"model": ...}``,
    ``{"state_dict": ...}``, ``{"model_state": ...}``) are unwrapped, and a DataParallel/DDP
    ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends
            raise ValueError(
                f"{path} could not be read as plain weights (mixlab never unpickles code from a "
                f"checkpoint): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "Re-save it as a state_dict of tensors, or as .safetensors."
            ) from None
    return normalize_state_dict(sd, str(path))


def normalize_state_dict(sd, source: str = "the state_dict") -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": ...}``-style checkpoints and strip a DataParallel/DDP ``module.`` prefix."""
    for key in ("model", "state_dict", "model_state", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source} does not hold a state_dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)
