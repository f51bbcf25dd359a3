"""Errors mixlab raises for conditions the user can act on.

The command line prints the message of a :class:`MixlabError` alone, on one line (or a few,
for a list of files), and a full traceback for every other exception: a ``TypeError`` or
``ValueError`` that is not one of these classes is a bug in mixlab or in a library, and its
traceback is what a bug report needs.

*mixlab's own input errors* are :class:`UsageError` and its subclasses: the user gave a
setting, an argument, a file or a data set that mixlab refuses, and the message names it
(the key or flag, the value, what is allowed, or the file and what is wrong with it).
``UsageError`` is a ``ValueError`` (and :class:`MissingFileError` a ``FileNotFoundError``,
:class:`ArgumentError` a ``TypeError``), so library callers can keep catching those.
The other :class:`MixlabError` classes are conditions of a run, not of its input.
"""


class MixlabError(Exception):
    """An error whose message is written for the user: the CLI prints it without a traceback."""


class UsageError(MixlabError, ValueError):
    """Bad input: a configuration value, a command-line argument, a file's content or a data set."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named (or a run directory needs) does not exist."""


class ArgumentError(UsageError, TypeError):
    """A model or function was given an argument it does not take, or a value of the wrong type."""


class TrainingDiverged(MixlabError, RuntimeError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class RunLocked(MixlabError, RuntimeError):
    """Another training is writing the run directory (its run.lock names a live process)."""


class CheckpointWriteError(MixlabError, RuntimeError):
    """A checkpoint or result file could not be written (a full disk...); the previous checkpoint is intact."""


class DistributedTimeout(MixlabError, RuntimeError):
    """A rank of a distributed run waited longer than the process group's timeout for the others."""


class MemoryEstimateTooLarge(UsageError):
    """A size or batch would need more memory than the machine has (estimated before allocating)."""


class UnknownNameError(UsageError, KeyError):
    """A name (a model, a case of a data set...) that is not known; the message lists close matches."""

    __str__ = UsageError.__str__  # KeyError's would quote the message


def as_usage_error(e: Exception) -> MixlabError:
    """``e`` as one of mixlab's input errors, for code that by construction only refuses input
    (resolving a configuration: unknown keys, recipes, files, values), where a plain
    ``ValueError`` / ``KeyError`` / ``FileNotFoundError`` is the user's to fix."""
    if isinstance(e, MixlabError):
        return e
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, FileNotFoundError):
        return MissingFileError(message)
    return UsageError(message)
