"""`mixlab bench MODEL`: images/s of training or inference steps, optionally vs a timm model."""
from __future__ import annotations

from . import print_json


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
    p.add_argument("--fast-gelu", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with mixlab's GELU kernels: GELU + BatchNorm pairs fused, "
                        "other GELUs alone (mixlab.ops.gelu; default on, as `mixlab train` uses them; the --vs model "
                        "always keeps aten's)")
    p.add_argument("--fast-layernorm", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with mixlab's LayerNorm kernel (mixlab.ops.layernorm; default "
                        "on, as `mixlab train` uses it; the --vs model always keeps aten's)")
    p.add_argument("--fast-pointwise", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with mixlab's 1x1 convolution (weight gradient by matrix "
                        "product where faster; mixlab.ops.pointwise; default on, as `mixlab train` uses it; the --vs "
                        "model always keeps aten's)")
    p.add_argument("--fast-dense-conv", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with mixlab's dense KxK convolution (the fastest of aten's, "
                        "a gathered weight gradient and Winograd's 3x3 per shape; mixlab.ops.dense_conv; default on, "
                        "as `mixlab train` uses it; the --vs model always keeps aten's)")
    p.add_argument("--fast-resample", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with its resampling layers fused where it names them (UNeXt: "
                        "BatchNorm + max-pool + ReLU, BatchNorm + upsample + ReLU + skip, upsample + ReLU + 1x1 "
                        "head; mixlab.ops.resample; default on, as "
                        "`mixlab train` uses them; the --vs model always keeps aten's)")
    p.add_argument("--fast-bn-relu", choices=["on", "off"], default="on",
                   help="on the CPU, run mixlab's model with each BatchNorm + ReLU pair as one op (mixlab.ops.bn_relu; "
                        "default on, as `mixlab train` uses it; the --vs model always keeps aten's)")
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


def run(args) -> int:
    from ..analysis.bench import bench_registered
    from ..kv import parse_kv

    out = bench_registered(
        args.model, mode=args.mode, batch_size=args.batch_size, img_size=args.img_size, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        fast_depthwise=args.fast_depthwise == "on", fast_gelu=args.fast_gelu == "on",
        fast_layernorm=args.fast_layernorm == "on", fast_pointwise=args.fast_pointwise == "on",
        fast_dense_conv=args.fast_dense_conv == "on",
        fast_resample=args.fast_resample == "on", fast_bn_relu=args.fast_bn_relu == "on",
        num_classes=args.num_classes,
        model_kwargs=parse_kv(args.model_kwargs), vs=args.vs, vs_kwargs=parse_kv(args.vs_kwargs) if args.vs else None,
        warmup=args.warmup, windows=args.windows, window_seconds=args.window_seconds, count_flops=not args.no_flops,
        memory_check=not args.no_memory_check)
    hw, fast_dw, other = out["config"]["img_size"], out["fast_depthwise_convs"], out.get("other")
    pairs, alone = out["fast_gelu"]
    if print_json(out, args.json):
        return 0
    r = out["result"]
    print(f"{args.model}: {args.mode}, batch {args.batch_size}, {hw[0]}x{hw[1]}, {args.device}, "
          f"{args.precision}{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
          f"{f', fast depthwise conv ({fast_dw} layers)' if fast_dw else ''}"
          f"{f', fused GELU + BatchNorm ({pairs} pairs)' if pairs else ''}"
          f"{f', {res} residual blocks fused' if (res := out.get('fused_residual_blocks')) else ''}"
          f"{f', mixlab GELU ({alone})' if alone else ''}"
          f"{f', mixlab LayerNorm ({lns})' if (lns := out.get('fast_layernorms')) else ''}"
          f"{f', mixlab 1x1 conv ({pws})' if (pws := out.get('fast_pointwise_convs')) else ''}"
          f"{f', mixlab dense conv ({dcs})' if (dcs := out.get('fast_dense_convs')) else ''}"
          f"{f', mixlab resampling ({rss} layers)' if (rss := out.get('fast_resample_layers')) else ''}"
          f"{f', BatchNorm + ReLU fused ({brs} pairs)' if (brs := out.get('fast_bn_relu_pairs')) else ''}"
          f"  (torch {out['torch']}, {out['threads']} threads, malloc tuning {'on' if out['malloc_tuned'] else 'off'}, "
          f"subnormals {'flushed' if out['denormals_flushed'] else 'kept'}; "
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
        line(args.vs, other)
        print(f"  ratio mixlab/timm        {out['ratio']:.3f}")
    print(f"  peak memory              {out['peak_memory_mib']:.0f} MiB ({out['peak_memory_kind']})")
    if "achieved_tflops" in r:
        print("  (FLOPs per step by torch.utils.flop_counter, grouped-conv backward corrected; FLOPs = 2 x MACs)")
    return 0
