"""The kinds of training mixlab runs; each is a :class:`~mixlab.tasks.base.Task`.

Adding a task: a file under ``mixlab/tasks/`` with a Task subclass, and its line in
:data:`TASKS`.
"""
from __future__ import annotations

from pathlib import Path

from .base import RunContext, Task  # noqa: F401
from ..errors import UsageError

# name -> "module:class", imported when first asked for (the tasks pull in their data code)
TASKS = {
    "classification": "mixlab.tasks.classification:ClassificationTask",
    "segmentation": "mixlab.tasks.segmentation:SegmentationTask",
    "refine": "mixlab.tasks.refine:RefineTask",
    "detection": "mixlab.tasks.detection:DetectionTask",
}


def get_task(name: str) -> Task:
    """A fresh task object of the named kind."""
    import importlib

    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def load_run_model(run_dir: str | Path, which: str = "best", task: str | None = "classification"):
    """(model in eval mode with a run's weights, its config). ``which``: best | last;
    ``task``: the task the caller handles (a run of another task is refused, naming the
    command that handles it), or None for any."""
    from ..checkpoint import load_weights
    from ..io import read_state_dict
    from ..train import rundir as rd

    run_dir = Path(run_dir)
    cfg = rd.read_config(run_dir)
    run_task = cfg.get("task", "classification")
    if task is not None and run_task != task:
        if run_task == "segmentation":
            raise UsageError(f"{run_dir} is a segmentation run: use `mixlab seg eval --checkpoint {run_dir}` or "
                             f"`mixlab seg predict --checkpoint {run_dir} ...`")
        if run_task == "classification":
            raise UsageError(f"{run_dir} is a classification run; use `mixlab eval --checkpoint {run_dir}` for it")
        raise UsageError(f"{run_dir} is a {run_task} run, not a {task} run")
    path = rd.weights_path(run_dir, which)
    model = get_task(run_task).build_model(cfg, for_eval=True)
    load_weights(model, read_state_dict(path))
    return model.eval(), cfg
