"""Errors mixlab raises for conditions the user can act on (the CLI prints their message alone)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class RunLocked(RuntimeError):
    """Another training is writing the run directory (its run.lock names a live process)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or result file could not be written (a full disk...); the previous checkpoint is intact."""
