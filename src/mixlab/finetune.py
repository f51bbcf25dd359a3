"""Start a model from trained weights: another number of classes, another image size, a frozen backbone.

:func:`init_from` is what ``create_model(name, checkpoint_path=..., num_classes=K)`` and the
training loop's ``init`` setting call. It loads every tensor of the source whose name and
shape match the model, and then, as timm does when it loads pretrained weights into a model
built with other options:

* the classifier (``model.get_classifier()``) is left as the model built it, freshly
  initialised, when the source's has another shape (another number of classes);
* position embeddings are resampled to the model's patch grid (timm's
  ``resample_abs_pos_embed``), Swin's relative position bias tables to its window
  (``resize_rel_pos_bias_table``), and a patch embedding's kernel to its patch size
  (``resample_patch_embed``), when the image size, window or patch size differs;
* the buffers timm recomputes from the window (``relative_position_index``, ``attn_mask``)
  are never taken from a file.

Anything else that does not match (a tensor missing from the source, one the model lacks, a
backbone tensor of another shape that no resampling applies to) means the source is a
checkpoint of another architecture or variant: it is refused with the key differences.

The source may be a weights file (``.safetensors``, or a torch file read with
``weights_only=True``: user files are never unpickled), an official checkpoint (converted to
mixlab's layout where a family registered a converter: :func:`mixlab.load_official`), or a
``mixlab train`` run directory (its ``best.safetensors``, else ``last.safetensors``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import MissingFileError, UsageError

__all__ = ["InitReport", "init_from", "resolve_source", "train_classifier_only", "classifier_keys"]

# buffers timm derives from the window size and skips when loading (swin_transformer.checkpoint_filter_fn)
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass
class InitReport:
    """What :func:`init_from` did: names of the model's state_dict entries by outcome."""

    source: str
    loaded: list[str] = field(default_factory=list)
    # (key, shape in the source, shape in the model, how)
    resized: list[tuple[str, tuple, tuple, str]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # left as the model initialised them
    skipped: list[str] = field(default_factory=list)  # source tensors not used (another head, derived buffers)
    frozen: list[str] = field(default_factory=list)  # parameters with requires_grad False
    trainable: list[str] = field(default_factory=list)
    note: str = ""

    def lines(self) -> list[str]:
        """A short human summary (what ``say`` receives)."""
        out = [f"init from {self.source}: loaded {len(self.loaded)} tensors"
               + (f", resized {len(self.resized)}" if self.resized else "")
               + (f", {len(self.new)} left new" if self.new else "")]
        if self.note:
            out.append(f"  {self.note}")
        for key, old, new, how in self.resized[:4]:
            out.append(f"  resized {key}: {tuple(old)} -> {tuple(new)} ({how})")
        if len(self.resized) > 4:
            out.append(f"  ... and {len(self.resized) - 4} more resized the same way")
        if self.new:
            out.append(f"  new (freshly initialised): {', '.join(self.new)}")
        if self.frozen:
            out.append(f"  frozen backbone: {len(self.frozen)} parameter tensors fixed, trainable: "
                       f"{', '.join(self.trainable) or 'none'}")
        return out

    def as_dict(self) -> dict:
        return dict(source=self.source, loaded=list(self.loaded),
                    resized=[dict(key=k, source_shape=list(o), model_shape=list(n), how=h)
                             for k, o, n, h in self.resized],
                    new=list(self.new), skipped=list(self.skipped), frozen=len(self.frozen),
                    trainable=list(self.trainable), note=self.note)


def resolve_source(source: str | os.PathLike) -> tuple[Path, str]:
    """(weights file, note) for a weights file or a ``mixlab train`` run directory."""
    from .train import rundir as rd

    path = Path(source)
    if path.is_dir():
        if not (path / rd.CONFIG).is_file():
            raise MissingFileError(f"{path} is a folder but not a mixlab run directory (no {rd.CONFIG}); pass a "
                                    "weights file (.safetensors or a torch state_dict) or a `mixlab train` --out folder")
        cfg = rd.read_config(path)
        for name in (rd.BEST, rd.LAST):
            if (path / name).is_file():
                return path / name, f"run {path} ({cfg.get('model')}, {name})"
        raise MissingFileError(f"{path} has no weights yet ({rd.BEST} / {rd.LAST}): has its training finished "
                                "an epoch?")
    if not path.is_file():
        raise MissingFileError(f"--init: {path} is neither a weights file nor a run directory")
    return path, ""


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def classifier_keys(model: nn.Module) -> set[str]:
    """state_dict names of the classifier (timm's ``get_classifier()``; else the pretrained
    config's ``classifier`` name)."""
    prefixes = []
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        name = _module_name(model, head)
        if name is not None:
            prefixes.append(name)
    if not prefixes:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = cfg.get("classifier")
        prefixes.extend([names] if isinstance(names, str) else list(names or []))
    keys = set()
    for k in model.state_dict():
        if any(k == p or k.startswith(p + ".") for p in prefixes if p):
            keys.add(k)
    return keys


def _grid_of(model: nn.Module, key: str) -> tuple[int, int] | None:
    """The patch grid the position embedding ``key`` belongs to (timm's ``patch_embed.grid_size``)."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    pe = getattr(owner, "patch_embed", None) or getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    return tuple(int(g) for g in grid) if grid is not None else None


def _resize(model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """``value`` resampled to ``target``'s shape as timm does, or None where nothing applies."""
    with warnings.catch_warnings():  # timm's interpolation warns about torch internals, not about the result
        warnings.simplefilter("ignore", UserWarning)
        return _resample(model, key, value, target)


def _resample(model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor):
    from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table

    leaf = key.rsplit(".", 1)[-1]
    if leaf == "pos_embed" and value.ndim == 3 and target.ndim == 3 and value.shape[-1] == target.shape[-1]:
        grid = _grid_of(model, key)
        if grid is None:
            return None
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
        if target.shape[1] != prefix + grid[0] * grid[1]:
            return None
        side = (value.shape[1] - prefix) ** 0.5
        if side != int(side):
            return None
        out = resample_abs_pos_embed(value.float(), new_size=list(grid), old_size=[int(side)] * 2,
                                     num_prefix_tokens=prefix).to(target.dtype)
        return out, f"resample_abs_pos_embed, {int(side)}x{int(side)} -> {grid[0]}x{grid[1]} patches"
    if leaf == "relative_position_bias_table" and value.ndim == 2 and value.shape[-1] == target.shape[-1]:
        owner = model.get_submodule(key.rsplit(".", 1)[0])
        window = getattr(owner, "window_size", None)
        if window is None:
            return None
        window = (window, window) if isinstance(window, int) else tuple(window)
        out = resize_rel_pos_bias_table(value.float(), new_window_size=window,
                                        new_bias_shape=tuple(target.shape)).to(target.dtype)
        return out, f"resize_rel_pos_bias_table to window {window[0]}x{window[1]}"
    if key.endswith("patch_embed.proj.weight") and value.ndim == 4 and value.shape[:2] == target.shape[:2]:
        out = resample_patch_embed(value.float(), new_size=list(target.shape[-2:])).to(target.dtype)
        return out, f"resample_patch_embed to a {target.shape[-2]}x{target.shape[-1]} patch"
    return None


def _source_state_dict(path: Path, model: nn.Module, official: bool) -> dict[str, torch.Tensor]:
    from .io import read_state_dict

    sd = read_state_dict(path)
    return sd  # mixlab keeps the official key names: an official file loads as it is


def init_from(model: nn.Module, source, *, freeze_backbone: bool = False, new_classifier: bool = False,
              official: bool = False, say: Callable[[str], None] | None = print) -> InitReport:
    """Initialise ``model`` (in place) from ``source``: a weights file, a run directory, or a
    state_dict. See the module docstring for what is loaded, resized and left new; raises
    ``ValueError`` naming the key differences when the source is another architecture.

    ``freeze_backbone``: every parameter but the classifier's gets ``requires_grad=False``
    (see :func:`train_classifier_only`). ``new_classifier``: leave the classifier new even where
    the source's has the same shape (another data set with as many classes: its head would map
    the new classes onto the old ones). ``say``: receives the report's lines (None: silent).
    """
    from .checkpoint import key_diff_lines
    from .io import normalize_state_dict

    if isinstance(source, dict):
        sd = normalize_state_dict(source)
        report = InitReport(source="a state_dict")
    else:
        path, note = resolve_source(source)
        sd = _source_state_dict(path, model, official)
        report = InitReport(source=str(path), note=note)
    own = model.state_dict()
    head = classifier_keys(model)
    to_load: dict[str, torch.Tensor] = {}
    missing, shape_bad = [], []
    for key, target in own.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in _DERIVED_BUFFERS:  # the model's own, computed from its window
            continue
        if key not in sd:
            (report.new if key in head else missing).append(key)
            continue
        value = sd[key]
        if key in head and new_classifier:  # asked for: the classes are others
            report.new.append(key)
            report.skipped.append(key)
            continue
        if value.shape == target.shape:
            to_load[key] = value
            report.loaded.append(key)
            continue
        if key in head:  # another number of classes: keep the model's fresh classifier
            report.new.append(key)
            report.skipped.append(key)
            continue
        resized = _resize(model, key, value, target)
        if resized is None:
            shape_bad.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        to_load[key] = resized[0]
        report.resized.append((key, tuple(value.shape), tuple(target.shape), resized[1]))
    unexpected = []
    for key in sd:
        if key in own:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf in _DERIVED_BUFFERS or _is_head_like(key, head):
            report.skipped.append(key)  # timm drops these too; a head of a headless model
        else:
            unexpected.append(key)
    if missing or unexpected or shape_bad:
        lines = [f"{report.source} is not a checkpoint of this model ({type(model).__name__}): "
                 f"{len(to_load)} tensors match, but"]
        lines += key_diff_lines(missing, unexpected, shape_bad)
        if missing or unexpected:
            lines.append("  (a checkpoint of another architecture or variant? the classifier may differ, "
                         "the rest must match)")
        else:
            lines.append("  (the same layers with other sizes: another variant, or options such as the image size "
                         "that these tensors depend on and that no resampling applies to)")
        raise UsageError("\n".join(lines))
    model.load_state_dict(to_load, strict=False)
    if freeze_backbone:
        report.frozen, report.trainable = train_classifier_only(model)
    if say is not None:
        for line in report.lines():
            say(line)
    return report


def source_classes(source) -> list[str] | None:
    """The class names a source run directory was trained on (its summary.json), or None for
    a weights file or a run that did not record them."""
    from .train import rundir as rd

    path = Path(source)
    if not path.is_dir():
        return None
    return (rd.read_summary(path) or {}).get("classes")


def _is_head_like(key: str, head: set[str]) -> bool:
    """A source key under the same module as the model's classifier (e.g. the file has a
    ``head.fc`` where a model with ``num_classes=0`` has an Identity)."""
    prefixes = {k.rsplit(".", 1)[0] for k in head}
    return any(key.startswith(p + ".") for p in prefixes)


class _EvalNorm:
    """Forward pre-hook: the module runs in eval mode whatever ``model.train()`` set."""

    def __call__(self, module: nn.Module, args) -> None:
        module.training = False


def _freeze(model: nn.Module, head: set[str]) -> tuple[list[str], list[str]]:
    frozen, trainable = [], []
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
            trainable.append(name)
        else:
            p.requires_grad_(False)
            frozen.append(name)
    # Normalisation layers with running statistics would still move them in train mode: they
    # run on the stored statistics instead. timm's freeze() swaps in FrozenBatchNorm2d, which
    # drops num_batches_tracked from the state_dict, so the run's checkpoints would no longer
    # load into a freshly built model; a hook keeps the layout.
    heads = {k.rsplit(".", 1)[0] for k in head}
    for name, m in model.named_modules():
        if name in heads:
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            if not getattr(m, "_mixlab_frozen", False):
                m.register_forward_pre_hook(_EvalNorm())
                m._mixlab_frozen = True
    return frozen, trainable


def train_classifier_only(model: nn.Module) -> tuple[list[str], list[str]]:
    """Fix every parameter but the classifier's (``requires_grad=False``; normalisation layers
    keep their running statistics). Returns (frozen, trainable) parameter names."""
    head = classifier_keys(model)
    if not head:
        raise UsageError(f"{type(model).__name__} has no classifier that get_classifier() names: nothing would "
                         "be left to train with freeze_backbone")
    return _freeze(model, head)
