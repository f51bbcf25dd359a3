"""Export a model to ONNX or to a ``torch.export`` program (.pt2), and check the result.

Both go through torch's own exporters: ``torch.export.export`` for ``pt2`` (saved with
``torch.export.save``) and ``torch.onnx.export(..., dynamo=True)`` for ``onnx``. The batch
dimension is exported as dynamic. After writing, the file is checked before it takes its
name: the saved program (``torch.export.load``) or onnxruntime runs a sample batch of another
size than the one traced, and its output must equal the model's within
``|exported - model| <= atol + rtol * |model|`` (fp32 on the CPU: atol 1e-4, rtol 1e-3 by
default; the differences measured for mixlab's models are ~1e-6). A failed export or check
leaves any file already at the destination as it was.

A model that cannot be exported fails with :class:`ExportError`, whose message names the op
(or the line of model code) the exporter stopped at.

The files carry the preprocessing a run used: ``mixlab.json`` in the pt2 archive's extra
files and the ONNX model's ``metadata_props`` (key ``mixlab``) hold the model name, input
size, mean, std and class names.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from .errors import UsageError

__all__ = ["ExportError", "ExportResult", "export_model", "model_for_export", "FORMATS", "ATOL", "RTOL"]

FORMATS = ("onnx", "pt2")
ATOL, RTOL = 1e-4, 1e-3


class ExportError(ValueError):
    """The model could not be exported, or the exported file does not reproduce it."""


@dataclass
class ExportResult:
    path: str
    format: str
    model: str
    input_shape: list[int]  # the traced sample's shape; the batch dimension is dynamic
    check_batch: int
    max_abs_diff: float
    atol: float
    rtol: float
    seconds: float
    metadata: dict
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# (pattern, phrase) of the exporter errors that name the op or the line they failed at, most precise first
_CULPRITS = (
    (r"No ONNX function found for <OpOverload\(op='([^']+)'", lambda m: f"the op {m[1]} has no ONNX translation"),
    (r"call_function\[target=torch\.ops\.([\w.]+)\]", lambda m: f"at the op {m[1]}"),
    (r"Unsupported FX nodes: (\{.*?\})", lambda m: f"unsupported ops {m[1]}"),
    (r"The following call raised this error:\s*\n\s*File \"([^\"]+)\", line (\d+), in (\w+)\s*\n\s*(.+)",
     lambda m: f"at {Path(m[1]).name}:{m[2]} in {m[3]}: `{m[4].strip()}`"),
    (r"(aten\.\w+(?:\.\w+)?)", lambda m: f"at the op {m[1]}"),
)


def _culprit(err: BaseException) -> str:
    """The op (or model line) an exporter error names, as one phrase."""
    text = _ANSI.sub("", f"{err}")
    for pattern, phrase in _CULPRITS:
        m = re.search(pattern, text)
        if m:
            return phrase(m)
    return ""


def _first_line(err: BaseException) -> str:
    for line in _ANSI.sub("", str(err)).splitlines():
        line = line.strip()
        if line and not line.startswith("Failed to convert"):
            return f"{type(err).__name__}: {line[:300]}"
    return type(err).__name__


def _fail(name: str, fmt: str, stage: str, err: BaseException) -> ExportError:
    culprit = _culprit(err)
    return ExportError(f"cannot export {name} to {fmt} ({stage}){': ' + culprit if culprit else ''}. "
                       f"{_first_line(err)}" + (" Try --format pt2, which keeps every torch op." if fmt == "onnx" else ""))


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=65536)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about internals; a failure is reported by us."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _trace(model: nn.Module, sample: torch.Tensor, name: str, fmt: str):
    """torch.export's program with a dynamic batch dimension."""
    try:
        with _quiet():
            return torch.export.export(model, (sample,), dynamic_shapes=({0: _batch_dim()},))
    except Exception as e:  # torch raises many kinds (Unsupported, UserError, GuardOnDataDependentSymNode...)
        raise _fail(name, fmt, "torch.export", e) from None


def _compare(name: str, fmt: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> float:
    if got.shape != want.shape:
        raise ExportError(f"the exported {fmt} program of {name} gives an output of shape {tuple(got.shape)}, "
                          f"the model {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    if bool(bad.any()):
        raise ExportError(f"the exported {fmt} program of {name} does not reproduce the model: max |difference| "
                          f"{float(diff.max()):.3g} over {int(bad.sum())} of {bad.numel()} outputs exceeds "
                          f"atol {atol} + rtol {rtol} x |output| (nothing was written)")
    return float(diff.max())


def export_model(model: nn.Module, out: str | Path, fmt: str, input_size: tuple[int, int, int], *,
                 name: str | None = None, metadata: dict | None = None, batch: int = 2, check_batch: int = 3,
                 atol: float = ATOL, rtol: float = RTOL, seed: int = 0,
                 say: Callable[[str], None] | None = print) -> ExportResult:
    """Export ``model`` (eval mode, CPU, fp32) to ``out`` as ``fmt`` (onnx | pt2) and check it.

    ``input_size``: (C, H, W) of one input. The trace uses a random batch of ``batch``
    images, the check another of ``check_batch`` (so the dynamic batch dimension is checked
    too). Raises :class:`ExportError` naming the op when the model cannot be exported, or
    with the difference when the export does not reproduce it.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's dynamo ONNX exporter is built on it)
        except ImportError:
            raise ExportError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'mixlab[export]' "
                              "(or use --format pt2)") from None
    name = name or type(model).__name__
    out = Path(out)
    model = model.eval().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, *input_size, generator=gen)
    check = torch.randn(check_batch, *input_size, generator=gen)
    with torch.no_grad():
        want = model(check)
    meta = dict(dict(model=name), **(metadata or {}), input_size=list(input_size))
    t0 = time.perf_counter()
    exported = _trace(model, sample, name, fmt)
    with _staged(out) as tmp:
        if fmt == "pt2":
            torch.export.save(exported, str(tmp), extra_files={"mixlab.json": json.dumps(meta)})
            try:
                with _quiet(), torch.no_grad():
                    got = torch.export.load(str(tmp)).module()(check)
            except Exception as e:
                raise _fail(name, fmt, "running the saved program", e) from None
        else:
            try:
                with _quiet():
                    program = torch.onnx.export(exported, (sample,), dynamo=True)
                    program.model.metadata_props["mixlab"] = json.dumps(meta)
                    program.save(str(tmp), external_data=False)
            except Exception as e:
                raise _fail(name, fmt, "torch.onnx", e) from None
            got = torch.from_numpy(_run_onnx(tmp, check, name))
        diff = _compare(name, fmt, got, want, atol, rtol)
    note = ""
    if float((want - want[:1]).abs().max()) == 0.0:
        note = ("the model gives the same output for every input (a freshly built model with a zero-initialised "
                "classifier, as timm's MLP-Mixer/ResMLP have): the check shows the program runs, not that its "
                "features equal the model's; export trained weights (--checkpoint) for a check that does")
    result = ExportResult(path=str(out), format=fmt, model=name, input_shape=[batch, *input_size],
                          check_batch=check_batch, max_abs_diff=diff, atol=atol, rtol=rtol,
                          seconds=time.perf_counter() - t0, metadata=meta, note=note)
    if say is not None:
        say(f"exported {name} to {out} ({fmt}, batch dimension dynamic, input {'x'.join(map(str, input_size))}); "
            f"checked on a batch of {check_batch}: max |difference| {diff:.2e} "
            f"(tolerance {atol} + {rtol} x |output|)" + (f"\nnote: {note}" if note else ""))
    return result


@contextlib.contextmanager
def _staged(out: Path):
    """A path for the export in a temporary folder beside ``out`` with ``out``'s own name (the
    exporters and loaders check the suffix), renamed over ``out`` once the block succeeds: a
    failed export or check leaves ``out`` as it was."""
    import os
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)


def _run_onnx(path: Path, x: torch.Tensor, name: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install 'mixlab[export]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run the ONNX export of {name}: {_first_line(e)} "
                          "(nothing was written); try --format pt2") from None


def model_for_export(checkpoint: str | Path | None = None, model_name: str | None = None, weights: str = "best",
                     img_size: int | None = None, num_classes: int | None = None) -> tuple[nn.Module, tuple, dict]:
    """(model in eval mode, (C, H, W), metadata) from a run directory or a registered name."""
    if (checkpoint is None) == (model_name is None):
        raise UsageError("give one of --checkpoint RUN_DIR or --model NAME")
    if model_name is not None:
        from . import create_model, model_info

        info = model_info(model_name)
        model = create_model(model_name, num_classes=num_classes, img_size=img_size)
        size = img_size or info.input_size[-1]
        return model.eval(), (info.input_size[0], size, size), dict(model=model_name,
                                                                    weights="freshly initialised (no checkpoint)")
    if img_size:
        raise UsageError("--img-size applies to --model; a run is exported at the size it was trained at")
    from .train import rundir as rd

    cfg = rd.read_config(checkpoint)
    if cfg.get("task") == "segmentation":
        from .evaluate import load_seg_run
        from .tasks.segmentation import image_hw

        model, cfg = load_seg_run(checkpoint, weights)
        h, w = image_hw(cfg.get("img_size")) or (256, 256)
        classes = None
    else:
        from .predict import run_classes
        from .tasks import load_run_model

        model, cfg = load_run_model(checkpoint, weights)
        h = w = int(cfg["img_size"])
        classes = run_classes(checkpoint, cfg, say=None)[0]
    meta = dict(model=cfg["model"], run=str(checkpoint), weights=weights, task=cfg.get("task", "classification"),
                mean=cfg["data"].get("mean"), std=cfg["data"].get("std"), classes=classes)
    return model, (3, h, w), meta
