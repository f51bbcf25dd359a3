"""Where one training step of a model goes on this machine: ms per step, then torch.profiler's
operators by self time, eager and (``--compile``) under torch.compile.

    python benchmarks/profile_train_step.py --model convmixer_256_8 --batch-size 128 --img-size 32 \
        --precision bf16 [--compile] [--out FILE.txt]

The step is the one `mixlab bench --mode train` times (`mixlab.analysis.bench.StepRunner`: mixlab's
TrainStep with the model's task loss, seeded random inputs), with the settings `mixlab train` would
use on the CPU (channels_last, mixlab's fast depthwise convolution and GELU kernels) unless told otherwise. Run it
alone on the machine.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mixlab
from mixlab.analysis.bench import BenchConfig, StepRunner
from mixlab.ops.depthwise import use_fast_depthwise
from mixlab.analysis.profile import input_hw_of
from mixlab.ops.gelu import use_fast_gelu
from mixlab.ops.layernorm import use_fast_layernorm
from mixlab.ops.pointwise import use_fast_pointwise
from mixlab.ops.dense_conv import use_fast_dense_conv
from mixlab.ops.resample import use_fast_resample
from mixlab.ops.bn_relu import use_fast_bn_relu
from mixlab.runtime import flush_denormals, tune_malloc
from text_report import emit, provenance  # benchmarks/text_report.py (run as python benchmarks/...)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--img-size", type=int, help="default: the model's registered input size")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--nchw", action="store_true", help="keep NCHW (default: channels_last)")
    ap.add_argument("--aten-depthwise", action="store_true", help="keep aten's depthwise convolution")
    ap.add_argument("--aten-gelu", action="store_true", help="keep aten's GELU (and BatchNorm)")
    ap.add_argument("--aten-layernorm", action="store_true", help="keep aten's LayerNorm")
    ap.add_argument("--aten-pointwise", action="store_true", help="keep aten's 1x1 convolution backward")
    ap.add_argument("--aten-dense-conv", action="store_true", help="keep aten's dense KxK convolution backward")
    ap.add_argument("--aten-bn-relu", action="store_true", help="keep aten's BatchNorm and ReLU unfused")
    ap.add_argument("--aten-resample", action="store_true", help="keep aten's BatchNorm/pool/upsample layers unfused")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--rows", type=int, default=15, help="operators listed")
    ap.add_argument("--out", help="also write the report there")
    args = ap.parse_args()
    tune_malloc()
    flush_denormals()  # as the CLI does, before torch's first parallel operation
    torch.manual_seed(0)
    hw = input_hw_of(args.model, [args.img_size] if args.img_size else None)
    model = mixlab.create_model(args.model, img_size=hw if args.img_size else None)
    if not args.aten_resample:  # first: it takes over a 1x1 head that the 1x1 op would switch otherwise
        use_fast_resample(model)
    if not args.aten_depthwise:
        use_fast_depthwise(model)
    if not args.aten_gelu:
        use_fast_gelu(model)
    if not args.aten_bn_relu:
        use_fast_bn_relu(model)
    if not args.aten_layernorm:
        use_fast_layernorm(model)
    if not args.aten_pointwise:
        use_fast_pointwise(model)
    if not args.aten_dense_conv:
        use_fast_dense_conv(model)
    cfg = BenchConfig(mode="train", batch_size=args.batch_size, img_size=hw, precision=args.precision,
                      channels_last=not args.nchw, compile=args.compile, task=mixlab.model_info(args.model).task)
    runner = StepRunner(model, cfg, getattr(model, "in_chans", 3), int(model.num_classes))
    runner.run(3)  # warm-up (and the compile)
    seconds = runner.run(args.steps) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.run(3)
    lines = [*provenance(),
             f"{args.model}: batch {args.batch_size}, {hw[0]}x{hw[1]}, {args.precision}, "
             f"{'NCHW' if args.nchw else 'channels_last'}, {'aten' if args.aten_depthwise else 'fast'} depthwise conv, "
             f"{'aten' if args.aten_gelu else 'mixlab'} GELU, {'aten' if args.aten_layernorm else 'mixlab'} LayerNorm, {'aten' if args.aten_pointwise else 'mixlab'} 1x1 conv, "
             f"{'aten' if args.aten_dense_conv else 'mixlab'} dense conv, "
             f"{'compiled' if args.compile else 'eager'}: {1000 * seconds:.1f} ms/step, "
             f"{args.batch_size / seconds:.1f} images/s",
             "operators over 3 profiled steps (divide by 3 for one step):",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
