"""CPU training settings measured on the user's machine, not assumed.

Which precision (bf16 / fp32), memory layout (channels_last or not) and depthwise convolution
(mixlab's fast op or aten's) trains a model fastest depends on the CPU: the same ConvMixer step
ran at 143 images/s on one 2-core machine and 62 on another, and channels_last was the faster
layout on one and the slower on the other. So for every setting the user left on ``auto``,
:func:`resolve_cpu_settings` times a few training steps of each combination on the real model
and batch shape, keeps the fastest, prints one line with the figures, and caches the verdict
per (model, batch shape, CPU model and feature flags, torch version, threads) in
``$MIXLAB_CACHE/cpu_defaults.json``.

- Explicit settings (``--precision``, ``--set channels_last=...``, ``--set fast_depthwise=...``)
  are never overridden.
- A run records what was picked in ``config.yaml`` (``picked``); a resumed run uses that
  record and measures nothing, so it computes what the uninterrupted run computed.
- Measuring is skipped when it would cost more than ~5% of the run (short runs, tests): the
  static defaults (bf16 where the CPU has it, channels_last for convolutional models, the fast
  depthwise op) are used and the line says so. ``--set autotune=false`` always skips it.
- A CPU already busy with other processes is reported in the first lines: two torch processes
  on the same cores slow each other down many times over (OpenMP threads spin while waiting),
  and timings taken then are not cached.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..ops.depthwise import fast_depthwise_available, ineligible_reason, use_fast_depthwise
from .step import TrainStep
from ..errors import UsageError

MEASURE_SHARE = 0.05  # measuring may cost at most this share of the run's estimated length
ROUNDS = 2  # timed steps per candidate, after one untimed
COMPILE_MIN_RUN = 600.0  # seconds: torch.compile is tried only for runs estimated longer than this
COMPILE_PAYBACK = 2.0  # compile when the time it saves over the run exceeds this many compile times


def cpu_model_name() -> str:
    """The CPU's model name, with its family / model numbers and widest vector instructions where
    /proc/cpuinfo gives them: virtual machines often report a bare "AMD EPYC" for processors as
    different as a Zen 3 (AVX2, bf16 emulated) and a Zen 5 (AVX-512 with bf16 dot products)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    return describe_cpuinfo(text)


def describe_cpuinfo(text: str) -> str:
    """:func:`cpu_model_name` from the text of a /proc/cpuinfo (its first processor's lines)."""
    info = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                        ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    detail = [f"family {info['cpu family']}, model {info['model']}" if "cpu family" in info and "model" in info
              else None, isa]
    detail = ", ".join(d for d in detail if d)
    name = info.get("model name", "unknown CPU")
    return f"{name} ({detail})" if detail else name


def _cpu_flags_digest() -> str:
    import hashlib

    from ..ops.kernel_build import cpu_identity

    return hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]


def busy_cores(seconds: float = 0.3) -> float | None:
    """How many cores other processes kept busy over ``seconds`` (from /proc/stat), or None off
    Linux. Call it while this process is idle."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / total)


def has_eligible_depthwise(model: nn.Module) -> bool:
    return any(type(m) is nn.Conv2d and ineligible_reason(m) is None for m in model.modules())


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let oneDNN decide (it falls back to emulation)
    return torch.backends.mkldnn.is_available() and any(
        f in flags for f in ("avx512_bf16", "amx_bf16", "avx512bw", "avx512f"))


def has_spatial_conv(model: nn.Module) -> bool:
    # channels_last speeds up convolutions (oneDNN and cuDNN prefer NHWC); a model with no
    # spatial convolution beyond a patch embedding gains nothing from it
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.stride == (1, 1) for m in model.modules())


def _as_bool(value, key: str):
    if value == "auto" or isinstance(value, bool):
        return value
    raise UsageError(f"{key} must be auto, true or false, got {value!r}")


def _cache_path() -> Path:
    return Path(os.environ.get("MIXLAB_CACHE") or Path.home() / ".cache" / "mixlab") / "cpu_defaults.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    from ..io import atomic_write_json

    cache = _read_cache()
    cache[key] = entry
    try:
        atomic_write_json(_cache_path(), cache)
    except OSError:
        pass  # read-only cache folder: measured again next time


def _trial_step(model: nn.Module, cand: dict, batch, loss_fn, compile: bool = False):
    """A training step on a copy of ``model`` with setting ``cand`` (and its input in that layout)."""
    m = copy.deepcopy(model)
    if cand["fast_depthwise"]:
        use_fast_depthwise(m)
    fmt = torch.channels_last if cand["channels_last"] else torch.contiguous_format
    m = m.to(memory_format=fmt).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)
    step = TrainStep(torch.compile(m) if compile else m, opt, loss_fn, "cpu", cand["precision"])
    x = batch[0].contiguous(memory_format=fmt)
    return lambda: step(x, batch[1])


def _best_of(run, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def time_candidates(model: nn.Module, candidates: list[dict], batch: tuple[torch.Tensor, torch.Tensor], loss_fn,
                    rounds: int = ROUNDS) -> list[float]:
    """Seconds per training step (best of ``rounds`` after one untimed step) for each candidate
    setting, each on its own copy of ``model`` (the model and the global RNG are left as they were)."""
    times = []
    with torch.random.fork_rng(devices=[]):
        for cand in candidates:
            run = _trial_step(model, cand, batch, loss_fn)
            run()
            times.append(_best_of(run, rounds))
    return times


def time_compiled(model: nn.Module, cand: dict, batch, loss_fn, rounds: int = ROUNDS) -> tuple[float, float]:
    """(seconds the first step took beyond a steady one: the compile, steady seconds per step) of
    ``torch.compile`` on a copy of ``model`` with setting ``cand``."""
    with torch.random.fork_rng(devices=[]):
        run = _trial_step(model, cand, batch, loss_fn, compile=True)
        first = _best_of(run, 1)
        run()  # a second call may still specialise
        best = _best_of(run, rounds)
    return max(first - best, 0.0), best


def _compile_verdict(times: tuple[float, float, float], total_steps: int, bs: int) -> dict:
    t_compile, t_step, t_eager = times
    saved = (t_eager - t_step) * total_steps
    note = (f"compile {t_compile:.0f} s, {bs / t_step:.0f} vs {bs / t_eager:.0f} images/s eager, "
            + (f"saves ~{saved:.0f} s over {total_steps} steps" if saved >= 0 else
               f"eager is faster: compiled, {total_steps} steps would take ~{-saved:.0f} s longer"))
    return dict(compile=saved > COMPILE_PAYBACK * t_compile, compile_note=note)


def _decide_compile(cfg: dict, model, best: dict, t_best: float, batch, loss_fn, total_steps: int, say,
                    entry: dict) -> dict:
    """Whether torch.compile pays within this run: tried only for long runs, kept only when the
    time it saves over the run is COMPILE_PAYBACK times its compile time. ``entry`` (the cache
    entry) keeps the timings, so a later run of another length decides without compiling again."""
    if cfg.get("compile", "auto") != "auto":
        return dict(compile=bool(cfg["compile"]))
    if entry.get("compile_times"):
        return _compile_verdict(tuple(entry["compile_times"]), total_steps, batch[0].shape[0])
    if entry.get("compile_failed"):
        return dict(compile=False, compile_note=f"failed earlier: {entry['compile_failed']}")
    if t_best * total_steps < COMPILE_MIN_RUN:
        return dict(compile=False, compile_note=f"not tried: run under {COMPILE_MIN_RUN:.0f} s")
    try:
        t_compile, t_step = time_compiled(model, best, batch, loss_fn)
    except Exception as e:  # noqa: BLE001  (any compiler failure means: run eagerly)
        say(f"torch.compile failed on this model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "training eagerly")
        entry["compile_failed"] = type(e).__name__
        return dict(compile=False, compile_note=f"failed: {type(e).__name__}")
    entry["compile_times"] = [t_compile, t_step, t_best]
    return _compile_verdict((t_compile, t_step, t_best), total_steps, batch[0].shape[0])


def resolve_cpu_settings(cfg: dict, model: nn.Module, make_batch, loss_fn, total_steps: int, say=print,
                         measure: bool = True) -> dict:
    """precision / channels_last / fast_depthwise for a CPU run (see the module docstring).

    ``make_batch()``: a training batch of the real shape (inputs, targets) for ``loss_fn``.
    ``measure=False`` (DDP ranks, which must agree) uses a cached verdict or the static
    defaults. Returns ``dict(precision=..., channels_last=..., fast_depthwise=..., how=...,
    figures=...)``, recorded in the run's config as ``picked``.
    """
    if cfg.get("picked"):
        p = dict(cfg["picked"])
        say(f"CPU settings from the run's record: {describe(p)}")
        return p
    bf16_ok = cpu_has_bf16()
    dw_possible = has_eligible_depthwise(model)
    options = {
        "precision": ["bf16", "fp32"] if bf16_ok else ["fp32"],
        "channels_last": [True, False] if has_spatial_conv(model) else [False],
        "fast_depthwise": ([True, False] if fast_depthwise_available() else [False]) if dw_possible else [False],
    }
    static = {"precision": options["precision"][0], "channels_last": options["channels_last"][0],
              "fast_depthwise": options["fast_depthwise"][0]}
    fixed = {}
    if cfg["precision"] != "auto":
        fixed["precision"] = cfg["precision"]
    for key in ("channels_last", "fast_depthwise"):
        if _as_bool(cfg.get(key, "auto"), key) != "auto":
            fixed[key] = bool(cfg[key])
    if fixed.get("fast_depthwise") and dw_possible and not fast_depthwise_available():
        say("fast_depthwise=true was asked for, but the kernel is not available here (see the message above): "
            "the op runs its aten fallback")
    for key, value in fixed.items():
        options[key] = [value]
    candidates = [dict(zip(options, combo)) for combo in itertools.product(*options.values())]
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        say(f"warning: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: this run will be slower "
            "than on an idle machine (two torch processes on the same cores can slow each other down 10x or more)")
    explicit_compile = cfg.get("compile", "auto") is True
    if len(candidates) == 1:
        return dict(candidates[0], compile=explicit_compile, how="fixed" if fixed else "only choice", figures={})
    batch = make_batch()
    if batch is None:  # the task's step is not a loss of the outputs (a detector's losses are in its forward)
        chosen = dict({k: fixed.get(k, static[k]) for k in static}, compile=explicit_compile, figures={},
                      how="static defaults: this task's steps are not timed")
        say(f"CPU settings: {describe(chosen)}")
        return chosen
    x, y = batch
    from ..ops.gelu import FastGELU, GeluBatchNorm2d
    from ..ops.layernorm import FastLayerNorm, FastLayerNorm2d
    from ..ops.pointwise import PointwiseConv2d
    from ..ops.dense_conv import DenseConv2d
    from ..ops.resample import PoolingBatchNorm2d, UpsamplingBatchNorm2d, UpsamplingConv2d
    from ..ops.bn_relu import BatchNormReLU2d

    fast_gelu = any(isinstance(m, (FastGELU, GeluBatchNorm2d)) for m in model.modules())  # timed with them
    fast_ln = any(isinstance(m, (FastLayerNorm, FastLayerNorm2d)) for m in model.modules())
    fast_pw = any(isinstance(m, PointwiseConv2d) for m in model.modules())
    fast_dc = any(isinstance(m, DenseConv2d) for m in model.modules())
    fast_rs = any(isinstance(m, (PoolingBatchNorm2d, UpsamplingBatchNorm2d, UpsamplingConv2d)) for m in model.modules())
    fast_br = any(isinstance(m, BatchNormReLU2d) for m in model.modules())
    key = json.dumps([cfg["model"], cfg.get("model_kwargs") or {}, list(x.shape), str(x.dtype), cfg.get("task"),
                      # the model name and every feature flag: a bare name ("AMD EPYC") can stand for
                      # CPUs whose fastest settings differ, in a cache folder they share
                      cpu_model_name(), _cpu_flags_digest(), torch.__version__, torch.get_num_threads(), candidates,
                      str(cfg.get("compile", "auto"))] + (["fast_gelu"] if fast_gelu else [])
                     + (["fast_layernorm"] if fast_ln else []) + (["fast_pointwise"] if fast_pw else [])
                     + (["fast_dense_conv"] if fast_dc else [])
                     + (["fast_resample"] if fast_rs else []) + (["fast_bn_relu"] if fast_br else []),
                     sort_keys=True)
    hit = _read_cache().get(key)
    if hit and measure:
        choice = {k: hit["choice"][k] for k in static}
        bs = x.shape[0]
        t_best = bs / hit["figures"][label(choice)]
        compile_info = _decide_compile(cfg, model, choice, t_best, batch, loss_fn, total_steps, say, hit)
        chosen = dict(choice, **compile_info, how="cached", figures=hit["figures"])
        say(f"CPU settings (measured earlier on this machine, {_cache_path()}): {describe(chosen)}")
        _write_cache(key, hit)  # keeps compile timings measured just now
        return chosen
    if hit:  # multi-process: every rank reads the same verdict, none compiles to time it
        chosen = dict({k: hit["choice"][k] for k in static}, compile=explicit_compile, how="cached",
                      figures=hit["figures"])
        say(f"CPU settings (measured earlier on this machine): {describe(chosen)}")
        return chosen
    default = {k: fixed.get(k, static[k]) for k in static}
    if not cfg.get("autotune", True) or not measure:
        why = "autotune off" if measure else "not measured in a multi-process run"
        chosen = dict(default, compile=explicit_compile, how=f"static defaults: {why}", figures={})
        say(f"CPU settings: {describe(chosen)}")
        return chosen
    # one step of the static default estimates the run; measure only if that is cheap next to it
    first = time_candidates(model, [default], batch, loss_fn, rounds=1)[0]
    cost = first * (ROUNDS + 1) * len(candidates)
    if cost > MEASURE_SHARE * first * total_steps:
        chosen = dict(default, compile=explicit_compile, figures={},
                      how=f"static defaults: measuring {len(candidates)} candidates would take ~{cost:.0f} s, "
                          f"over {MEASURE_SHARE:.0%} of this run")
        say(f"CPU settings: {describe(chosen)}")
        return chosen
    t0 = time.perf_counter()
    times = time_candidates(model, candidates, batch, loss_fn)
    bs = x.shape[0]
    figures = {label(c): round(bs / t, 1) for c, t in zip(candidates, times)}
    i_best = min(range(len(times)), key=times.__getitem__)
    best = candidates[i_best]
    entry = dict(choice=best, figures=figures, date=time.strftime("%Y-%m-%d"))
    compile_info = _decide_compile(cfg, model, best, times[i_best], batch, loss_fn, total_steps, say, entry)
    chosen = dict(best, **compile_info, how="measured", figures=figures)
    say(f"CPU settings measured in {time.perf_counter() - t0:.0f} s (images/s, batch {bs}): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(figures.items(), key=lambda kv: -kv[1]))
        + f" -> {describe(chosen)}")
    if busy is None or busy <= 0.5:
        _write_cache(key, entry)
    return chosen


def label(c: dict) -> str:
    return (f"{c['precision']}/{'channels_last' if c['channels_last'] else 'NCHW'}"
            f"{'/fast-dw' if c['fast_depthwise'] else ''}")


def describe(p: dict) -> str:
    compiled = ", torch.compile" if p.get("compile") else ""
    note = f"; {p['compile_note']}" if p.get("compile_note") else ""
    fused = (", mixlab's GELU kernels" if p.get("fast_gelu") else "") + (
        ", mixlab's LayerNorm kernel" if p.get("fast_layernorm") else "") + (
        ", mixlab's 1x1 conv" if p.get("fast_pointwise") else "") + (
        ", mixlab's dense conv" if p.get("fast_dense_conv") else "") + (
        ", mixlab's resampling kernels" if p.get("fast_resample") else "") + (
        ", mixlab's BatchNorm + ReLU" if p.get("fast_bn_relu") else "")
    return (f"{p['precision']}, {'channels_last' if p['channels_last'] else 'NCHW'}, "
            f"{'fast' if p['fast_depthwise'] else 'aten'} depthwise conv{fused}{compiled} ({p['how']}{note})")
