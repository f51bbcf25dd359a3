"""Training configuration: defaults, recipes (YAML shipped in ``mixlab/recipes``), overrides.

Resolution order, later wins: DEFAULTS < recipe < --config FILE < explicit CLI flags < --set.
Every key is checked against DEFAULTS, so a misspelt key is an error that names it, not a
silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path

import yaml

from ..data.augment import AugmentConfig

DEFAULTS: dict = {
    "model": None,
    "model_kwargs": {},
    "num_classes": None,  # from the data set
    "img_size": None,  # from the data set
    "seed": 0,
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 500,
    "data": {"dataset": "cifar10", "root": None, "val_split": 0.1, "val_seed": 0, "val_holdout": "random",
             "resize": None, "on_bad_image": "error", "mean": None, "std": None,
             "download": False},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
                  "betas": [0.9, 0.999], "eps": 1e-8},
    "schedule": {"name": "constant", "warmup_epochs": 0.0, "min_lr": 0.0},
    "loss": {"label_smoothing": 0.0},
    "augment": {k: (list(v) if isinstance(v, tuple) else v) for k, v in AugmentConfig().__dict__.items()},
    "drop_path_rate": None,
    "clip_grad": None,
    "ema": {"enabled": False, "decay": 0.9998},
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "precision": "auto",  # auto (bf16 where supported) | fp32 | bf16 | fp16
    "channels_last": "auto",  # auto (on for convolutional models) | true | false
    "compile": False,
    "num_threads": None,
    "select": "best_val",  # which weights test accuracy is reported for: best_val | last
    "progress": True,
    "description": "",
    "recipe": None,
}

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


def _recipe_dir():
    return resources.files("mixlab") / "recipes"


def list_recipes() -> dict[str, str]:
    """{name: description} of the shipped recipes."""
    out = {}
    for f in sorted(_recipe_dir().iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            out[f.name[:-5]] = (yaml.safe_load(f.read_text()) or {}).get("description", "")
    return out


def load_recipe(name: str) -> dict:
    f = _recipe_dir() / f"{name}.yaml"
    if not f.is_file():
        names = list(list_recipes())
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        raise ValueError(f"unknown recipe {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" Shipped recipes: {', '.join(names)} (`mixlab recipes`), or pass --config FILE.yaml")
    return yaml.safe_load(f.read_text()) or {}


def _check_keys(d: dict, schema: dict, where: str) -> None:
    for key, value in d.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=2)
            raise ValueError(f"unknown config key {where}{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; known keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(schema)}")
        if isinstance(schema[key], dict) and key != "model_kwargs":
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key} must be a mapping, got {value!r}")
            _check_keys(value, schema[key], f"{where}{key}.")


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base`` after checking its keys against DEFAULTS."""
    _check_keys(update, DEFAULTS if not where else base, where)
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model_kwargs":
            out[k] = {**out[k], **copy.deepcopy(v)}
        elif k == "model_kwargs":
            out[k] = {**out.get(k, {}), **copy.deepcopy(v or {})}
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(items: list[str]) -> dict:
    """['optimizer.lr=0.01', 'augment.hflip=0'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE (e.g. optimizer.lr=0.01), got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def resolve_config(model: str | None = None, recipe: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | None = None, **explicit) -> dict:
    """The full training configuration. ``explicit`` holds CLI flags given (None = not given);
    ``data`` / ``dataset`` map to ``data.root`` / ``data.dataset``."""
    cfg = copy.deepcopy(DEFAULTS)
    if recipe:
        r = load_recipe(recipe)
        cfg = merge(cfg, r)
        cfg["recipe"] = recipe
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        cfg = merge(cfg, yaml.safe_load(path.read_text()) or {})
    flags: dict = {}
    data_root, dataset = explicit.pop("data", None), explicit.pop("dataset", None)
    if data_root is not None or dataset is not None:
        flags["data"] = {k: v for k, v in (("root", data_root), ("dataset", dataset)) if v is not None}
    if model is not None:
        flags["model"] = model
    flags.update({k: v for k, v in explicit.items() if v is not None})
    cfg = merge(cfg, flags)
    cfg = merge(cfg, parse_set(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    if not cfg.get("model"):
        raise ValueError("no model given: pass --model NAME (see `mixlab models`) or set `model:` in the recipe/config")
    if cfg["optimizer"]["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']['name']!r}")
    if cfg["schedule"]["name"] not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg['schedule']['name']!r}")
    if cfg["select"] not in ("best_val", "last"):
        raise ValueError(f"select must be 'best_val' or 'last', got {cfg['select']!r}")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    AugmentConfig.from_dict(cfg["augment"])  # raises on bad augmentation keys/values


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
