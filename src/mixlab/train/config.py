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
from ..errors import MissingFileError, UsageError


def run_settings(log_every: int, omit: tuple = (), **changes) -> dict:
    """The settings every task's config ends with, in the order config.yaml lists them: model
    regularisation, device and CPU settings, which weights are kept, start weights, logging.

    ``log_every``: the task's default step-logging interval; ``changes``: the task's own default
    for some of these keys; ``omit``: keys the task lists elsewhere in its config."""
    settings = {
        "drop_path_rate": None,
        "clip_grad": None,
        "ema": {"enabled": False, "decay": 0.9998},
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "precision": "auto",  # auto (bf16 where supported) | fp32 | bf16 | fp16
        "channels_last": "auto",  # auto (measured on the CPU, else on for convolutional models) | true | false
        # mixlab's depthwise convolution with a fast CPU backward (mixlab.ops.depthwise): auto
        # (measured on the CPU) | true | false; CUDA keeps cuDNN's
        "fast_depthwise": "auto",
        # mixlab's GELU kernels on the CPU (mixlab.ops.gelu: GELU + BatchNorm pairs fused, other
        # GELUs alone): auto (on the CPU; each op times itself against aten per shape and keeps the
        # faster) | true | false
        "fast_gelu": "auto",
        # mixlab's LayerNorm kernel on the CPU (mixlab.ops.layernorm: nn.LayerNorm and timm's
        # LayerNorm2d): auto (on the CPU; it times itself against aten per shape) | true | false
        "fast_layernorm": "auto",
        # 1x1 convolutions whose weight gradient is a matrix product where that is faster on the
        # CPU (mixlab.ops.pointwise): auto (on the CPU; timed against aten per shape) | true | false
        "fast_pointwise": "auto",
        # one-group KxK convolutions by the fastest of aten's, a gathered weight gradient and
        # Winograd's F(4x4, 3x3) on the CPU (mixlab.ops.dense_conv): auto (on the CPU; timed per
        # shape) | true | false
        "fast_dense_conv": "auto",
        # BatchNorm + max-pool + ReLU, BatchNorm + upsample + ReLU + skip, and upsample + ReLU + 1x1
        # conv as one op each on the CPU where a model names them (mixlab.ops.resample; UNeXt):
        # auto (on the CPU; timed per shape) | true | false
        "fast_resample": "auto",
        # each BatchNorm2d directly followed by a ReLU (in an nn.Sequential) as one op on the CPU
        # (mixlab.ops.bn_relu; ConvMLP's tokenizer and stage, VGG-BN): auto (on the CPU; timed per
        # shape) | true | false
        "fast_bn_relu": "auto",
        # measure the CPU settings left on auto (precision, channels_last, fast_depthwise) with a
        # few training steps of each combination; false: bf16 where supported, channels_last for
        # convolutional models, the fast depthwise op
        "autotune": True,
        "picked": None,  # written by the trainer: what was picked and how (resumed runs reuse it)
        # torch.compile: auto (on the CPU, tried for runs estimated over 10 minutes and kept when it
        # saves twice its compile time) | true | false
        "compile": "auto",
        "num_threads": None,
        # which weights the final evaluation uses: best_val (the epoch with the best value of the
        # task's selection metric on the validation split) | last
        "select": "best_val",
        # start from trained weights (a weights file or a run directory; mixlab.finetune): every
        # tensor whose name and shape match is loaded, a classifier of another size is new
        "init": None,
        "freeze_backbone": False,  # train only the classifier (with init)
        # loggers beside metrics.jsonl and train.log: csv (steps.csv) and/or tensorboard; the step
        # loss and lr are written every every_n_steps optimizer steps (mixlab.train.loggers)
        "log": {"loggers": [], "every_n_steps": log_every},
        # refuse a batch whose training step would not fit in the memory free (estimated from the
        # model's activations before anything is allocated); false: run it anyway
        "memory_check": True,
        "progress": True,
        "description": "",
        "recipe": None,
    }
    unknown = set(changes) - set(settings)
    if unknown:
        raise KeyError(f"run_settings: no setting {sorted(unknown)}")
    settings.update(changes)
    return {k: v for k, v in settings.items() if k not in omit}


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
    # null: a new full permutation each epoch; N: tf.data's shuffle with a buffer of N images
    # over one fixed order of the training set (what a Keras recipe's dataset.shuffle(N) does)
    "shuffle_buffer": None,
    "data": {"dataset": "cifar10", "root": None, "val_split": 0.1, "val_seed": 0, "val_holdout": "random",
             "resize": None, "on_bad_image": "error", "mean": None, "std": None,
             "download": False,
             # recorded by the run: whether the training data kept the release's stored order (the
             # python release) or came from an image-folder tree; a resume on the other kind is refused
             "release_order": None},
    # fused: torch's one-kernel form of adamw / adam / sgd (the same update: equal results in
    # torch 2.14 for Adam and AdamW, SGD within an ulp), 3x faster than its default per-parameter loop
    # on the CPU (Conv2Former-N: 4.6 against 14.1 ms a step); auto: on where every parameter is a CPU
    # tensor; true: always; false: torch's default
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": False,
                  "betas": [0.9, 0.999], "eps": 1e-8, "fused": "auto"},
    # min_lr: the learning rate the cosine schedule ends at (absolute, like torch's eta_min);
    # per_epoch: hold the rate for a whole epoch (torch schedulers stepped once per epoch, as
    # the UNeXt code does) instead of updating it every step
    "schedule": {"name": "constant", "warmup_epochs": 0.0, "min_lr": 0.0, "per_epoch": False},
    "loss": {"label_smoothing": 0.0},
    "augment": {k: (list(v) if isinstance(v, tuple) else v) for k, v in AugmentConfig().__dict__.items()},
    **run_settings(log_every=50),
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
    # test_split: a fraction of all cases (or test_split_file: their names) set aside before the
    # train/val split, never used for training or selecting the weights: its figures hold on
    # unseen images (val_split is then a fraction of the rest); mask_threshold / mask_values:
    # which mask pixels are foreground when the files are not 0/255 or 0/1 masks (value >
    # threshold, or one of the values); never guessed
    "data": {"root": None, "val_split": 0.2, "split_seed": 41, "train_split_file": None, "val_split_file": None,
             "test_split": 0.0, "test_split_file": None,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "mask_threshold": None,
             "mask_values": None},
    "optimizer": copy.deepcopy(DEFAULTS["optimizer"]),
    "schedule": copy.deepcopy(DEFAULTS["schedule"]),
    "loss": {"name": "bce_dice"},
    "augment": {"hflip": 0.5, "vflip": 0.5, "rot90": True, "crop_scale": None, "crop_p": 1.0,
                "brightness": 0.0, "contrast": 0.0},
    "threshold": 0.5,
    "drop_last": True,  # the official loader drops the last incomplete batch
    # select: best_val (highest validation IoU, as the paper's code keeps) | last
    **run_settings(log_every=10),
}


def _task(name: str):
    """The task object of a task name (its defaults, command, model kind and own checks)."""
    from ..tasks import get_task

    return get_task(name)


def _command(task: str) -> str:
    from ..tasks import TASKS

    return _task(task).command if task in TASKS else task


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
        raise UsageError(f"unknown recipe {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" Shipped recipes: {', '.join(names)} (`mixlab recipes`), or pass --config FILE.yaml")
    return yaml.safe_load(f.read_text()) or {}


def _check_keys(d: dict, schema: dict, where: str) -> None:
    for key, value in d.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=2)
            raise UsageError(f"unknown config key '{where}{key}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; known keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(schema)}")
        if isinstance(schema[key], dict) and key != "model_kwargs":
            if not isinstance(value, dict):
                raise UsageError(f"config key {where}{key} must be a mapping, got {value!r}")
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
    """['optimizer.lr=0.01', 'augment.hflip=0'] -> nested dict (values parsed as YAML scalars).

    An empty value (``lr=``), a key that is not a dotted name, or a value YAML cannot read is
    refused naming the item; ``null`` sets a value to none."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set takes KEY=VALUE (e.g. optimizer.lr=0.01), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(p.isidentifier() for p in parts):
            raise UsageError(f"--set {item!r}: {key!r} is not a setting name; write KEY=VALUE with a dotted key, "
                             "e.g. optimizer.lr=0.01")
        if not value.strip():
            raise UsageError(f"--set {item!r} gives no value: write {key}=VALUE (null to set none)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UsageError(f"--set {item!r}: the value {value!r} cannot be read ({problem}); write lists as "
                             "[a, b], text with special characters in quotes") from None
        if isinstance(parsed, dict):
            _check_names(parsed, f"--set {item!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r} conflicts with another --set that gives {p} a value")
        node[parts[-1]] = parsed
    return out


def _check_task(settings: dict, task: str, where: str) -> None:
    other = settings.get("task", "classification")
    if other != task:
        raise UsageError(f"{where} is a {other} recipe; run it with `{_command(other)}`, not `{_command(task)}`")


def resolve_config(model: str | None = None, recipe: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | None = None, task: str = "classification", **explicit) -> dict:
    """The full training configuration. ``explicit`` holds CLI flags given (None = not given);
    ``data`` / ``dataset`` map to ``data.root`` / ``data.dataset``. ``task`` picks the defaults
    (the task's own: ``mixlab.tasks``)."""
    cfg = copy.deepcopy(_task(task).defaults)
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
        settings = read_settings_file(path)
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
        raise UsageError(f"task cannot be changed to {cfg['task']!r} here; use `{_command(cfg['task'])}`")
    check_config(cfg)
    from .. import model_info

    model_kind = _task(task).model_task  # None: any model (a detector's backbone, checked by the task)
    model_task = model_info(cfg["model"]).task
    if model_kind is not None and model_task != model_kind:
        raise UsageError(f"{cfg['model']} is a {model_task} model; train it with `{_command(model_task)}` "
                         f"(`mixlab models --task {model_kind}` lists the {model_kind} models)")
    return cfg


def check_config(cfg: dict) -> None:
    """Check a whole configuration (a resolved one, or a run's config.yaml, maybe edited by hand)
    and normalise its values in place (16.0 -> 16); errors name the key."""
    task = _task(cfg.get("task", "classification"))
    if task.config_kind is not None:  # the settings every task of that kind shares (mixlab.train.validation)
        checked = dict(cfg, task=task.config_kind)
        validate(checked)
        cfg.update({k: v for k, v in checked.items() if k != "task"})
    log = cfg.setdefault("log", {"loggers": [], "every_n_steps": 50})  # run folders written before logging
    from .loggers import parse_loggers

    log["loggers"] = parse_loggers(log.get("loggers"))
    if not isinstance(log.get("every_n_steps"), int) or log["every_n_steps"] < 1:
        raise UsageError(f"log.every_n_steps must be a whole number of steps, 1 or more, got "
                         f"{log.get('every_n_steps')!r}")
    if cfg.get("freeze_backbone") and not cfg.get("init"):
        raise UsageError("freeze_backbone trains only the classifier of weights given with --init FILE|RUN_DIR; "
                         "without --init the backbone would stay at its random initialisation")
    task.validate_config(cfg)


def seg_augment(a: dict):
    """The JointAugment a segmentation config's ``augment`` describes (checked: clear errors)."""
    from ..seg.data import JointAugment

    crop = a.get("crop_scale")
    if crop is not None and not (isinstance(crop, (list, tuple)) and len(crop) == 2
                                 and all(isinstance(v, (int, float)) for v in crop)):
        raise UsageError(f"augment.crop_scale must be [min, max] (e.g. [0.5, 1.0]) or null, got {crop!r}")
    try:
        return JointAugment(hflip=float(a["hflip"]), vflip=float(a["vflip"]), rot90=bool(a["rot90"]),
                            crop_scale=tuple(crop) if crop else None, crop_p=float(a["crop_p"]),
                            brightness=float(a["brightness"]), contrast=float(a["contrast"]))
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad segmentation augmentation settings {a}: {e}") from None


def validate(cfg: dict) -> None:
    """Check every value of a resolved configuration for type and range (normalising whole
    floats to ints and numbers written as text to floats), then the settings that depend on
    each other, then build the model on the meta device when its arguments were given: all
    before any data is read or a real model built. Raises :class:`~mixlab.errors.UsageError`
    naming the key, the value and what is allowed."""
    from .validation import check_config, check_model_builds

    if not cfg.get("model"):
        raise UsageError("no model given: pass --model NAME (see `mixlab models`) or set `model:` in the recipe/config")
    check_config(cfg)
    if cfg["schedule"].get("per_epoch") and float(cfg["schedule"].get("warmup_epochs") or 0) > 0:
        raise UsageError("schedule.per_epoch holds each epoch's rate from its start, so a warmup would give the "
                         "first epoch a rate of 0: use per_epoch with warmup_epochs 0, or per-step warmup")
    if float(cfg["schedule"].get("warmup_epochs") or 0) > int(cfg["epochs"]):
        raise UsageError(f"schedule.warmup_epochs ({cfg['schedule']['warmup_epochs']}) is longer than the run "
                         f"(epochs {cfg['epochs']}): the rate would never reach optimizer.lr")
    if float(cfg["schedule"].get("min_lr") or 0) > float(cfg["optimizer"]["lr"]):
        raise UsageError(f"schedule.min_lr ({cfg['schedule']['min_lr']}) is above optimizer.lr "
                         f"({cfg['optimizer']['lr']}); min_lr is the rate the schedule ends at")
    if cfg["optimizer"].get("fused") is True and cfg["optimizer"]["name"] == "adamw_tfa":
        raise UsageError("optimizer.fused=true: adamw_tfa (TensorFlow Addons' AdamW) has no fused form in torch; "
                         "use optimizer.fused=auto or false")
    if cfg["optimizer"]["name"] == "adamw_tfa" and float(cfg["optimizer"]["weight_decay"]) >= 1:
        raise UsageError(f"optimizer.weight_decay of adamw_tfa is the fraction removed per step: it must be in "
                         f"[0, 1), got {cfg['optimizer']['weight_decay']}")
    if cfg.get("precision") == "fp16" and cfg.get("device") in ("cpu",):
        raise UsageError("precision fp16 needs a CUDA device; use bf16 (or fp32) on the CPU")
    if cfg.get("task", "classification") == "segmentation":
        data = cfg["data"]
        if data.get("mask_threshold") is not None and data.get("mask_values") is not None:
            raise UsageError(f"data.mask_threshold ({data['mask_threshold']}) and data.mask_values "
                             f"({data['mask_values']}) both say which mask pixels are foreground: set one of them")
        seg_augment(cfg["augment"])  # raises on values JointAugment refuses, naming them
    else:
        AugmentConfig.from_dict(cfg["augment"])  # raises on bad augmentation keys/values
    if cfg.get("model_kwargs") or cfg.get("drop_path_rate") is not None or cfg.get("img_size") is not None:
        check_model_builds(cfg)


def read_settings_file(path: str | Path, what: str = "config file") -> dict:
    """A YAML file of settings as a mapping; a missing, unreadable or malformed file, or one that
    is not a mapping of names (a list, a bare value, a key such as ``: bad``), is refused with
    the file named and, for a syntax error, the line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        settings = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not a text file (expected YAML settings, e.g. `epochs: 10`)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UsageError(f"{what} {path} must hold a mapping of settings (`key: value` lines, e.g. `epochs: 10`), "
                         f"but it holds a {type(settings).__name__}")
    _check_names(settings, f"{what} {path}")
    return settings


def _check_names(settings: dict, where: str, prefix: str = "") -> None:
    """Every key of a settings mapping (and of its sub-mappings) is a name."""
    for key, value in settings.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"{where}: {prefix}{key!r} is not a setting name (a line such as `: value` "
                             "or `1: value`?); write `name: value`")
        if isinstance(value, dict) and key not in ("picked",):
            _check_names(value, where, f"{prefix}{key}.")


def evaluation_protocol(cfg: dict) -> dict:
    """How a classification run's accuracies come about, as ``summary.json`` and every table
    of runs state it: ``protocol`` (one line) and ``selected_on_test`` (the reported weights
    were chosen by their accuracy on the test set, so its test accuracy is not held out)."""
    if cfg.get("task", "classification") != "classification":
        return {}
    out = _protocol(cfg)
    # which split chose the reported weights, in one word, as the segmentation summary says it
    best = cfg.get("select", "best_val") == "best_val"
    data = cfg.get("data") or {}
    out["selected_on"] = (("test" if data.get("val_holdout") == "test" else "val")
                          if best and (data.get("val_split") or data.get("val_holdout") == "test")
                          else "none (last weights)")
    return out


def _protocol(cfg: dict) -> dict:
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
        how = {"first": "the first", "random": "a seeded",
               "first_or_random": "the first (for an image-folder tree a seeded)"}.get(data.get("val_holdout"), "a")
        return dict(protocol=f"{how} {float(data['val_split']):.0%} of train held out as val; "
                             f"{'best-val' if best else 'last'} weights tested once on the test set",
                    selected_on_test=False)
    return dict(protocol="all of train is trained on; the last weights are tested once on the test set",
                selected_on_test=False)


