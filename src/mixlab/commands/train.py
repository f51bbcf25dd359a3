"""`mixlab train`: train a classifier and write a run directory."""
from __future__ import annotations

from pathlib import Path


def configure(p):
    p.add_argument("--model", help="registered model name (see `mixlab models`)")
    p.add_argument("--data", help="data root (default: $MIXLAB_DATA, then ~/.cache/mixlab/data)")
    p.add_argument("--dataset", help="cifar10 (default), cifar100, or folder (any train/<class>/, test/<class>/ tree)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--out", help="run directory to write (must not hold another run; "
                   "default: runs/MODEL-YYYYMMDD-HHMMSS)")
    p.add_argument("--recipe", help="a shipped recipe (see `mixlab recipes`)")
    p.add_argument("--config", help="a YAML file of settings (same keys as the recipes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optimizer.lr=0.01 --set augment.hflip=0")
    p.add_argument("--model-kwargs", default="", metavar="K=V,...", help="architecture arguments")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--download", action="store_true", help="download CIFAR if it is not found (needs a network)")


def run(args) -> int:
    from ..train import rundir as rd
    from ..train.config import resolve_config
    from ..train.trainer import run_training
    from .info import parse_kv

    if args.resume:
        run_dir = Path(args.resume)
        cfg = rd.read_config(run_dir)
        if cfg.get("task") == "segmentation":
            raise ValueError(f"{run_dir} is a segmentation run; resume it with `mixlab seg train --resume {run_dir}`")
        if args.model and args.model != cfg["model"]:
            raise ValueError(f"--model {args.model} does not match the run being resumed, which trains "
                             f"{cfg['model']} ({run_dir / rd.CONFIG}); drop --model or start a new --out")
        if not (run_dir / rd.LAST_STATE).is_file():
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet ({rd.LAST_STATE}); start it again without --resume")
        if args.epochs:
            cfg["epochs"] = args.epochs  # extending a finished run is allowed
        summary = rd.read_summary(run_dir) or {}
        if summary.get("finished") and summary.get("epochs_done", 0) >= cfg["epochs"]:
            print(f"{run_dir} already finished {cfg['epochs']} epochs: test accuracy {summary.get('test_acc'):.2f}%")
            return 0
        if args.data:
            cfg["data"]["root"] = args.data
        run_training(cfg, run_dir, resume=True)
        return 0
    overrides = list(args.set)
    cfg = resolve_config(model=args.model, recipe=args.recipe, config_file=args.config, overrides=overrides,
                         data=args.data, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                         seed=args.seed, device=args.device, precision=args.precision, compile=args.compile,
                         model_kwargs=parse_kv(args.model_kwargs) or None)
    if args.out:
        out = Path(args.out)
    else:
        import time

        out = Path("runs") / f"{cfg['model']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / rd.CONFIG).exists():
        raise ValueError(f"{out} already holds a run; continue it with `mixlab train --resume {out}` "
                         "or choose another --out (nothing was overwritten)")
    if args.download:
        cfg["data"]["download"] = True
    run_training(cfg, out)
    return 0
