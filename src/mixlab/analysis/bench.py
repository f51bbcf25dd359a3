"""Timing training and inference steps, optionally against another model in the same process.

Method: build the step (the same `TrainStep` `mixlab train` runs), warm up (this also lets
oneDNN / cuDNN pick their kernels and `torch.compile` compile), size a window so that it
lasts about `window_seconds`, then time `windows` windows. With a second model, windows
alternate A, B, A, B, ... so that drift in the machine (thermal, other processes) hits both
sides alike; the ratio is taken between the medians.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..train.step import TrainStep, infer_step
from .profile import flop_counter, input_hw_of
from ..errors import UsageError

__all__ = ["BenchConfig", "StepRunner", "bench_model", "bench_pair", "bench_registered", "build_timm_model"]


@dataclass
class BenchConfig:
    mode: str = "train"  # train | infer
    batch_size: int = 128
    img_size: tuple[int, int] = (32, 32)
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    warmup: int = 3
    windows: int = 5
    window_seconds: float = 2.0
    count_flops: bool = True
    task: str = "classification"  # classification (cross-entropy) | segmentation (BCE + Dice on masks)


class StepRunner:
    """Holds one model's step (train: mixlab's TrainStep with the task's loss; infer) and its
    seeded random inputs; `run(n)` executes n steps and syncs."""

    def __init__(self, model: nn.Module, cfg: BenchConfig, in_chans: int, num_classes: int):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=memory_format)
        self.model = model
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(cfg.batch_size, in_chans, *cfg.img_size, generator=gen).to(
            self.device, memory_format=memory_format)
        if cfg.task == "segmentation":  # the task's own loss: BCE + Dice against random binary masks
            from ..seg.losses import build_loss

            self.y = (torch.rand(cfg.batch_size, max(num_classes, 1), *cfg.img_size, generator=gen) > 0.5).float()
            self.y = self.y.to(self.device)
            loss_fn = build_loss("bce_dice")
        elif cfg.task == "classification":
            self.y = torch.randint(0, max(num_classes, 1), (cfg.batch_size,), generator=gen).to(self.device)
            loss_fn = nn.CrossEntropyLoss()
        else:
            raise UsageError(f"task must be 'classification' or 'segmentation', got {cfg.task!r}")
        fn = torch.compile(model) if cfg.compile else model
        if cfg.mode == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
            self.step = TrainStep(fn, opt, loss_fn, self.device, cfg.precision)
            self._call = lambda: self.step(self.x, self.y)
        elif cfg.mode == "infer":
            model.eval()
            self._call = lambda: infer_step(fn, self.x, self.device, cfg.precision)
        else:
            raise UsageError(f"mode must be 'train' or 'infer', got {cfg.mode!r}")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, n: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self._call()
        self.sync()
        return time.perf_counter() - t0

    def flops_per_step(self) -> int:
        """FLOPs of one step (forward, and backward in train mode), grouped-conv backward corrected."""
        with flop_counter() as counter:
            self._call()
        return int(counter.get_total_flops())


def _steps_per_window(runner: StepRunner, seconds: float) -> int:
    t = runner.run(1)
    return max(1, round(seconds / max(t, 1e-6)))


def _summary(times: list[float], steps: int, batch: int) -> dict:
    ips = sorted(steps * batch / t for t in times)
    return dict(images_per_sec_median=statistics.median(ips), images_per_sec_min=ips[0],
                images_per_sec_max=ips[-1], windows=len(times), steps_per_window=steps,
                ms_per_step_median=1000 * statistics.median(times) / steps)


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                    peak_memory_kind="CUDA max_memory_allocated")
    # ru_maxrss is KiB on Linux: the whole process's peak resident set, model build included
    return dict(peak_memory_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                peak_memory_kind="process peak RSS")


def _num_classes(model: nn.Module, task: str = "classification") -> int:
    return int(getattr(model, "num_classes", 0) or (1 if task == "segmentation" else 1000))


def bench_pair(model: nn.Module, cfg: BenchConfig, other: nn.Module | None = None,
               in_chans: int = 3) -> dict:
    """Time `model` (and `other`, alternating windows). Returns a dict for printing or JSON."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runners = [StepRunner(model, cfg, in_chans, _num_classes(model, cfg.task))]
    if other is not None:
        runners.append(StepRunner(other, cfg, in_chans, _num_classes(other, cfg.task)))
    for r in runners:
        r.run(cfg.warmup)
    steps = [_steps_per_window(r, cfg.window_seconds) for r in runners]
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(cfg.windows):
        for i, r in enumerate(runners):
            times[i].append(r.run(steps[i]))
    results = []
    for i, r in enumerate(runners):
        res = _summary(times[i], steps[i], cfg.batch_size)
        if cfg.count_flops:
            fps = r.flops_per_step()
            res["flops_per_step"] = fps
            res["achieved_tflops"] = fps * res["images_per_sec_median"] / cfg.batch_size / 1e12
        results.append(res)
    out = dict(config=dict(cfg.__dict__, img_size=list(cfg.img_size)), result=results[0], **_peak_memory(device))
    if other is not None:
        out["other"] = results[1]
        out["ratio"] = results[0]["images_per_sec_median"] / results[1]["images_per_sec_median"]
    return out


def bench_model(model: nn.Module, mode: str = "infer", batch_size: int = 32, img_size=(224, 224),
                device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                compile: bool = False, windows: int = 5, window_seconds: float = 2.0,
                in_chans: int = 3) -> dict:
    """Convenience wrapper: time one model; returns ``bench_pair``'s ``result`` dict."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    cfg = BenchConfig(mode=mode, batch_size=batch_size, img_size=tuple(img_size), device=device,
                      precision=precision, channels_last=channels_last, compile=compile, windows=windows,
                      window_seconds=window_seconds, count_flops=False)
    return bench_pair(model, cfg, in_chans=in_chans)["result"]


# ----------------------------------------------------------------------------- `mixlab bench`

def build_timm_model(spec: str, kwargs: dict) -> nn.Module:
    """A timm model from an entrypoint name or from ``module.Class`` under ``timm.models``."""
    import importlib

    import timm

    from ..registry import list_models

    if "." in spec:
        module_name, cls_name = spec.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(f"timm.models.{module_name}"), cls_name)
        except (ImportError, AttributeError):
            raise UsageError(f"timm has no class timm.models.{spec}") from None
        return cls(**kwargs)
    if spec in set(list_models()):
        raise UsageError(f"{spec!r} is mixlab's own registration; name a timm entrypoint or class to compare against")
    if not timm.is_model(spec):
        raise UsageError(f"timm has no model {spec!r}")
    return timm.create_model(spec, **kwargs)


def bench_registered(name: str, mode: str = "train", batch_size: int = 128, img_size=None, device: str = "cpu",
                     precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                     fast_depthwise: bool = True, fast_gelu: bool = True, fast_layernorm: bool = True, fast_pointwise: bool = True,
                     fast_dense_conv: bool = True,
                     fast_resample: bool = True, fast_bn_relu: bool = True, num_classes: int | None = None,
                     model_kwargs: dict | None = None,
                     vs: str | None = None, vs_kwargs: dict | None = None, warmup: int = 3, windows: int = 5,
                     window_seconds: float = 2.0, count_flops: bool = True, memory_check: bool = True) -> dict:
    """Time the registered model ``name`` (and the timm model ``vs`` = ``timm:NAME``, alternating
    windows), as ``mixlab bench`` does. ``img_size``: [N] or [H, W], or None for the model's own.
    ``fast_depthwise``: on the CPU, run ``name`` with mixlab's fast depthwise convolution (the
    ``vs`` model always keeps aten's); ``fast_gelu``: likewise with mixlab's GELU kernels
    (:mod:`mixlab.ops.gelu`), ``fast_layernorm`` with its LayerNorm kernel (:mod:`mixlab.ops.layernorm`), ``fast_pointwise`` with
    its 1x1 convolution (:mod:`mixlab.ops.pointwise`), ``fast_dense_conv`` with its dense KxK convolution (:mod:`mixlab.ops.dense_conv`), ``fast_resample`` with its fused resampling layers (:mod:`mixlab.ops.resample`), ``fast_bn_relu`` with its BatchNorm + ReLU (:mod:`mixlab.ops.bn_relu`). Returns :func:`bench_pair`'s dict with the model, the versions,
    threads and CPU, ``fast_depthwise_convs`` (layers switched) and ``fast_gelu`` ([GELU +
    BatchNorm pairs fused, GELUs alone]), ``fast_layernorms`` (LayerNorms switched), ``fast_pointwise_convs``, ``fast_dense_convs``, ``fast_resample_layers``, ``fast_bn_relu_pairs``, ``fused_residual_blocks`` (:mod:`mixlab.ops.residual`).
    ``memory_check``:
    refuse a batch whose step would not fit in the memory free (estimated first)."""
    from ..registry import create_model, model_info
    from ..runtime import denormals_flushed, malloc_tuned
    from ..train.cpu_defaults import cpu_model_name
    from ..train.validation import check_model_kwargs

    if windows < 5:
        raise UsageError("--windows must be at least 5 (the median of fewer windows is not a stable figure)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    info = model_info(name)
    hw = input_hw_of(name, img_size)
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(name, kwargs)
    model = create_model(name, num_classes=num_classes, img_size=hw if img_size else None, **kwargs)
    rss = 0  # first: it takes over a 1x1 head that it fuses, which the 1x1 op would switch otherwise
    if fast_resample and not device.startswith("cuda"):
        from ..ops.resample import use_fast_resample

        rss = use_fast_resample(model)
    fast_dw = 0
    if fast_depthwise and not device.startswith("cuda"):
        from ..ops.depthwise import use_fast_depthwise

        fast_dw = use_fast_depthwise(model)
    gelus = (0, 0)
    if fast_gelu and not device.startswith("cuda"):
        from ..ops.gelu import use_fast_gelu

        gelus = use_fast_gelu(model)
    brs = 0  # after the GELU pairs, which take their BatchNorms
    if fast_bn_relu and not device.startswith("cuda"):
        from ..ops.bn_relu import use_fast_bn_relu

        brs = use_fast_bn_relu(model)
    lns = 0
    if fast_layernorm and not device.startswith("cuda"):
        from ..ops.layernorm import use_fast_layernorm

        lns = use_fast_layernorm(model)
    pws = 0
    if fast_pointwise and not device.startswith("cuda"):
        from ..ops.pointwise import use_fast_pointwise

        pws = use_fast_pointwise(model)
    dcs = 0
    if fast_dense_conv and not device.startswith("cuda"):
        from ..ops.dense_conv import use_fast_dense_conv

        dcs = use_fast_dense_conv(model)
    from ..ops.residual import FusedResidual

    # the blocks run fused only in training, eagerly, on channels-last tensors, with mixlab's depthwise conv
    fused_res = (sum(type(m) is FusedResidual for m in model.modules())
                 if fast_dw and channels_last and not compile and mode == "train" else 0)
    other = None
    if vs:
        if not vs.startswith("timm:"):
            raise UsageError(f"--vs takes timm:NAME (a timm model name), got {vs!r}")
        vs_kwargs = dict(vs_kwargs or {})
        if num_classes is not None:
            vs_kwargs.setdefault("num_classes", num_classes)
        other = build_timm_model(vs[len("timm:"):], vs_kwargs)
    if memory_check:
        from .memory import check_memory, estimate_memory

        builders = [(name, lambda: create_model(name, num_classes=num_classes, img_size=hw if img_size else None,
                                                **kwargs))]
        if other is not None:
            builders.append((vs, lambda: build_timm_model(vs[len("timm:"):], vs_kwargs)))
        for label, build in builders:
            check_memory(estimate_memory(build, (batch_size, getattr(model, "in_chans", 3), *hw), mode,
                                         low_precision=precision != "fp32"), device,
                         f"{'a training' if mode == 'train' else 'an inference'} step of {label} with batch "
                         f"{batch_size} at {hw[0]}x{hw[1]}", "lower --batch-size or --img-size",
                         "pass --no-memory-check")
    cfg = BenchConfig(mode=mode, batch_size=batch_size, img_size=hw, device=device, precision=precision,
                      channels_last=channels_last, compile=compile, warmup=warmup, windows=windows,
                      window_seconds=window_seconds, count_flops=count_flops, task=info.task)
    out = bench_pair(model, cfg, other, in_chans=getattr(model, "in_chans", 3))
    out.update(model=name, vs=vs, torch=torch.__version__, malloc_tuned=malloc_tuned(),
               denormals_flushed=denormals_flushed(),
               threads=torch.get_num_threads(), fast_depthwise_convs=fast_dw, fast_gelu=list(gelus),
               fast_layernorms=lns, fast_pointwise_convs=pws, fast_dense_convs=dcs, fast_resample_layers=rss, fast_bn_relu_pairs=brs,
               fused_residual_blocks=fused_res,
               cpu=cpu_model_name())
    return out
