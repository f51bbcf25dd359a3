"""`mixlab compare`: train several models with one recipe and one seed, one after another.

Each model trains in ``OUT/<model>/`` as an ordinary ``mixlab train`` run directory, so
everything that reads a run (``mixlab eval``, ``mixlab report``, ``load_run_model``) reads
these too. A rerun of the same command picks up where the last one stopped:

* finished (``summary.json`` says ``finished: true`` with at least the asked epochs): skipped;
* interrupted (a checkpoint present: ``checkpoint.json``, or ``last_state.pt`` in older run
  directories): resumed from its last finished epoch, with the
  settings it was started with (as ``mixlab train --resume`` does); a finished run asked for
  more epochs is extended the same way;
* started but stopped before its first epoch ended (``config.yaml`` only): started again;
* absent: started.

``OUT/compare.json`` records the invocation and each model's state after every change.
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..io import atomic_write_json
from ..errors import UsageError, as_usage_error

__all__ = ["PlanItem", "plan_compare", "run_compare", "parse_model_list"]

MANIFEST = "compare.json"

# config keys `run_training` fills in from the data, or that may differ between a rerun and
# the first run without changing what is trained
_FILLED_AT_RUN = {"num_classes", "img_size", "data.mean", "data.std", "data.root", "progress", "epochs", "picked",
                  "data.release_order"}


@dataclass
class PlanItem:
    """What a (re)run of ``mixlab compare`` does with one model."""

    model: str
    run_dir: Path
    action: str  # start | restart | resume | extend | skip
    reason: str


def parse_model_list(text: str | list[str] | None, what: str = "--models") -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c']; empty entries and duplicates are errors."""
    if text is None:
        return []
    items = text if isinstance(text, list) else text.split(",")
    names = [n.strip() for n in items if n.strip()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"{what} names {', '.join(dup)} more than once")
    return names


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); delete it or the run directory to retrain") from None


def _state_of(run_dir: Path, epochs: int) -> tuple[str, str]:
    """(action, reason) for one run directory given the asked number of epochs."""
    from . import rundir as rd

    summary = _read_json(run_dir / rd.SUMMARY) or {}
    has_state = rd.has_checkpoint(run_dir)
    done = int(summary.get("epochs_done") or 0)
    if summary.get("finished") and done >= epochs:
        extra = f" (it ran {done} epochs, more than the {epochs} asked)" if done > epochs else ""
        return "skip", f"finished {done} epochs{extra}"
    if has_state:
        if summary.get("finished"):
            return "extend", f"finished {done} epochs, {epochs} asked: continuing from its last checkpoint"
        return "resume", f"interrupted after epoch {done}/{summary.get('epochs', '?')}"
    if (run_dir / rd.CONFIG).is_file():
        return "restart", "stopped before its first epoch ended (no checkpoint): starting again"
    return "start", "new"


def plan_compare(models: list[str], out: str | Path, epochs: int | dict[str, int]) -> list[PlanItem]:
    """What a run would do for each model (``epochs``: one number, or one per model)."""
    out = Path(out)
    items = []
    for m in models:
        e = epochs[m] if isinstance(epochs, dict) else epochs
        run_dir = out / m
        action, reason = _state_of(run_dir, int(e))
        items.append(PlanItem(m, run_dir, action, reason))
    return items


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "model_kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(stored: dict, fresh: dict) -> list[str]:
    """Settings that differ between a run's stored config and a freshly resolved one."""
    a, b = _flatten(stored), _flatten(fresh)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in _FILLED_AT_RUN or b.get(key) is None and key in a:
            continue  # filled in by the trainer, or not set this time
        if key == "data.val_holdout" and b.get(key) == "first_or_random" and a.get(key) in ("first", "random"):
            continue  # the stored config says which of the two the run resolved it to
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def run_compare(models: list[str], out: str | Path, recipe: str | None = None, *, epochs: int | None = None,
                data: str | None = None, config_file: str | None = None, overrides: list[str] | None = None,
                only: list[str] | None = None, keep_going: bool = False, dry_run: bool = False,
                say: Callable[[str], None] = print, **explicit) -> list[dict]:
    """Train ``models`` one after another in ``out/<model>/`` (see the module docstring).

    ``explicit`` holds further settings for ``resolve_config`` (``dataset``, ``batch_size``,
    ``seed``, ``device``, ``precision``...; None = not given). Returns one dict per model
    run this time: ``model``, ``run_dir``, ``action``, ``status`` (skipped | finished |
    failed | planned), ``summary`` (the run's summary.json or None) and ``error``.
    """
    from .. import model_info
    from . import rundir as rd

    models = parse_model_list(models)
    if not models:
        raise UsageError("--models needs at least one model name (see `mixlab models`)")
    for m in models:
        model_info(m)  # unknown names fail here, with suggestions, before anything trains
    selected = models
    if only:
        only = parse_model_list(only, "--only")
        missing = [m for m in only if m not in models]
        if missing:
            raise UsageError(f"--only names {', '.join(missing)}, which --models does not list "
                             f"({', '.join(models)})")
        selected = [m for m in models if m in only]

    from .config import resolve_config
    overrides = list(overrides or [])
    try:
        configs = {m: resolve_config(model=m, recipe=recipe, config_file=config_file, overrides=overrides,
                                     epochs=epochs, data=data, **explicit) for m in selected}
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise as_usage_error(e) from None  # resolving a configuration only refuses input
    out = Path(out)
    plan = plan_compare(selected, out, {m: int(c["epochs"]) for m, c in configs.items()})

    # every run dir must hold this model's run, if anything
    for item in plan:
        if item.action != "start":
            stored = rd.read_config(item.run_dir)
            if stored.get("model") != item.model:
                raise UsageError(f"{item.run_dir} holds a run of {stored.get('model')!r}, not {item.model!r}; "
                                 "move it away or choose another --out")

    # every model to start must accept the shared settings (model_kwargs, drop_path_rate): found
    # out now, on the meta device, rather than after the models before it have trained for hours
    for item in plan:
        if item.action in ("start", "restart"):
            _check_builds(item.model, configs[item.model])

    manifest_path = out / MANIFEST
    manifest = _read_json(manifest_path) or {}
    manifest.update(command=dict(models=models, only=only or None, recipe=recipe, epochs=epochs, data=data,
                                 config=config_file, overrides=overrides,
                                 **{k: v for k, v in explicit.items() if v is not None}))
    manifest.setdefault("runs", {})
    say(f"compare: {len(selected)} model(s) in {out}" + (f", recipe {recipe}" if recipe else ""))
    for item in plan:
        say(f"  {item.model:<28} {item.action:<8} {item.reason}")
    if dry_run:
        return [dict(model=i.model, run_dir=str(i.run_dir), action=i.action, status="planned", summary=None,
                     error=None) for i in plan]

    results = []
    for n, item in enumerate(plan, 1):
        cfg = configs[item.model]
        result = dict(model=item.model, run_dir=str(item.run_dir), action=item.action, summary=None, error=None)
        if item.action == "skip":
            result.update(status="skipped", summary=_read_json(item.run_dir / rd.SUMMARY))
            results.append(result)
            continue
        from .. import train as training

        run_training = training.run_training  # looked up per model: tests swap it
        say(f"[{n}/{len(plan)}] {item.model}: {item.action} ({item.reason})")
        resume = item.action in ("resume", "extend")
        if resume:
            stored = rd.read_config(item.run_dir)
            diffs = config_differences(stored, cfg)
            if diffs:
                say(f"  note: {item.run_dir} was started with other settings; it continues with its own "
                    f"({'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''})")
            run_cfg = copy.deepcopy(stored)
            run_cfg["epochs"] = int(cfg["epochs"])
            if data is not None:
                run_cfg.setdefault("data", {})["root"] = data  # the data may have moved
        else:
            run_cfg = copy.deepcopy(cfg)
        _record(manifest, manifest_path, item.model, status="running", action=item.action)
        t0 = time.perf_counter()
        try:
            summary = run_training(run_cfg, item.run_dir, resume=resume)
        except KeyboardInterrupt:
            _record(manifest, manifest_path, item.model, status="interrupted")
            raise
        except Exception as e:  # noqa: BLE001 - one model's failure must not hide the others' results
            _record(manifest, manifest_path, item.model, status="failed", error=f"{type(e).__name__}: {e}")
            if not keep_going:
                raise
            say(f"  {item.model} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                "  (continuing: --keep-going)")
            result.update(status="failed", error=f"{type(e).__name__}: {e}")
            results.append(result)
            continue
        summary = summary or _read_json(item.run_dir / rd.SUMMARY)
        _record(manifest, manifest_path, item.model, status="finished",
                seconds_this_time=round(time.perf_counter() - t0, 1))
        result.update(status="finished", summary=summary)
        results.append(result)
    return results


def _check_builds(model: str, cfg: dict) -> None:
    import torch

    from .. import model_info
    from ..tasks import get_task

    try:
        with torch.device("meta"):
            get_task(cfg.get("task", "classification")).build_model(
                {**cfg, "num_classes": cfg.get("num_classes") or model_info(model).num_classes,
                 "img_size": cfg.get("img_size") or 32})
    except TypeError as e:
        hint = ""
        if "drop_path_rate" in str(e):
            hint = (f" ({model} has no stochastic depth: compare it in a separate --out with "
                    "--set drop_path_rate=null, or drop drop_path_rate for all models)")
        raise UsageError(f"{model} cannot be built with these settings: {e}{hint}") from None


def _record(manifest: dict, path: Path, model: str, **fields) -> None:
    entry = manifest["runs"].setdefault(model, {})
    entry.update(fields)
    if fields.get("status") != "failed":
        entry.pop("error", None)
    atomic_write_json(path, manifest)
