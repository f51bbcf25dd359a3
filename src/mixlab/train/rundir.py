"""A run directory: what `mixlab train` writes, and reading it back.

    config.yaml        the full resolved configuration
    metrics.jsonl      one JSON line per finished epoch
    summary.json       the run's result so far (finished: false until the end)
    last.safetensors   model weights (with BatchNorm statistics) after the last finished epoch
    last_state.pt      optimizer, schedule, EMA, RNG states, epoch, best so far (tensors and
                       plain values only: read back with torch.load(weights_only=True))
    best.safetensors   the weights with the best validation accuracy
    curves.png         loss and accuracy per epoch
    checkpoint.json    which epoch's last.safetensors / last_state.pt / metrics.jsonl belong
                       together (the checkpoint's manifest)
    run.lock           while a training writes the folder (:mod:`mixlab.train.runlock`)

A checkpoint is crash-safe as a whole: the epoch's weights, state and metrics are first
written under staged names (``.ckpt-000012.last.safetensors`` ...; each atomically, temp
file + fsync + rename), then ``checkpoint.json`` naming them is written atomically (the
commit), then the staged files are renamed over the public names. A stop before the
manifest leaves the previous checkpoint whole (its files are untouched; the staged ones are
removed at the next start); a stop after it is completed by the next start, which renames
what is still staged. Run directories written before checkpoint.json existed resume from
last.safetensors / last_state.pt as before. best.safetensors, summary.json and curves.png
are single atomic files.

``MIXLAB_TEST_CRASH_AT=EVENT:EPOCH`` (for the fault-injection tests) SIGKILLs the process
(or sends it ``MIXLAB_TEST_CRASH_SIGNAL``, e.g. ``INT``) at a named point of the checkpoint
of that epoch; :data:`CRASH_EVENTS` lists the points.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from ..errors import CheckpointWriteError, MissingFileError, UsageError
from ..io import (atomic_path, atomic_write_json, atomic_write_text, read_state_dict, safe_torch_load,
                  safetensors_metadata)
from .optim import load_optimizer_state

CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
LAST, LAST_STATE, BEST, CURVES = "last.safetensors", "last_state.pt", "best.safetensors", "curves.png"
MANIFEST = "checkpoint.json"
_STAGE = ".ckpt-"
_CHECKPOINT_FILES = ((LAST, "last"), (LAST_STATE, "state"), (METRICS, "metrics"))  # (public name, event)

# the points of a checkpoint write, in order, where MIXLAB_TEST_CRASH_AT can stop the process
CRASH_EVENTS = ("start", "best.tmp", "best", "last.tmp", "last", "state.tmp", "state", "metrics.tmp", "metrics",
                "manifest.tmp", "manifest", "renamed-last", "renamed-state", "renamed-metrics", "committed")


def _crash_point(event: str, epoch: int) -> None:
    """Fault injection for the tests: stop this process at ``event`` of epoch ``epoch`` with
    SIGKILL, or with the signal ``MIXLAB_TEST_CRASH_SIGNAL`` names (``INT``: a Ctrl-C, which
    Python raises as KeyboardInterrupt right here)."""
    want = os.environ.get("MIXLAB_TEST_CRASH_AT")
    if want and want == f"{event}:{epoch}":
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get('MIXLAB_TEST_CRASH_SIGNAL', 'KILL')}"))


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (they are ordered by the next step's data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device"
    text = str(e).strip().splitlines()
    line = next((ln.strip() for ln in text if "failed" in ln.lower()), text[0].strip() if text else "")
    return f"{type(e).__name__}: {line[:200]}"


def _write_errors() -> tuple:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


@contextmanager
def _guard(path: Path, run_dir: Path, intact_epoch):
    """Turn a failed write (a full disk: OSError, torch's RuntimeError from inline_container.cc,
    SafetensorError) into one line naming the file and saying what is intact."""
    try:
        yield
    except _write_errors() as e:
        if callable(intact_epoch):
            intact_epoch = intact_epoch()
        intact = (f"the checkpoint of epoch {intact_epoch} is intact" if intact_epoch
                  else "no checkpoint had been written yet")
        raise CheckpointWriteError(f"could not write {path} ({_reason(e)}); {intact}: free some space (or fix the "
                                   f"cause), then continue with --resume {run_dir}") from None


def _write_file(path: Path, write, event: str, epoch: int, run_dir: Path, intact_epoch: int | None,
                shown: Path | None = None) -> None:
    """Write ``path`` atomically with ``write(tmp_path)``; crash points ``event.tmp`` (the
    temp file complete, not renamed) and ``event`` (renamed into place). ``shown``: the
    file's name in an error message (a staged file's public name)."""
    with _guard(shown or path, run_dir, intact_epoch):
        with atomic_path(path) as tmp:
            write(tmp)
            _crash_point(f"{event}.tmp", epoch)
    _crash_point(event, epoch)


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise MissingFileError(f"{run_dir} is not a mixlab run directory (no {CONFIG}); "
                               "pass the --out folder of a `mixlab train` run")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path} is not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__}); it "
                         "holds the run's settings: undo the edit that broke it (mixlab writes it whole)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), str):
        raise UsageError(f"{path} does not hold a run's settings (a mapping with model:, as mixlab writes it); "
                         "undo the edit that changed it")
    return cfg


def write_config(run_dir: Path, cfg: dict) -> None:
    with _guard(run_dir / CONFIG, run_dir, lambda: checkpoint_epoch(run_dir)):
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(cfg, sort_keys=False))


def _parse_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}, line {number}, is not valid JSON ({e}); it holds one line of metrics "
                                 "per epoch: undo the edit that broke it (mixlab writes it whole)") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}, line {number}, is not an epoch's metrics (a JSON object)")
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    return _parse_metrics(Path(run_dir) / METRICS)


def _metrics_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    atomic_write_text(run_dir / METRICS, _metrics_text(rows))


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); it holds the run's result so far and is written again "
                         "at the end of the next epoch: delete it, or undo the edit that broke it") from None
    if not isinstance(summary, dict):
        raise UsageError(f"{path} does not hold a run's summary (a JSON object)")
    return summary


def write_summary(run_dir: Path, summary: dict) -> None:
    with _guard(run_dir / SUMMARY, run_dir, summary.get("epochs_done")):
        atomic_write_json(run_dir / SUMMARY, summary)


def _save_safetensors(path: Path, model: torch.nn.Module, model_name: str, epoch: int | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"model": model_name, "format": "mixlab"}
    if epoch is not None:
        meta["epoch"] = str(epoch)
    # safetensors refuses shared storage and non-contiguous tensors: give it clean copies
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(clean, str(path), metadata=meta)


def save_weights(path: Path, model: torch.nn.Module, model_name: str, epoch: int | None = None) -> None:
    with atomic_path(path) as tmp:
        _save_safetensors(tmp, model, model_name, epoch)


def _weights_epoch(path: Path) -> int | None:
    saved = safetensors_metadata(path).get("epoch")
    return None if saved is None else int(saved)


def check_last_matches_state(run_dir: Path, state: dict, last: Path | None = None) -> None:
    """Refuse to resume from last weights and a state file of different epochs (a run directory
    of the layout before checkpoint.json, stopped between its two writes, or files changed by
    hand), which would silently train one epoch twice."""
    saved = _weights_epoch(last or Path(run_dir) / LAST)
    if saved is not None and saved != int(state["epoch"]):
        raise UsageError(f"{run_dir}: {LAST} holds the weights after epoch {saved} but {LAST_STATE} the state after "
                         f"epoch {state['epoch']} (the run stopped between the two writes), so resuming would train an epoch twice; start a new run "
                         f"(both weight files are intact and nothing was changed)")


def save_state(run_dir: Path, state: dict) -> None:
    with atomic_path(run_dir / LAST_STATE) as tmp:
        torch.save(state, tmp)


def load_state(run_dir: Path, path: Path | None = None) -> dict:
    """The training state of the run's last checkpoint (``path``: a staged copy of it)."""
    state = safe_torch_load(path or Path(run_dir) / LAST_STATE, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise UsageError(f"{path or Path(run_dir) / LAST_STATE} is not a mixlab training state (no epoch)")
    return state


# ----------------------------------------------------------------------------- the checkpoint manifest

def read_manifest(run_dir: str | Path) -> dict | None:
    """checkpoint.json: ``{"format": 1, "epoch": E, "files": {public name: staged name}}``, or None."""
    path = Path(run_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # written atomically, so only by hand
        raise UsageError(f"{path} is not valid JSON ({e}); it names the run's last checkpoint") from None
    if not isinstance(m, dict) or not isinstance(m.get("epoch"), int) or not isinstance(m.get("files"), dict):
        raise UsageError(f"{path} is not a mixlab checkpoint manifest")
    return m


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run has finished (and checkpointed) at least one epoch."""
    run_dir = Path(run_dir)
    return (run_dir / MANIFEST).is_file() or (run_dir / LAST_STATE).is_file()


def checkpoint_epoch(run_dir: str | Path) -> int | None:
    """The epochs done by the run's last checkpoint, None without one (reads only)."""
    m = read_manifest(run_dir)
    if m is not None:
        return int(m["epoch"])
    if (Path(run_dir) / LAST_STATE).is_file():
        return int(load_state(Path(run_dir))["epoch"])
    return None


def _checkpoint_paths(run_dir: Path, m: dict) -> dict[str, Path]:
    """Where each file of the manifest's checkpoint is now: still staged, or renamed into place."""
    out = {}
    for public, _ in _CHECKPOINT_FILES:
        staged = m["files"].get(public)
        out[public] = run_dir / staged if staged and (run_dir / staged).is_file() else run_dir / public
    return out


def recover_checkpoint(run_dir: str | Path) -> int | None:
    """Complete an interrupted checkpoint and remove what a stopped write left behind.

    Renames the staged files checkpoint.json names that are still staged over the public
    names (the commit had happened), then removes temp files (``*.tmp``) and staged files of
    a checkpoint that was never committed. Only the process holding the run's lock calls it.
    Returns the checkpoint's epoch (None without one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    m = read_manifest(run_dir)
    if m is not None:
        moved = False
        for public, staged in m["files"].items():
            if (run_dir / staged).is_file():
                os.replace(run_dir / staged, run_dir / public)
                moved = True
        if moved:
            _fsync_dir(run_dir)
    for p in run_dir.iterdir():
        if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(_STAGE)):
            p.unlink()
    return None if m is None else int(m["epoch"])


def save_checkpoint(run_dir: Path, model_name: str, model, optimizer, ema, rows: list[dict], best_val: float,
                    best_epoch: int, wall_seconds: float, best_model=None) -> None:
    """Write one finished epoch (see the module docstring): best weights (when ``best_model``
    is given), then last weights, state and metrics staged, then checkpoint.json, then the
    staged files renamed into place. A stop or a failed write anywhere leaves a run that
    resumes from this epoch or the previous one; a failed write raises
    :class:`~mixlab.errors.CheckpointWriteError` with one line naming the file."""
    epoch = rows[-1]["epoch"]
    prev = epoch - 1 if has_checkpoint(run_dir) else None
    _crash_point("start", epoch)
    if best_model is not None:
        _write_file(run_dir / BEST, lambda p: _save_safetensors(p, best_model, model_name), "best", epoch, run_dir, prev)
    state = dict(epoch=epoch, optimizer=optimizer.state_dict(), best_val=best_val, best_epoch=best_epoch,
                 wall_seconds=wall_seconds, rng_cpu=torch.get_rng_state())
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    writers = {LAST: lambda p: _save_safetensors(p, model, model_name, epoch=epoch),
               LAST_STATE: lambda p: torch.save(state, p),
               METRICS: lambda p: p.write_text(_metrics_text(rows))}
    staged = {public: f"{_STAGE}{epoch:06d}.{public}" for public, _ in _CHECKPOINT_FILES}
    manifest = json.dumps(dict(format=1, epoch=epoch, files=staged), indent=2) + "\n"
    try:
        for public, event in _CHECKPOINT_FILES:
            _write_file(run_dir / staged[public], writers[public], event, epoch, run_dir, prev, run_dir / public)
        _fsync_dir(run_dir)
        _write_file(run_dir / MANIFEST, lambda p: p.write_text(manifest), "manifest", epoch, run_dir, prev)
    except CheckpointWriteError:  # not committed: the staged files are of no use
        for name in staged.values():
            (run_dir / name).unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    # committed: from here a stop is completed by the next start (recover_checkpoint)
    with _guard(run_dir, run_dir, epoch):
        for public, event in _CHECKPOINT_FILES:
            os.replace(run_dir / staged[public], run_dir / public)
            _crash_point(f"renamed-{event}", epoch)
        _fsync_dir(run_dir)
    _crash_point("committed", epoch)


def restore_checkpoint(run_dir: Path, model, optimizer, ema=None) -> dict:
    """Load a run's last checkpoint into ``model`` / ``optimizer`` / ``ema`` (in place).

    Returns what the training loop carries on with: ``epoch`` (epochs done), ``best_val``,
    ``best_epoch``, ``wall_seconds`` and the metrics ``rows`` of those epochs. Reads only: a
    checkpoint whose commit was interrupted is read from its staged files.
    """
    from ..checkpoint import load_weights

    m = read_manifest(run_dir)
    if m is None:  # a run directory of the layout before checkpoint.json
        state = load_state(run_dir)
        check_last_matches_state(run_dir, state)
        last, rows = run_dir / LAST, read_metrics(run_dir)
    else:
        paths = _checkpoint_paths(run_dir, m)
        epoch = int(m["epoch"])
        state = load_state(run_dir, paths[LAST_STATE])
        last, rows = paths[LAST], _parse_metrics(paths[METRICS])
        if int(state["epoch"]) != epoch or len(rows) < epoch:
            raise UsageError(f"{run_dir}: {MANIFEST} names the checkpoint of epoch {epoch} but {paths[LAST_STATE].name} "
                             f"holds epoch {state['epoch']} and {paths[METRICS].name} {len(rows)} epochs (files "
                             "changed by hand?); nothing was changed")
        check_last_matches_state(run_dir, state, last)
    load_weights(model, read_state_dict(last))
    load_optimizer_state(optimizer, state["optimizer"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    epoch = int(state["epoch"])
    return dict(epoch=epoch, best_val=float(state["best_val"]), best_epoch=int(state["best_epoch"]),
                wall_seconds=float(state.get("wall_seconds", 0.0)), rows=rows[:epoch])


# files a run writes once it has finished an epoch: left over in a folder without a checkpoint
# (a start stopped during its first checkpoint), they are removed when the run starts again
_OUTPUTS = (LAST, LAST_STATE, BEST, SUMMARY, CURVES, MANIFEST)
# what a run writes only after its config.yaml (split_*.txt: `mixlab seg train`'s split): in a
# folder without config.yaml such files are the user's own, or a copy's, and are kept
_WRITTEN_AFTER_CONFIG = (*_OUTPUTS, METRICS, "split_train.txt", "split_val.txt")


def refuse_foreign_files(run_dir: Path) -> None:
    """Refuse to start a run in a folder that holds files a run writes but no config.yaml: they
    are not a mixlab run's (a user's own summary.json or best.safetensors) and would be
    overwritten. An empty metrics.jsonl is a run stopped before it wrote its config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / CONFIG).exists():
        return
    found = [n for n in _WRITTEN_AFTER_CONFIG if (run_dir / n).exists()
             and not (n == METRICS and (run_dir / n).is_file() and (run_dir / n).stat().st_size == 0)]
    if found:
        raise UsageError(f"{run_dir} holds {', '.join(found)} but no {CONFIG}, so it is not a mixlab run directory "
                         "and a training would overwrite those files: choose another --out, or move them away "
                         "(nothing was changed)")


def check_writable(run_dir: Path) -> None:
    """Refuse an output folder that cannot be written (permissions, a read-only disk) before any
    data is read, naming it."""
    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {run_dir}: {probe} is not writable (its permissions, or a read-only "
                         "disk); choose another --out")


def open_run(run_dir: Path, cfg: dict, resume: bool, model, optimizer, ema, write: bool,
             command: str = "mixlab train") -> dict:
    """Start a run directory (config, empty metrics) or restore its last checkpoint into the
    model / optimizer / EMA; returns the loop's starting point as :func:`restore_checkpoint`.
    ``resume`` of a run without a checkpoint starts it again from epoch 0 (saying so). Only the
    process with ``write`` (rank 0) writes files; it holds the run's lock."""
    start = dict(epoch=0, best_val=-1.0, best_epoch=0, wall_seconds=0.0, rows=[])
    if resume and has_checkpoint(run_dir):
        start = restore_checkpoint(run_dir, model, optimizer, ema)
        if start["epoch"] > int(cfg["epochs"]):
            raise UsageError(f"{run_dir} has already done {start['epoch']} epochs, more than the {cfg['epochs']} "
                             f"asked; a run cannot be shortened (nothing was changed): pass --epochs "
                             f"{start['epoch']} or more, or start a new run")
        if write:
            print(f"resuming {run_dir} after epoch {start['epoch']}/{cfg['epochs']}")
    elif write:
        if resume:
            print(f"{run_dir} has no checkpoint yet (it stopped before its first epoch ended): starting it again "
                  f"from epoch 0 with its {CONFIG}")
        elif has_checkpoint(run_dir):  # another run checkpointed here since the command checked
            raise UsageError(f"{run_dir} already holds a run with a checkpoint; continue it with `{command} --resume {run_dir}` "
                             "or choose another --out (nothing was overwritten)")
        if not resume:
            refuse_foreign_files(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in _OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        with _guard(run_dir / METRICS, run_dir, None):
            write_metrics(run_dir, [])
    if write:
        write_config(run_dir, cfg)  # on resume too: --epochs may have extended the run
    return start


def new_run_dir(out: str | None, model_name: str, command: str) -> Path:
    """``--out``, or runs/MODEL-YYYYMMDD-HHMMSS; refuses a folder that holds a run with a
    checkpoint or one being written; a run stopped before its first checkpoint is started again."""
    import time

    from .runlock import refuse_if_locked

    path = Path(out) if out else Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_writable(path)
    refuse_foreign_files(path)
    if (path / CONFIG).exists():
        refuse_if_locked(path)
        if has_checkpoint(path):
            raise UsageError(f"{path} already holds a run; continue it with `{command} --resume {path}` "
                             "or choose another --out (nothing was overwritten)")
        print(f"{path} holds a run that stopped before its first checkpoint: starting it again in that folder")
    return path


@contextmanager
def writing(run_dir: str | Path, say=print):
    """Hold ``run_dir`` for a training: take its lock (:mod:`mixlab.train.runlock`), then
    complete an interrupted checkpoint and remove stale temp files (rank 0 only, before the
    other ranks read anything: they wait for it in the process group's rendezvous)."""
    from .runlock import holding, writer_rank

    with holding(run_dir, say):
        if writer_rank() == 0:
            recover_checkpoint(run_dir)
        yield


def resume_config(run_dir: str | Path, task: str, model: str | None = None, epochs: int | None = None,
                  data: str | None = None) -> dict | None:
    """The configuration to resume ``run_dir`` with, checked against the command's task and
    ``--model``; ``epochs`` may extend the run (not shorten it), ``data`` move its data root.
    None when the run has already finished its epochs (the caller prints its result). A run
    without a checkpoint yet is started again from epoch 0 by the trainer."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    run_task = cfg.get("task", "classification")
    if run_task == task:  # a config.yaml edited by hand is checked as a new run's settings are
        from .config import check_config

        try:
            check_config(cfg)
        except UsageError as e:
            raise UsageError(f"{run_dir / CONFIG}: {e}") from None
    if run_task != task:
        from ..tasks import get_task

        raise UsageError(f"{run_dir} is a {run_task} run; resume it with `{get_task(run_task).command} --resume "
                         f"{run_dir}`")
    if model and model != cfg["model"]:
        raise UsageError(f"--model {model} does not match the run being resumed, which trains "
                         f"{cfg['model']} ({run_dir / CONFIG}); drop --model or start a new --out")
    done = checkpoint_epoch(run_dir) or 0
    if epochs and epochs < done:
        raise UsageError(f"--epochs {epochs} is fewer than the {done} epochs {run_dir} has already done; a run "
                         f"cannot be shortened (nothing was changed): pass --epochs {done} or more, or leave "
                         "--epochs out")
    if epochs:
        cfg["epochs"] = epochs  # extending a finished run is allowed
    summary = read_summary(run_dir) or {}
    if summary.get("finished") and summary.get("epochs_done", 0) >= cfg["epochs"]:
        return None
    if data:
        cfg["data"]["root"] = data
    return cfg


def weights_model_name(path: Path) -> str | None:
    return safetensors_metadata(path).get("model")


def weights_path(run_dir: str | Path, which: str = "best") -> Path:
    """The weights file of a run: ``best`` (falling back to last: runs without a validation
    split keep only the last weights) or ``last``; checked against the run's config."""
    run_dir = Path(run_dir)
    path = run_dir / (BEST if which == "best" else LAST)
    if which == "best" and not path.is_file():
        path = run_dir / LAST
    if not path.is_file():
        raise MissingFileError(f"{run_dir} has no weights yet ({BEST} / {LAST}); has it finished an epoch?")
    stored, model = weights_model_name(path), read_config(run_dir)["model"]
    if stored and stored != model:
        raise UsageError(f"{path} holds weights of {stored!r} but {run_dir / CONFIG} says model {model!r}")
    return path


def write_file(run_dir: Path, name: str, write, epoch: int | None = None) -> None:
    """Write one of the run's single files (e.g. curves.png) atomically: ``write(tmp_path)``."""
    with _guard(run_dir / name, run_dir, epoch):
        with atomic_path(run_dir / name, suffix=Path(name).suffix) as tmp:
            write(tmp)
