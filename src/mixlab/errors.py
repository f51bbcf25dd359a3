"""Errors mixlab raises for conditions the user can act on (the CLI prints their message alone)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""
