"""The CLI's rule: one line for mixlab's own errors, a full traceback for anything else."""
from __future__ import annotations

import errno

import pytest

import mixlab.commands.models as models_command
from mixlab.cli import main
from mixlab.data.classification import DataError
from mixlab.errors import (ArgumentError, MissingFileError, MixlabError, UnknownNameError, UsageError,
                           as_usage_error)


def raising(exc):
    def run(_args):
        raise exc

    return run


@pytest.mark.parametrize("exc", [UsageError("batch_size must be a whole number >= 1, got 0"),
                                 MissingFileError("config file not found: x.yaml"),
                                 UnknownNameError("unknown model 'x'. Run `mixlab models`"),
                                 ArgumentError("model 'm' does not take argument foo")])
def test_mixlabs_own_errors_are_one_line(monkeypatch, capsys, exc):
    monkeypatch.setattr(models_command, "run", raising(exc))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == f"mixlab models: error: {exc.args[0]}\n"  # KeyError's quotes are not added


@pytest.mark.parametrize("exc", [TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
                                 ValueError("invalid literal for int() with base 10: 'x'"),
                                 KeyError("model"), FileNotFoundError("internal.json"),
                                 RuntimeError("shape mismatch")])
def test_any_other_error_keeps_its_traceback(monkeypatch, exc):
    monkeypatch.setattr(models_command, "run", raising(exc))
    with pytest.raises(type(exc)):  # not swallowed: Python prints the traceback and exits 1
        main(["models"])


def test_a_permission_or_disk_error_on_a_named_file_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(models_command, "run", raising(PermissionError(errno.EACCES, "Permission denied", "/x/run")))
    assert main(["models"]) == 2
    assert "/x/run: Permission denied" in capsys.readouterr().err
    monkeypatch.setattr(models_command, "run", raising(OSError(errno.ENOSPC, "No space left on device", "/x/f")))
    assert main(["models"]) == 2
    assert "cannot write /x/f: No space left on device" in capsys.readouterr().err


def test_mixlab_debug_shows_the_traceback_of_an_input_error(monkeypatch):
    monkeypatch.setattr(models_command, "run", raising(UsageError("bad")))
    monkeypatch.setenv("MIXLAB_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["models"])


def test_the_input_errors_are_the_builtin_kinds_library_callers_catch():
    assert issubclass(UsageError, ValueError) and issubclass(UsageError, MixlabError)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(ArgumentError, TypeError)
    assert issubclass(UnknownNameError, KeyError) and issubclass(DataError, UsageError)
    assert str(UnknownNameError("no such name")) == "no such name"
    assert isinstance(as_usage_error(FileNotFoundError("f")), MissingFileError)
    assert str(as_usage_error(KeyError("k"))) == "k"


def test_an_unknown_model_argument_is_an_input_error_not_a_bug(capsys):
    assert main(["info", "convmixer_256_8", "--model-kwargs", "nonsense=1"]) == 2
    assert "does not take argument nonsense" in capsys.readouterr().err
