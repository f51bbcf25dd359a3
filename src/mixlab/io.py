"""Atomic file writes and safe reads.

A result or checkpoint is written to a temporary file in the same folder, flushed to disk,
then renamed over the target: a crash, a kill or a full disk during the write leaves the
previous file intact.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import MissingFileError, UsageError

__all__ = [
    "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
    "atomic_save_safetensors", "read_state_dict", "normalize_state_dict", "safe_torch_load",
    "safetensors_metadata",
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
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and so does a writer that replaces the file with its own temp
        # file (safetensors' save_file): give it the mode open() would, as every other file
        os.chmod(tmp_path, 0o666 & ~_UMASK)
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
    ``module.`` prefix is stripped. A damaged file, or one that would run code, is refused
    with :class:`~mixlab.errors.UsageError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError (a truncated or empty file), OSError
            raise damaged_file_error(path, e, "safetensors weights") from None
    else:
        sd = safe_torch_load(path, "weights")
    return normalize_state_dict(sd, str(path))


def damaged_file_error(path: Path, e: BaseException, kind: str) -> UsageError:
    reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
    size = path.stat().st_size if path.is_file() else 0
    return UsageError(f"{path} is damaged or is not a {kind} file ({'empty' if size == 0 else f'{size:,} bytes'}: "
                      f"{reason[:200]}); it may have been cut short by a full disk or a copy that did not finish")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (reads only its header); a damaged file is refused naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise MissingFileError(f"weights file not found: {path}") from None
    except Exception as e:  # SafetensorError
        raise damaged_file_error(path, e, "safetensors weights") from None


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: tensors and plain values only, never code.

    A file that references code (a pickle of a function or a class) is refused with mixlab's
    own message: torch's suggests allow-listing the code with ``add_safe_globals``, which
    mixlab never does for a file it did not write. A truncated or foreign file is refused
    naming it. ``what``: what the file should hold, for the message."""
    import pickle
    import zipfile

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingFileError(f"{what} file not found: {path}") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        if found:
            raise UsageError(f"{path} asks to run code while it is loaded ({found.group(1)}), and mixlab never runs "
                             f"code from a file: a {what} file holds tensors and plain values only. Do not use this "
                             "file unless you know where it came from; if you made it, save a state_dict of tensors "
                             "instead (or .safetensors)") from None
        if "Weights only load failed" in text:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            why = detail.group(1).strip() if detail else "its pickle holds more than tensors"
            raise UsageError(f"{path} cannot be read as plain tensors ({why}), and mixlab never runs code from a file "
                             f"to read it: re-save the {what} as a state_dict of tensors with torch.save, or as "
                             ".safetensors") from None
        raise damaged_file_error(path, e, f"torch {what}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, IndexError) as e:
        raise damaged_file_error(path, e, f"torch {what}") from None


def normalize_state_dict(sd, source: str = "the state_dict") -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": ...}``-style checkpoints and strip a DataParallel/DDP ``module.`` prefix."""
    for key in ("model", "state_dict", "model_state", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{source} does not hold a state_dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)
