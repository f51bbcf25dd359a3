"""Train-step time of ConvMixer-256/8 (batch 512, bf16, channels_last, fast depthwise conv) with
given weights, with and without flushing subnormal floats to zero.

    python benchmarks/flush_denormals_step.py off|ftz init|WEIGHTS.safetensors eager|compile

Run each setting in its own process: the flush-to-zero mode must be set before torch starts
its worker threads (they copy it when created), so it cannot be switched inside one process.
Inputs are the bench's seeded random batch (mixlab.analysis.bench.StepRunner); the figure is
the fastest of four windows of three steps after three warm-up steps.
"""
import sys

import torch

ftz, weights, compiled = sys.argv[1] == "ftz", sys.argv[2], sys.argv[3] == "compile"
if ftz:
    torch.set_flush_denormal(True)  # first, before any parallel region

import mixlab  # noqa: E402
from mixlab.analysis.bench import BenchConfig, StepRunner  # noqa: E402
from mixlab.ops.depthwise import use_fast_depthwise  # noqa: E402
from mixlab.runtime import tune_malloc  # noqa: E402

tune_malloc()
torch.manual_seed(0)
m = mixlab.create_model("convmixer_256_8")
if weights != "init":
    from safetensors.torch import load_file

    m.load_state_dict(load_file(weights))
use_fast_depthwise(m)
r = StepRunner(m, BenchConfig(batch_size=512, precision="bf16", channels_last=True, compile=compiled), 3, 10)
r.run(3)
ts = [r.run(3) / 3 for _ in range(4)]
print(f"ftz={ftz} weights={'init' if weights == 'init' else weights} compile={compiled}: "
      f"{1e3 * min(ts):.0f} ms/step (min of 4x3), {512 / min(ts):.0f} img/s", flush=True)
