"""`mixlab bench MODEL`: images/s of training or inference steps, optionally vs a timm model."""
from __future__ import annotations

import json

from .info import parse_kv
from ..errors import UsageError


def configure(p):
    p.add_argument("model", help="a registered model name")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="N or H W (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--fast-depthwise", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with the fast depthwise convolution (mixlab.ops.depthwise; "
                        "default on, as `mixlab train` measures it; the --vs model always keeps aten's)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-kwargs", default="", metavar="K=V,...", help="architecture arguments")
    p.add_argument("--vs", metavar="timm:NAME",
                   help="also time a timm model, alternating windows: timm:ENTRYPOINT (e.g. timm:resnet18) "
                        "or timm:MODULE.CLASS (e.g. timm:convmixer.ConvMixer) built with --vs-kwargs")
    p.add_argument("--vs-kwargs", default="", metavar="K=V,...", help="arguments for the --vs model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--windows", type=int, default=5, help="timed windows (at least 5)")
    p.add_argument("--window-seconds", type=float, default=2.0, help="target length of one window")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs per step")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the step's memory estimate is above the memory free")


def build_timm_model(spec: str, kwargs: dict):
    """A timm model from an entrypoint name or from ``module.Class`` under ``timm.models``."""
    import importlib

    import timm

    if "." in spec:
        module_name, cls_name = spec.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(f"timm.models.{module_name}"), cls_name)
        except (ImportError, AttributeError):
            raise UsageError(f"timm has no class timm.models.{spec}") from None
        return cls(**kwargs)
    if spec in _mixlab_names():
        raise UsageError(f"{spec!r} is mixlab's own registration; name a timm entrypoint or class to compare against")
    if not timm.is_model(spec):
        raise UsageError(f"timm has no model {spec!r}")
    return timm.create_model(spec, **kwargs)


def _mixlab_names() -> set[str]:
    from .. import list_models

    return set(list_models())


def run(args) -> int:
    import torch
    import timm

    from .. import create_model, model_info
    from ..analysis.bench import BenchConfig, bench_pair
    from ..runtime import malloc_tuned
    from ..train.cpu_defaults import cpu_model_name
    from ..train.validation import check_model_kwargs

    if args.windows < 5:
        raise UsageError("--windows must be at least 5 (the median of fewer windows is not a stable figure)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    info = model_info(args.model)
    hw = tuple(info.input_size[1:]) if not args.img_size else (
        (args.img_size[0],) * 2 if len(args.img_size) == 1 else tuple(args.img_size[:2]))
    kwargs = parse_kv(args.model_kwargs)
    check_model_kwargs(args.model, kwargs)
    model = create_model(args.model, num_classes=args.num_classes,
                         img_size=hw if args.img_size else None, **kwargs)
    fast_dw = 0
    if args.fast_depthwise == "on" and not args.device.startswith("cuda"):
        from ..ops.depthwise import use_fast_depthwise

        fast_dw = use_fast_depthwise(model)
    other = None
    if args.vs:
        if not args.vs.startswith("timm:"):
            raise UsageError(f"--vs takes timm:NAME (a timm model name), got {args.vs!r}")
        vs_kwargs = parse_kv(args.vs_kwargs)
        if args.num_classes is not None:
            vs_kwargs.setdefault("num_classes", args.num_classes)
        other = build_timm_model(args.vs[len("timm:"):], vs_kwargs)
    if not args.no_memory_check:
        from ..analysis.memory import check_memory, estimate_memory

        builders = [(args.model, lambda: create_model(args.model, num_classes=args.num_classes,
                                                      img_size=hw if args.img_size else None, **kwargs))]
        if other is not None:
            builders.append((args.vs, lambda: build_timm_model(args.vs[len("timm:"):], vs_kwargs)))
        chans = getattr(model, "in_chans", 3)
        for label, build in builders:
            check_memory(estimate_memory(build, (args.batch_size, chans, *hw), args.mode,
                                         low_precision=args.precision != "fp32"), args.device,
                         f"{'a training' if args.mode == 'train' else 'an inference'} step of {label} with batch "
                         f"{args.batch_size} at {hw[0]}x{hw[1]}", "lower --batch-size or --img-size",
                         "pass --no-memory-check")
    cfg = BenchConfig(mode=args.mode, batch_size=args.batch_size, img_size=hw, device=args.device,
                      precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                      warmup=args.warmup, windows=args.windows, window_seconds=args.window_seconds,
                      count_flops=not args.no_flops, task=info.task)
    out = bench_pair(model, cfg, other, in_chans=getattr(model, "in_chans", 3))
    out.update(model=args.model, vs=args.vs, torch=torch.__version__, malloc_tuned=malloc_tuned(),
               threads=torch.get_num_threads(), fast_depthwise_convs=fast_dw, cpu=cpu_model_name())
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    r = out["result"]
    print(f"{args.model}: {args.mode}, batch {args.batch_size}, {hw[0]}x{hw[1]}, {args.device}, "
          f"{args.precision}{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
          f"{f', fast depthwise conv ({fast_dw} layers)' if fast_dw else ''}"
          f"  (torch {torch.__version__}, {out['threads']} threads, malloc tuning {'on' if out['malloc_tuned'] else 'off'}; "
          f"{out['cpu']})")

    def line(label, res):
        extra = f", {res['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved" if "achieved_tflops" in res else ""
        unit = "ms/step" if args.mode == "train" else "ms/batch"
        print(f"  {label:<24} {res['images_per_sec_median']:9.1f} images/s median "
              f"(min {res['images_per_sec_min']:.1f}, max {res['images_per_sec_max']:.1f}; "
              f"{res['windows']} windows x {res['steps_per_window']} steps; "
              f"{res['ms_per_step_median']:.2f} {unit}{extra})")

    line(f"mixlab {args.model}", r)
    if other is not None:
        line(args.vs, out["other"])
        print(f"  ratio mixlab/timm        {out['ratio']:.3f}")
    print(f"  peak memory              {out['peak_memory_mib']:.0f} MiB ({out['peak_memory_kind']})")
    if "achieved_tflops" in r:
        print("  (FLOPs per step by torch.utils.flop_counter, grouped-conv backward corrected; FLOPs = 2 x MACs)")
    return 0
