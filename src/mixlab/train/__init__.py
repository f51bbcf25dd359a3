"""Training: configs and recipes, the training loop, checkpoints and run directories."""
from .config import resolve_config  # noqa: F401
from .trainer import run_training  # noqa: F401
