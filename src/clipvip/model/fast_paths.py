"""Faster ways to compute what the encoder layer of :mod:`clipvip.model.layers` computes.

Every fast path here computes the same function as the plain PyTorch it replaces (up to float
summation order; tests/test_fast_model.py and tests/test_fast_paths.py hold them together) and is
taken only where it is faster on the machine running it:

- **fused QKV**: one (D, 3D) projection instead of three (D, D) ones, one pass over x; and the
  **quick_gelu fold**: quick_gelu's two scalings folded into the MLP's matmuls, one elementwise
  pass (silu) left of the three (mul, sigmoid, mul). Both are PyTorch doing less work than what
  they replace on any device, so they need no measurement and have no switch of their own;
- **oneDNN** fp32 CPU matmuls instead of MKL's, on CPUs with AVX-512 and only where a one-time
  measurement at the first matmul finds it faster (:func:`onednn_linear_speedup`);
- **bmm attention** in bf16/fp16 on a CPU, because torch's CPU SDPA kernel is 2.5-3x slower there
  for these short sequences (docs/performance.md);
- ``patch_matmul``: the patchifying convolution as one matmul over the frames cut into patches:
  faster forward and weight gradient on CPUs (measured, AVX-512 and AVX2 kernels) and on GPUs
  (issue 23's H200 profile: cuDNN's convolution 3.3 ms forward + 3.7 ms weight gradient for B/32
  at batch 32, the same product as one matmul ~0.3 ms);
- ``weight_copies``: under bf16/fp16 autocast, the low-precision weights of these matmuls made
  once per optimizer step instead of cast at every use (:mod:`clipvip.model.low_precision`; the
  training step and evaluation open :func:`weight_copies` around their batches);
- ``proxy_attention``: how proxy-guided attention avoids (or not) the per-frame copies of keys
  and values: ``cat``, ``views``, ``buffer``, ``mask``, ``flex`` (:mod:`clipvip.model.attention`
  describes each); ``auto`` takes ``cat`` on CPUs (the fastest measured there; in bf16/fp16 the
  bmm attention above) and ``views`` on GPUs (the profile's per-frame ``cat`` avoided; its patch
  queries keep SDPA's flash kernel, its proxy queries take a boolean mask and the
  memory-efficient kernel; not yet measured on a GPU: ``scripts/gpu_check.sh`` times the forms).

One master switch, :data:`ENABLED`, turns all of them off (the ``sdpa`` layers then run the plain
PyTorch of layers.py); the last three can also be chosen one by one. Both come from the
environment variable ``CLIPVIP_FAST_PATHS`` (read at import), the config key ``fast_paths``
(applied when a model is built) or :func:`configure` (process-wide, like torch's backend flags):

    CLIPVIP_FAST_PATHS=0                                  # every fast path off
    CLIPVIP_FAST_PATHS=weight_copies=0,proxy_attention=cat  # the defaults but these
    fast_paths.configure("patch_matmul=0")                # returns the previous state ...
    fast_paths.restore(previous)                          # ... to put back

The ``eager`` implementation (the original formulation) never takes any of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipvip.logging_utils import get_logger
from clipvip.model import attention
from clipvip.model.low_precision import Derived, WeightCopies, active

LOGGER = get_logger("fast_paths")

SWITCH_ENV = "CLIPVIP_FAST_PATHS"
QUICK_GELU_ALPHA = 1.702  # quick_gelu(h) = h * sigmoid(1.702 * h)
PROXY_ATTENTIONS = ("auto", "cat", "views", "buffer", "mask", "flex")

# The oneDNN decision: a matmul of a mid-sized layer of the model (rows x in -> out), timed
# forward and as the two backward products, against MKL; oneDNN is taken only when it is at
# least ONEDNN_MIN_SPEEDUP times faster. The margin keeps the decision the same run after run
# (runs that resume each other must take the same kernels): measured 2.0x on the AVX-512 EPYC
# of docs/performance.md (1.2x with oneDNN held to AVX2 there, where the AVX-512 check already
# says no), and oneDNN lost on an AVX2-only EPYC.
ONEDNN_PROBE_SHAPE = (1024, 512, 512)
ONEDNN_MIN_SPEEDUP = 1.5
ONEDNN_PROBE_ROUNDS = 5


@dataclass(frozen=True)
class FastPathSettings:
    """The fast paths that can be chosen one by one (all of them need :data:`ENABLED`)."""

    patch_matmul: bool = True  # the patch embedding as one matmul (CPUs and GPUs)
    weight_copies: bool = True  # bf16/fp16: weights cast once per optimizer step, not per use
    proxy_attention: str = "auto"  # auto | cat | views | buffer | mask | flex

    def spec(self) -> str:
        """The settings as :func:`parse` reads them back (only what differs from the defaults)."""
        default = FastPathSettings()
        changed = [f"{f.name}={_format(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)]
        return ",".join(changed) or "1"


def _format(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def parse(spec: str) -> tuple[bool, FastPathSettings]:
    """``(enabled, settings)`` of a switch value: ``0``/``off`` (all off), ``1``/``on``/empty (the
    defaults) or ``name=value,...`` (the defaults but these; booleans as 0/1). Raises ValueError
    naming what it does not know."""
    text = (spec or "").strip()
    if text.lower() in ("0", "off", "false"):
        return False, FastPathSettings()
    if text.lower() in ("", "1", "on", "true"):
        return True, FastPathSettings()
    fields = {f.name: f for f in dataclasses.fields(FastPathSettings)}
    changes = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in fields or not sep:
            raise ValueError(f"fast paths '{spec}': expected 0, 1 or name=value,... with names "
                             f"{', '.join(fields)}; got '{item.strip()}'")
        if fields[name].type in (bool, "bool"):
            if value not in ("0", "1"):
                raise ValueError(f"fast paths '{spec}': {name} takes 0 or 1, got '{value}'")
            changes[name] = value == "1"
        else:
            if value not in PROXY_ATTENTIONS:
                raise ValueError(f"fast paths '{spec}': {name} takes one of {', '.join(PROXY_ATTENTIONS)}, got '{value}'")
            changes[name] = value
    return True, FastPathSettings(**changes)


ENABLED, SETTINGS = parse(os.environ.get(SWITCH_ENV, "1"))


def set_enabled(enabled: bool) -> bool:
    """Turn every fast path on or off (process-wide); returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    return previous


def configure(spec: str) -> tuple[bool, FastPathSettings]:
    """Apply a switch value (see :func:`parse`) process-wide; returns the previous state for
    :func:`restore`."""
    global ENABLED, SETTINGS
    previous = (ENABLED, SETTINGS)
    ENABLED, SETTINGS = parse(spec)
    return previous


def restore(state: tuple[bool, FastPathSettings]) -> None:
    global ENABLED, SETTINGS
    ENABLED, SETTINGS = state


def current() -> str:
    """The state as a switch value: ``0``, ``1`` (the defaults) or ``name=value,...``."""
    return SETTINGS.spec() if ENABLED else "0"


# ---------------------------------------------------------------------------------------------
# fp32 CPU matmuls through oneDNN. torch's fp32 F.linear goes to MKL's sgemm, which on AMD
# processors runs its AVX2 kernels; oneDNN (bundled with torch, what it already uses for bf16)
# runs AVX-512 there. Its dense linear primitive is the op torch's own compiler emits
# (``torch.ops.mkldnn._linear_pointwise``): fp32 products and fp32 sums, as MKL.
# ---------------------------------------------------------------------------------------------
def _onednn_op() -> Optional[Callable]:
    """The op, where this torch build has it and oneDNN can use it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _cpu_has_avx512() -> bool:
    """oneDNN has no kernels wider than MKL's without AVX-512 (or AMX)."""
    try:
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
    except (AttributeError, RuntimeError):
        return False


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _probe_speedup(op: Callable) -> float:
    """MKL time / oneDNN time of one layer's forward and backward products; 0 where oneDNN's
    result differs from MKL's (a broken build)."""
    rows, fan_in, fan_out = ONEDNN_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)  # a private generator: the caller's random stream is untouched
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g)
    grad, b = torch.randn(rows, fan_out, generator=g), torch.randn(fan_out, generator=g)
    if not torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-3):
        return 0.0

    def mkl():
        F.linear(x, w, b), grad.t() @ x, grad @ w

    def onednn():
        op(x, w, b, "none", [], ""), op(grad.t(), x.t(), None, "none", [], ""), op(grad, w.t(), None, "none", [], "")

    mkl(), onednn()  # warm-up: oneDNN builds its primitives
    best = {mkl: float("inf"), onednn: float("inf")}
    for _ in range(ONEDNN_PROBE_ROUNDS):  # alternating, so that other load falls on both alike
        for fn in best:
            best[fn] = min(best[fn], _seconds(fn))
    return best[mkl] / best[onednn]


@functools.lru_cache(maxsize=None)
def onednn_linear_speedup() -> float:
    """oneDNN's speed over MKL's for this machine's fp32 matmuls, measured once (at the first
    matmul that could use it); 0 where oneDNN has no wider kernels or no op."""
    op = _onednn_op()
    if op is None or not _cpu_has_avx512():
        return 0.0
    speedup = _probe_speedup(op)
    LOGGER.debug("oneDNN fp32 linear: %.2fx MKL's speed on %s", speedup, torch.backends.cpu.get_cpu_capability())
    return speedup


def onednn_linear_faster() -> bool:
    """Whether fp32 CPU matmuls go to oneDNN here."""
    return onednn_linear_speedup() >= ONEDNN_MIN_SPEEDUP


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` through oneDNN, with its three backward matmuls through oneDNN as well."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t())  # (..., in) = grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = _onednn(grad2.t(), x.reshape(-1, x.shape[-1]).t())  # (out, in) = grad^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on a CPU, outside autocast (which would not see the Function) and outside compiled
    code (where inductor picks its own kernels), on a machine where oneDNN measured faster."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and onednn_linear_faster())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where that is faster (see above)."""
    if uses_onednn(x, weight):
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# The weights the fast paths compute from parameters. Each module that runs a fast path declares
# them (``fast_weights = fast_paths.xxx_weights`` in its class, called as a method): they are what
# the low-precision copies are made of (clipvip.model.low_precision).
# ---------------------------------------------------------------------------------------------
def _declared(module: nn.Module, key: tuple, build: Callable[[], dict]) -> dict[str, Derived]:
    """``build()``, remembered on ``module`` while ``key`` (what it depends on) stays the same: the
    same dict, so that the copies' bookkeeping compares by identity (low_precision.WeightCopies)."""
    memo = module.__dict__.get("_fast_weight_decl")
    if memo is None or memo[0] != key:
        memo = module.__dict__["_fast_weight_decl"] = (key, build())
    return memo[1]


def _ids(*modules: nn.Module) -> tuple:
    """Which parameter objects the modules hold (a declaration names them; ``_parameters``: the
    cheap way to list a module's own, this runs once per module per optimizer step)."""
    return tuple(id(p) for m in modules for p in m._parameters.values())


def attention_weights(attn) -> dict[str, Derived]:
    """The fused QKV weight and bias (q, k, v stacked) and the output projection's."""
    q, k, v, out = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def build():
        if attn.attn_implementation != "sdpa":
            return {}
        return {"qkv_weight": Derived((q.weight, k.weight, v.weight)), "qkv_bias": Derived((q.bias, k.bias, v.bias)),
                "out_weight": Derived((out.weight,)), "out_bias": Derived((out.bias,))}

    return _declared(attn, (attn.attn_implementation, _ids(q, k, v, out)), build)


def mlp_weights(mlp) -> dict[str, Derived]:
    """fc1 and fc2, with quick_gelu's scalings in them where it is folded (see :func:`mlp`)."""
    def build():
        if not mlp.fold_activation:
            return {}
        a = QUICK_GELU_ALPHA if mlp.activation_name == "quick_gelu" else 1.0
        return {"fc1_weight": Derived((mlp.fc1.weight,), a), "fc1_bias": Derived((mlp.fc1.bias,), a),
                "fc2_weight": Derived((mlp.fc2.weight,), 1.0 / a), "fc2_bias": Derived((mlp.fc2.bias,))}

    return _declared(mlp, (mlp.fold_activation, mlp.activation_name, _ids(mlp.fc1, mlp.fc2)), build)


def patch_weights(embeddings) -> dict[str, Derived]:
    """The patchifying convolution's weight as the (D, C*p*p) matrix of its matmul."""
    conv = embeddings.patch_embedding

    def build():
        if not (embeddings.fast_paths and SETTINGS.patch_matmul and _patchifies(conv)):
            return {}
        return {"patch_weight": Derived((conv.weight,)),
                **({"patch_bias": Derived((conv.bias,))} if conv.bias is not None else {})}

    return _declared(embeddings, (embeddings.fast_paths, SETTINGS.patch_matmul, _ids(conv)), build)


def projection_weights(towers) -> dict[str, Derived]:
    """The two towers' output projections (no bias in CLIP)."""
    eager = not towers.vision_model.embeddings.fast_paths  # the original formulation takes no fast path

    def build():
        if eager:
            return {}
        return {"visual_projection": Derived((towers.visual_projection.weight,)),
                "text_projection": Derived((towers.text_projection.weight,))}

    return _declared(towers, (eager, _ids(towers.visual_projection, towers.text_projection)), build)


@contextlib.contextmanager
def weight_copies(model: nn.Module, dtype: Optional[torch.dtype]):
    """Inside: the fast paths of ``model`` read the low-precision copies of their weights (made
    here where the parameters changed since the last time: once per optimizer step) wherever they
    run under an autocast of ``dtype``. A no-op for ``dtype`` None (fp32) or with the switch off.
    Open it around a whole optimizer step's micro-batches, or a whole evaluation."""
    if dtype is None or not (ENABLED and SETTINGS.weight_copies):
        yield None
        return
    copies = WeightCopies(model, dtype)
    copies.refresh()
    try:
        yield copies
    finally:
        copies.release()


# ---------------------------------------------------------------------------------------------
# The layer's pieces
# ---------------------------------------------------------------------------------------------
def fused_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The three projections as one (B*S, D) x (D, 3D) matmul: x (..., D) -> (..., 3, H, hd)."""
    out = linear(x, weight, bias)
    return out.view(*x.shape[:-1], 3, num_heads, x.shape[-1] // num_heads)


def proxy_attention_variant(device: torch.device) -> str:
    """The proxy-guided attention to run on ``device``: the setting, or for ``auto`` ``views``
    on GPUs and ``cat`` elsewhere (module docstring)."""
    variant = SETTINGS.proxy_attention
    if variant != "auto":
        return variant
    return "views" if device.type == "cuda" else "cat"


def self_attention(attn, x: torch.Tensor, attn_mask: Optional[torch.Tensor], layout, dropout_p: float) -> torch.Tensor:
    """``attn(x)`` of a :class:`~clipvip.model.layers.CLIPAttention` through the fast paths: the
    fused QKV projection (with this step's low-precision weights where there are some), the
    attention the settings choose, the output projection. x (B, S, D) -> (B, S, D)."""
    B, S, D = x.shape
    H = attn.num_heads
    weights = active(attn, x)
    if weights is None:  # the weights are concatenated per call (3*D*D elements, small next to x)
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        weights = {"qkv_weight": torch.cat([q.weight, k.weight, v.weight]),
                   "qkv_bias": torch.cat([q.bias, k.bias, v.bias]),
                   "out_weight": attn.out_proj.weight, "out_bias": attn.out_proj.bias}
    proxies = layout is not None and layout.num_frames > 1
    variant = proxy_attention_variant(x.device) if proxies else None
    chosen = SETTINGS.proxy_attention != "auto"  # a variant asked for by name runs wherever it is asked
    if variant == "views":
        M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
        qkv = fused_qkv(attention.frame_major_tokens(x, layout), weights["qkv_weight"], weights["qkv_bias"], H)
        out = attention.frame_major_attention(qkv.view(B, T, M + L, 3, H, D // H), layout, dropout_p)
    else:
        qkv = fused_qkv(x, weights["qkv_weight"], weights["qkv_bias"], H)  # (B, S, 3, H, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, hd) views
        if not chosen and prefers_bmm_attention(q):
            out = (attention.eager_proxy_guided_attention(q, k, v, layout, dropout_p) if proxies
                   else attention.eager_attention(q, k, v, attn_mask, dropout_p))
        elif not proxies:  # one frame (or text): every token may attend to every other, up to attn_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif variant == "buffer":
            out = attention.buffer_proxy_attention(qkv, layout, dropout_p)
        elif variant == "mask":
            out = attention.masked_proxy_attention(q, k, v, layout, dropout_p)
        elif variant == "flex":
            out = attention.flex_proxy_attention(q, k, v, layout, dropout_p)
        else:  # cat
            out = attention.proxy_guided_attention(q, k, v, layout, dropout_p)
    out = out.transpose(1, 2).reshape(B, S, D)  # free: out is laid out as (B, S, H, hd)
    return linear(out, weights["out_weight"], weights["out_bias"])


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """``fc2(act(fc1(x)))`` of a :class:`~clipvip.model.layers.CLIPMLP`: with this step's
    low-precision weights where there are some (quick_gelu's scalings already in them), else
    :func:`quick_gelu_mlp` for quick_gelu and the written formula for other activations."""
    weights = active(module, x)
    if weights is None:
        if module.activation_name == "quick_gelu":
            return quick_gelu_mlp(x, module.fc1, module.fc2)
        return module.fc2(module.activation(module.fc1(x)))
    z = F.linear(x, weights["fc1_weight"], weights["fc1_bias"])
    if module.activation_name == "quick_gelu":  # z = a*h: quick_gelu(h) * a = silu(z); 1/a is in fc2
        z = F.silu(z, inplace=not (torch.is_grad_enabled() and z.requires_grad))
    else:
        z = module.activation(z)
    return F.linear(z, weights["fc2_weight"], weights["fc2_bias"])


def quick_gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(quick_gelu(fc1(x)))`` with the activation's scalings folded into the two matmuls.

    quick_gelu(h) = h * sigmoid(a*h) = silu(a*h) / a, with a = 1.702. ``a`` goes into fc1's GEMM
    (``addmm`` alpha/beta) and ``1/a`` into fc2's, so one elementwise pass (silu) is left of the
    three of the written-out formula. In training the weights are scaled instead: the backward of
    an ``addmm`` with alpha scales its activation-sized gradients once more (a demo training step
    2-7 % faster this way, docs/performance.md). x: (..., D) -> (..., D).
    """
    a = QUICK_GELU_ALPHA
    # In place where no gradient needs z (evaluation): one buffer less.
    in_place = lambda z: not (torch.is_grad_enabled() and z.requires_grad)  # noqa: E731
    if uses_onednn(x, fc1.weight) or (torch.is_grad_enabled() and fc1.weight.requires_grad):
        # Scale the weights instead (weight-sized, not activation-sized work): oneDNN's primitive
        # has no alpha/beta, and in training addmm's backward would scale the activation-sized
        # gradients by alpha again, one more pass over them per product.
        z = linear(x, fc1.weight * a, fc1.bias * a)  # (..., I) = a*h
        return linear(F.silu(z, inplace=in_place(z)), fc2.weight * (1.0 / a), fc2.bias)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, D)
    z = torch.addmm(fc1.bias, x, fc1.weight.t(), beta=a, alpha=a)  # (N, I) = a*h
    out = torch.addmm(fc2.bias, F.silu(z, inplace=in_place(z)), fc2.weight.t(), alpha=1.0 / a)  # (N, D)
    return out.view(*shape[:-1], out.shape[-1])


def _patchifies(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` cuts its input into non-overlapping square patches (kernel = stride)."""
    p = conv.kernel_size[0]
    return (conv.kernel_size == conv.stride and conv.kernel_size[1] == p and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


def patch_embedding(frames: torch.Tensor, conv: nn.Conv2d, weights: Optional[dict] = None) -> torch.Tensor:
    """``conv(frames).flatten(2).transpose(1, 2)`` for the patchifying convolution (kernel =
    stride = p) as one matmul over the frames cut into patches (faster forward and weight
    gradient: one thread on a CPU, 0.62-0.81x the convolution's time for the demo's 64x64 frames,
    0.76-0.93x for 224x224 at patch 32 and 16, AVX-512 and AVX2 kernels alike, docs/performance.md;
    on an H200 ~0.3 ms where cuDNN's convolution took 7 ms forward + weight gradient, issue 23).
    ``weights``: this step's low-precision ``patch_weight`` (and ``patch_bias``), if any. For a
    shape the patches do not tile, the convolution.
    frames (N, C, H, W) -> (N, L, D), L = (H/p)*(W/p) in the convolution's row-major order.
    """
    p = conv.kernel_size[0]
    N, C, H, W = frames.shape
    if not _patchifies(conv) or H % p or W % p:
        return conv(frames).flatten(2).transpose(1, 2)
    if weights is not None:
        weight, bias = weights["patch_weight"], weights.get("patch_bias")
    else:
        weight, bias = conv.weight.reshape(conv.out_channels, -1), conv.bias
    low = _autocast_dtype(frames.device.type)
    if low is not None:  # cast before the copy below, as the matmul would after it: half its bytes
        frames = frames.to(low)
    # (N, C, H/p, p, W/p, p) -> (N, H/p, W/p, C, p, p): each patch's pixels in the weight's order
    patches = frames.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p * p)
    out = F.linear(patches, weight, bias)  # (N*L, D)
    return out.view(N, (H // p) * (W // p), conv.out_channels)


def embed_patches(embeddings, frames: torch.Tensor) -> torch.Tensor:
    """The patch embedding of :class:`~clipvip.model.clip_vip.VideoEmbeddings` through the fast
    paths: :func:`patch_embedding` where ``patch_matmul`` is on, else the convolution.
    frames (N, C, H, W) -> (N, L, D)."""
    conv = embeddings.patch_embedding
    if not SETTINGS.patch_matmul:
        return conv(frames).flatten(2).transpose(1, 2)
    return patch_embedding(frames, conv, active(embeddings, frames))


def project(towers, name: str, x: torch.Tensor) -> torch.Tensor:
    """``getattr(towers, name)(x)`` for the output projections, with this step's low-precision
    weight where there is one."""
    weights = active(towers, x)
    if weights is None:
        return getattr(towers, name)(x)
    return F.linear(x, weights[name])


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type``; None where it is off (or has no mode
    for the device, e.g. ``meta``)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def prefers_bmm_attention(x: torch.Tensor) -> bool:
    """bf16/fp16 on a CPU: bmm + softmax beats torch's CPU SDPA kernel for these short sequences."""
    return x.device.type == "cpu" and (x.dtype != torch.float32 or _autocast_dtype("cpu") not in (None, torch.float32))


def describe(device: torch.device) -> dict:
    """What the fast paths do on ``device`` (for benchmark reports); measures oneDNN if not yet done."""
    return {"enabled": ENABLED, "switch": f"{SWITCH_ENV}={current()}",
            "settings": dataclasses.asdict(SETTINGS),
            "proxy_attention": proxy_attention_variant(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_fp32_linear": device.type == "cpu" and onednn_linear_faster(),
            "onednn_speedup_measured": round(onednn_linear_speedup(), 2) if device.type == "cpu" else None}
