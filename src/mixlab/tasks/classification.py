"""Image classification (`mixlab train`): CIFAR-10/100 or an image folder, top-1 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .base import RunContext, Task
from ..train.config import DEFAULTS


class ClassificationTask(Task):
    name, command = "classification", "mixlab train"
    best_key, best_summary_key = "val_acc", "best_val_acc"
    curves, curves_label = (("train_acc", "train"), ("val_acc", "val")), "accuracy (%)"
    check_every = 20

    defaults = DEFAULTS

    # --- data and model
    def setup(self, cfg: dict, ctx: RunContext, resume_dir=None) -> None:
        from ..data.augment import AugmentConfig, BatchAugment
        from ..data.classification import load_classification_data
        from ..data.constants import CIFAR_MEAN, CIFAR_STD
        from ..data.loader import DeviceLoader

        self.ctx = ctx
        data = load_classification_data(cfg, verbose=ctx.dist.is_main, same_order=True)
        cfg["data"]["release_order"] = data.release_order
        # the run's config says which holdout was used ("first_or_random" becomes one of the two)
        if cfg["data"].get("val_holdout") == "first_or_random":
            cfg["data"]["val_holdout"] = data.val_holdout
        cfg["num_classes"] = cfg["num_classes"] or data.num_classes
        if cfg["num_classes"] != data.num_classes:
            raise UsageError(f"num_classes is {cfg['num_classes']} but the data set has {data.num_classes} classes")
        cfg["img_size"] = cfg["img_size"] or int(data.image_size[0])
        cifar = data.name.startswith("cifar")
        cfg["data"]["mean"] = list(cfg["data"]["mean"] or (CIFAR_MEAN if cifar else (0.5, 0.5, 0.5)))
        cfg["data"]["std"] = list(cfg["data"]["std"] or (CIFAR_STD if cifar else (0.25, 0.25, 0.25)))
        self.data, self.num_classes = data, int(cfg["num_classes"])
        self.has_val = data.val is not None and len(data.val) > 0
        mean, std, device = cfg["data"]["mean"], cfg["data"]["std"], ctx.device
        aug_cfg = AugmentConfig.from_dict(cfg["augment"])
        smoothing = float(cfg["loss"]["label_smoothing"])

        def train_prepare(seed: int):
            augment = BatchAugment(aug_cfg, mean, std, self.num_classes, smoothing, seed=seed, device=device)

            def prepare(x, y):
                xa, ya = augment(x, y, train=True, memory_format=ctx.memory_format)
                return xa, (ya, y[: xa.shape[0]])  # MixUp drops an odd last image
            return prepare

        self.train_loader = DeviceLoader(data.train.images.to(device), data.train.labels.to(device),
                                         batch_size=int(cfg["batch_size"]), shuffle=True,
                                         drop_last=bool(cfg["drop_last"]), seed=int(cfg["seed"]),
                                         rank=ctx.dist.rank, world_size=ctx.dist.world_size, prepare=train_prepare,
                                         shuffle_buffer=cfg.get("shuffle_buffer"), stored_order=data.release_order)
        if cfg.get("shuffle_buffer") and ctx.dist.is_main:
            ctx.say(f"data: shuffled through a {cfg['shuffle_buffer']}-image buffer over "
                    + ("the release's stored order" if data.release_order else
                       "one fixed seeded order (an image-folder tree is listed by class)"))
        self.eval_batch_size, self.mean, self.std = int(cfg["eval_batch_size"]), mean, std
        if cfg["loss"]["label_smoothing"] and not cfg["augment"].get("mixup_alpha") \
                and not cfg["augment"].get("cutmix_alpha"):
            self.loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()  # MixUp targets are soft (and carry the smoothing)
        self.picker_loss = nn.CrossEntropyLoss()

    def build_model(self, cfg: dict, for_eval: bool = False) -> nn.Module:
        from ..registry import create_model, takes_img_size

        kwargs = dict(cfg.get("model_kwargs") or {})
        if cfg.get("drop_path_rate") is not None and not for_eval:
            kwargs["drop_path_rate"] = cfg["drop_path_rate"]
        size = cfg.get("img_size") if takes_img_size(cfg["model"]) else None
        return create_model(cfg["model"], num_classes=int(cfg["num_classes"]), img_size=size, **kwargs)

    def new_classifier_for(self, source) -> bool:
        from ..finetune import source_classes

        return source_classes(source) != list(self.data.classes)

    def describe_data(self) -> str:
        return self.data.name

    def input_shape(self, cfg: dict) -> tuple:
        return (3, int(cfg["img_size"]), int(cfg["img_size"]))

    def model_line(self, cfg: dict, params: int, macs: int) -> str:
        return f"model: {cfg['model']} ({params:,} params, {macs / 1e6:.1f}M MACs at {cfg['img_size']}px)"

    def timing_batch(self, batch_size: int):
        x = self.train_loader.tensors[0]
        bs = min(batch_size, len(x))
        return torch.randn(bs, x.shape[1], *x.shape[2:]), torch.randint(0, self.num_classes, (bs,))

    # --- training
    def forward_loss(self, net: nn.Module, x, target):
        logits = net(x)
        return self.loss_fn(logits.float(), target[0]), logits

    def train_meter(self):
        return _TrainMeter(self.ctx)

    def evaluate_split(self, model: nn.Module, split) -> dict:
        return evaluate_classifier(model, split.images, split.labels, self.num_classes, self.mean, self.std,
                                   self.eval_batch_size, self.ctx)

    def validate(self, model: nn.Module) -> dict:
        if not self.has_val:
            return dict(val_loss=None, val_acc=None)
        v = self.evaluate_split(model, self.data.val)
        return dict(val_loss=v["loss"], val_acc=v["acc"])

    def epoch_line(self, row: dict) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%"
                + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%" if row["val_acc"] is not None else ""))

    def pending_summary(self) -> dict:
        return dict(test_acc=None)

    def run_summary(self, cfg: dict) -> dict:
        from ..train.config import evaluation_protocol

        # the evaluation protocol, so that no table shows an accuracy selected on the test
        # set without saying so (protocol, selected_on_test)
        # the class names, in the order of the classifier's outputs (predict, --init)
        return dict(evaluation_protocol(cfg), classes=list(self.data.classes))

    def finish(self, model: nn.Module, which: str, best_val: float, best_epoch: int, run_dir) -> dict:
        test = self.evaluate_split(model, self.data.test)
        self.ctx.say(f"test accuracy ({which}): {test['acc']:.2f}%  [{run_dir}]")
        return dict(test_acc=test["acc"], test_loss=test["loss"], tested=which)


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, mean, std,
                        batch_size: int, ctx: RunContext) -> dict:
    """Loss, accuracy and the confusion matrix of ``model`` over uint8 ``images`` (sharded
    across ranks), normalised with the run's ``mean`` / ``std``."""
    from ..data.augment import Normalize
    from ..data.loader import DeviceLoader
    from ..train.loop import evaluate

    normalize, device = Normalize(mean, std, ctx.device), ctx.device
    loader = DeviceLoader(images, labels, batch_size=batch_size, rank=ctx.dist.rank, world_size=ctx.dist.world_size,
                          prepare=lambda seed: (lambda x, y: (normalize(x.to(device), ctx.memory_format), y.to(device))))
    return evaluate(model, loader, _EvalMeter(ctx, num_classes), ctx)


class _TrainMeter:
    """Loss and accuracy of an epoch's training batches (hard labels, also under MixUp),
    summed on the device and read every ``check_every`` steps."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
        self.seen = 0

    def update(self, loss, logits, target) -> None:
        n = logits.shape[0]
        self.loss_sum += loss.double() * n
        self.correct += (logits.argmax(1) == target[1]).sum()
        self.seen += n

    def running_loss(self) -> float:
        return float(self.loss_sum) / self.seen

    def postfix(self) -> dict:
        return dict(acc=f"{100 * float(self.correct) / self.seen:.1f}")

    def compute(self) -> tuple[dict, float]:
        d = self.ctx
        totals = torch.stack([self.loss_sum, self.correct.double(),
                              torch.tensor(float(self.seen), device=d.device, dtype=torch.float64)])
        d.dist.all_reduce_(totals)
        return dict(train_loss=float(totals[0] / totals[2]), train_acc=100.0 * float(totals[1] / totals[2])), \
            float(totals[2])


class _EvalMeter:
    def __init__(self, ctx: RunContext, num_classes: int):
        self.ctx, self.k = ctx, num_classes
        self.loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)

    def update(self, logits, y) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, y, reduction="sum").double()
        self.confusion += torch.bincount(y * self.k + logits.argmax(1), minlength=self.k**2).view(self.k, self.k)

    def compute(self) -> dict:
        self.ctx.dist.all_reduce_(self.loss)
        self.ctx.dist.all_reduce_(self.confusion)
        n = int(self.confusion.sum())
        return dict(loss=float(self.loss) / max(n, 1), acc=100.0 * float(self.confusion.diag().sum()) / max(n, 1),
                    n=n, confusion=self.confusion.cpu())
