"""Training: configs and recipes, the one training loop, checkpoints and run directories."""
from .config import resolve_config  # noqa: F401


def run_training(cfg: dict, out_dir, resume: bool = False) -> dict:
    """Train a resolved config (its ``task`` picks the task) into ``out_dir``."""
    from ..tasks import get_task
    from .loop import run_training as run

    return run(get_task(cfg.get("task", "classification")), cfg, out_dir, resume)
