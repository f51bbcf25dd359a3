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
    "task": "classification",
    "model": None,
    "model_kwargs": {},
    "num_classes": None,  # from the data set
    "img_size": None,  # from the data set
    "seed": 0,
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 500,
    "drop_last": False,  # true: leave out each epoch's last incomplete batch (a DataLoader's drop_last)
    "data": {"dataset": "cifar10", "root": None, "val_split": 0.1, "val_seed": 0, "val_holdout": "random",
             "resize": None, "on_bad_image": "error", "mean": None, "std": None,
             "download": False},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
                  "betas": [0.9, 0.999], "eps": 1e-8},
    # min_lr: the learning rate the cosine schedule ends at (absolute, like torch's eta_min);
    # per_epoch: hold the rate for a whole epoch (torch schedulers stepped once per epoch, as
    # the UNeXt code does) instead of updating it every step
    "schedule": {"name": "constant", "warmup_epochs": 0.0, "min_lr": 0.0, "per_epoch": False},
    "loss": {"label_smoothing": 0.0},
    "augment": {k: (list(v) if isinstance(v, tuple) else v) for k, v in AugmentConfig().__dict__.items()},
    "drop_path_rate": None,
    "clip_grad": None,
    "ema": {"enabled": False, "decay": 0.9998},
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "precision": "auto",  # auto (bf16 where supported) | fp32 | bf16 | fp16
    "channels_last": "auto",  # auto (measured on the CPU, else on for convolutional models) | true | false
    # mixlab's depthwise convolution with a fast CPU backward (mixlab.ops.depthwise): auto
    # (measured on the CPU) | true | false; CUDA keeps cuDNN's
    "fast_depthwise": "auto",
    # measure the CPU settings left on auto (precision, channels_last, fast_depthwise) with a
    # few training steps of each combination; false: bf16 where supported, channels_last for
    # convolutional models, the fast depthwise op
    "autotune": True,
    "picked": None,  # written by the trainer: what was picked and how (resumed runs reuse it)
    # torch.compile: auto (on the CPU, tried for runs estimated over 10 minutes and kept when it
    # saves twice its compile time) | true | false
    "compile": "auto",
    "num_threads": None,
    "select": "best_val",  # which weights test accuracy is reported for: best_val | last
    "progress": True,
    "description": "",
    "recipe": None,
}

# `mixlab seg train`: the same machinery (optimizer, schedule, precision, run directory) with
# segmentation data, joint image/mask augmentation, a segmentation loss and IoU/Dice.
SEG_DEFAULTS: dict = {
    "task": "segmentation",
    "model": None,
    "model_kwargs": {},
    "num_classes": None,  # from the masks (one channel per masks/<k> folder)
    "img_size": 256,  # images and masks are resized to this on reading; null keeps the files' size
    "seed": 41,
    "epochs": 400,
    "batch_size": 8,
    "eval_batch_size": None,  # default: batch_size (the paper's validation loader uses the training batch size)
    "data": {"root": None, "val_split": 0.2, "split_seed": 41, "train_split_file": None, "val_split_file": None,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "optimizer": copy.deepcopy(DEFAULTS["optimizer"]),
    "schedule": copy.deepcopy(DEFAULTS["schedule"]),
    "loss": {"name": "bce_dice"},
    "augment": {"hflip": 0.5, "vflip": 0.5, "rot90": True, "crop_scale": None, "crop_p": 1.0,
                "brightness": 0.0, "contrast": 0.0},
    "threshold": 0.5,
    "drop_last": True,  # the official loader drops the last incomplete batch
    "drop_path_rate": None,
    "clip_grad": None,
    "ema": {"enabled": False, "decay": 0.9998},
    "device": "auto",
    "precision": "auto",
    "channels_last": "auto",
    "fast_depthwise": "auto",
    "autotune": True,
    "picked": None,
    "compile": "auto",
    "num_threads": None,
    "select": "best_val",  # best_val (highest validation IoU, as the paper's code keeps) | last
    "progress": True,
    "description": "",
    "recipe": None,
}
from ..tasks.detection import DET_DEFAULTS  # noqa: E402  (`mixlab det train`: its defaults live with its task)

TASK_DEFAULTS = {"classification": DEFAULTS, "segmentation": SEG_DEFAULTS, "detection": DET_DEFAULTS}
_TASK_COMMAND = {"classification": "mixlab train", "segmentation": "mixlab seg train", "detection": "mixlab det train"}


# adamw: torch's AdamW (decay lr * weight_decay per step); adamw_tfa: TensorFlow Addons' AdamW
# (decay weight_decay per step, whatever the lr; see mixlab.train.optim)
OPTIMIZERS = ("adamw", "adamw_tfa", "adam", "sgd")
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
    """Deep-merge ``update`` into a copy of ``base`` (a full configuration) after checking its
    keys against ``base``'s."""
    _check_keys(update, base, where)
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


def _check_task(settings: dict, task: str, where: str) -> None:
    other = settings.get("task", "classification")
    if other != task:
        raise ValueError(f"{where} is a {other} recipe; run it with `{_TASK_COMMAND.get(other, other)}`, "
                         f"not `{_TASK_COMMAND[task]}`")


def resolve_config(model: str | None = None, recipe: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | None = None, task: str = "classification", **explicit) -> dict:
    """The full training configuration. ``explicit`` holds CLI flags given (None = not given);
    ``data`` / ``dataset`` map to ``data.root`` / ``data.dataset``. ``task`` picks the defaults
    (``classification``: :data:`DEFAULTS`, ``segmentation``: :data:`SEG_DEFAULTS`)."""
    cfg = copy.deepcopy(TASK_DEFAULTS[task])
    if recipe:
        r = load_recipe(recipe)
        _check_task(r, task, f"recipe {recipe!r}")
        if model is not None and r.get("model") not in (None, model):
            # a recipe's model_kwargs are arguments of its own model (seed-convmixer-keras' Keras
            # BatchNorm settings are ConvMixer's): another model trained with it does not get them
            r = {k: v for k, v in r.items() if k != "model_kwargs"}
        cfg = merge(cfg, r)
        cfg["recipe"] = recipe
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        settings = yaml.safe_load(path.read_text()) or {}
        _check_task(settings, task, f"config file {path}")
        cfg = merge(cfg, settings)
    flags: dict = {}
    data_root, dataset = explicit.pop("data", None), explicit.pop("dataset", None)
    if data_root is not None or dataset is not None:
        flags["data"] = {k: v for k, v in (("root", data_root), ("dataset", dataset)) if v is not None}
    if model is not None:
        flags["model"] = model
    flags.update({k: v for k, v in explicit.items() if v is not None})
    cfg = merge(cfg, flags)
    cfg = merge(cfg, parse_set(overrides or []))
    if cfg["task"] != task:
        raise ValueError(f"task cannot be changed to {cfg['task']!r} here; use `{_TASK_COMMAND.get(cfg['task'], 'mixlab')}`")
    validate(cfg)
    if task == "detection":  # the model is a backbone: any mixlab or timm classifier (validate checked it)
        return cfg
    from .. import model_info

    model_task = model_info(cfg["model"]).task
    if model_task != task:
        raise ValueError(f"{cfg['model']} is a {model_task} model; train it with `{_TASK_COMMAND[model_task]}` "
                         f"(`mixlab models --task {task}` lists the {task} models)")
    return cfg


def seg_augment(a: dict):
    """The JointAugment a segmentation config's ``augment`` describes (checked: clear errors)."""
    from ..seg.data import JointAugment

    crop = a.get("crop_scale")
    if crop is not None and not (isinstance(crop, (list, tuple)) and len(crop) == 2
                                 and all(isinstance(v, (int, float)) for v in crop)):
        raise ValueError(f"augment.crop_scale must be [min, max] (e.g. [0.5, 1.0]) or null, got {crop!r}")
    try:
        return JointAugment(hflip=float(a["hflip"]), vflip=float(a["vflip"]), rot90=bool(a["rot90"]),
                            crop_scale=tuple(crop) if crop else None, crop_p=float(a["crop_p"]),
                            brightness=float(a["brightness"]), contrast=float(a["contrast"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad segmentation augmentation settings {a}: {e}") from None


def validate(cfg: dict) -> None:
    if not cfg.get("model"):
        raise ValueError("no model given: pass --model NAME (see `mixlab models`) or set `model:` in the recipe/config")
    if cfg["optimizer"]["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']['name']!r}")
    if cfg["schedule"]["name"] not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {cfg['schedule']['name']!r}")
    if cfg.get("task", "classification") == "classification" and \
            cfg["data"].get("val_holdout") not in ("random", "first", "test"):
        raise ValueError(f"data.val_holdout must be 'random' or 'first' (which part of train to hold out) or 'test' "
                         f"(validate on the test set), got {cfg['data'].get('val_holdout')!r}")
    for key in ("channels_last", "fast_depthwise"):
        if cfg.get(key, "auto") != "auto" and not isinstance(cfg.get(key), bool):
            raise ValueError(f"{key} must be auto, true or false, got {cfg[key]!r}")
    if cfg.get("compile", "auto") != "auto" and not isinstance(cfg.get("compile"), bool):
        raise ValueError(f"compile must be auto, true or false, got {cfg['compile']!r}")
    if not isinstance(cfg.get("autotune", True), bool):
        raise ValueError(f"autotune must be true or false, got {cfg['autotune']!r}")
    if cfg["select"] not in ("best_val", "last"):
        raise ValueError(f"select must be 'best_val' or 'last', got {cfg['select']!r}")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    if cfg["schedule"].get("per_epoch") and float(cfg["schedule"].get("warmup_epochs") or 0) > 0:
        raise ValueError("schedule.per_epoch holds each epoch's rate from its start, so a warmup would give the "
                         "first epoch a rate of 0: use per_epoch with warmup_epochs 0, or per-step warmup")
    if float(cfg["schedule"].get("min_lr") or 0) > float(cfg["optimizer"]["lr"]):
        raise ValueError(f"schedule.min_lr ({cfg['schedule']['min_lr']}) is above optimizer.lr "
                         f"({cfg['optimizer']['lr']}); min_lr is the rate the schedule ends at")
    if cfg.get("task") == "detection":
        from ..tasks.detection import check_config

        return check_config(cfg)
    if cfg.get("task", "classification") == "segmentation":
        from ..seg.losses import build_loss

        if not isinstance(cfg["loss"]["name"], str):
            raise ValueError(f"loss.name must be a name (bce_dice, dice, bce, focal), got {cfg['loss']['name']!r}")
        build_loss(cfg["loss"]["name"])  # raises on an unknown loss, naming the choices
        if not isinstance(cfg["threshold"], (int, float)) or not 0.0 < float(cfg["threshold"]) < 1.0:
            raise ValueError(f"threshold must be a number between 0 and 1, got {cfg['threshold']!r}")
        seg_augment(cfg["augment"])  # raises on bad augmentation values, naming them
        return
    AugmentConfig.from_dict(cfg["augment"])  # raises on bad augmentation keys/values


def evaluation_protocol(cfg: dict) -> dict:
    """How a classification run's accuracies come about, as ``summary.json`` and every table
    of runs state it: ``protocol`` (one line) and ``selected_on_test`` (the reported weights
    were chosen by their accuracy on the test set, so its test accuracy is not held out)."""
    if cfg.get("task", "classification") != "classification":
        return {}
    data = cfg.get("data") or {}
    best = cfg.get("select", "best_val") == "best_val"
    if data.get("val_holdout") == "test":
        if best:
            return dict(protocol="val = the test set: all of train is trained on and the weights with the best "
                                 "test accuracy are kept, so the test accuracy is selected on the test set, "
                                 "not held out", selected_on_test=True)
        return dict(protocol="val = the test set (monitored each epoch); all of train is trained on and the last "
                             "weights are tested", selected_on_test=False)
    if data.get("val_split"):
        how = {"first": "the first", "random": "a seeded"}.get(data.get("val_holdout"), "a")
        return dict(protocol=f"{how} {float(data['val_split']):.0%} of train held out as val; "
                             f"{'best-val' if best else 'last'} weights tested once on the test set",
                    selected_on_test=False)
    return dict(protocol="all of train is trained on; the last weights are tested once on the test set",
                selected_on_test=False)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
