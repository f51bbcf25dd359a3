"""mixlab: vision backbones that mix patches with convolutions, MLPs and attention."""
from __future__ import annotations

__version__ = "0.1.0"

from .registry import create_model, list_models, model_info, register_model  # noqa: E402
from .checkpoint import load_official, load_weights  # noqa: E402
from . import models  # noqa: E402,F401  (registers every family)

__all__ = [
    "__version__", "create_model", "list_models", "model_info", "register_model",
    "load_official", "load_weights",
]
