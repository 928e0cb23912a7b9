"""Faster ways to compute what the encoder layer of :mod:`clipvip.model.layers` computes.

Every fast path here computes the same function as the plain PyTorch it replaces (up to float
summation order; tests/test_fast_model.py holds them together) and is taken only where it is
faster on the machine running it:

- ``fused_qkv``: one (D, 3D) projection instead of three (D, D) ones, one pass over x; and
- ``quick_gelu_mlp``: quick_gelu's two scalings folded into the MLP's matmuls, one elementwise
  pass (silu) left of the three (mul, sigmoid, mul). Both are PyTorch and do less work than what
  they replace on any device, so they need no measurement;
- ``linear``: fp32 CPU matmuls through oneDNN instead of MKL, on CPUs with AVX-512 and only
  where a one-time measurement at the first matmul finds it faster (:func:`onednn_linear_speedup`);
- ``patch_embedding``: on a CPU, the patchifying convolution as one matmul over the frames
  cut into patches (faster forward and weight gradient, measured on AVX-512 and AVX2 kernels);
- ``prefers_bmm_attention``: in bf16/fp16 on a CPU, attention as bmm + softmax, because torch's
  CPU SDPA kernel is 2.5-3x slower there for these short sequences (docs/performance.md).

All of them sit behind ONE switch, :data:`ENABLED` (``CLIPVIP_FAST_PATHS=0`` in the environment
or :func:`set_enabled` turns them off: then the ``sdpa`` layers run the plain PyTorch of
layers.py). The ``eager`` implementation (the original formulation) never takes them.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipvip.logging_utils import get_logger

LOGGER = get_logger("fast_paths")

SWITCH_ENV = "CLIPVIP_FAST_PATHS"
ENABLED = os.environ.get(SWITCH_ENV, "1") != "0"

QUICK_GELU_ALPHA = 1.702  # quick_gelu(h) = h * sigmoid(1.702 * h)

# The oneDNN decision: a matmul of a mid-sized layer of the model (rows x in -> out), timed
# forward and as the two backward products, against MKL; oneDNN is taken only when it is at
# least ONEDNN_MIN_SPEEDUP times faster. The margin keeps the decision the same run after run
# (runs that resume each other must take the same kernels): measured 2.0x on the AVX-512 EPYC
# of docs/performance.md (1.2x with oneDNN held to AVX2 there, where the AVX-512 check already
# says no), and oneDNN lost on an AVX2-only EPYC.
ONEDNN_PROBE_SHAPE = (1024, 512, 512)
ONEDNN_MIN_SPEEDUP = 1.5
ONEDNN_PROBE_ROUNDS = 5


def set_enabled(enabled: bool) -> bool:
    """Turn every fast path on or off (process-wide); returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    return previous


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
# The layer's pieces
# ---------------------------------------------------------------------------------------------
def fused_qkv(x: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
              num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three projections as one (B*S, D) x (D, 3D) matmul. The weights are concatenated per
    call (3*D*D elements, small next to the activations) so that they stay HF's three parameters.
    x: (B, S, D) -> q, k, v: 3 x (B, H, S, hd) views of one (B, S, 3, H, hd) buffer."""
    B, S, D = x.shape
    weight = torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])  # (3D, D)
    bias = torch.cat([q_proj.bias, k_proj.bias, v_proj.bias])  # (3D,)
    qkv = linear(x, weight, bias).view(B, S, 3, num_heads, D // num_heads)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


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


def patch_embedding(frames: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(frames).flatten(2).transpose(1, 2)`` for the patchifying convolution (kernel =
    stride = p) as one matmul over the frames cut into patches; on a CPU, where it is faster
    (fwd + weight gradient, one thread: 0.62-0.81x the convolution's time for the demo's 64x64
    frames, 0.76-0.93x for 224x224 at patch 32 and 16, AVX-512 and AVX2 kernels alike;
    docs/performance.md). Elsewhere, or for a shape it does not cover, the convolution.
    frames (N, C, H, W) -> (N, L, D), L = (H/p)*(W/p) in the convolution's row-major order.
    """
    p = conv.kernel_size[0]
    N, C, H, W = frames.shape
    if (frames.device.type != "cpu" or conv.kernel_size != conv.stride or conv.kernel_size[1] != p
            or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1 or H % p or W % p):
        return conv(frames).flatten(2).transpose(1, 2)
    # (N, C, H/p, p, W/p, p) -> (N, H/p, W/p, C, p, p): each patch's pixels in the weight's order
    patches = frames.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p * p)
    out = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (N*L, D)
    return out.view(N, (H // p) * (W // p), conv.out_channels)


def prefers_bmm_attention(q: torch.Tensor) -> bool:
    """bf16/fp16 on a CPU: bmm + softmax beats torch's CPU SDPA kernel for these short sequences."""
    return q.device.type == "cpu" and q.dtype != torch.float32


def describe(device: torch.device) -> dict:
    """What the fast paths do on ``device`` (for benchmark reports); measures oneDNN if not yet done."""
    return {"enabled": ENABLED, "switch": f"{SWITCH_ENV}={int(ENABLED)}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_fp32_linear": device.type == "cpu" and onednn_linear_faster(),
            "onednn_speedup_measured": round(onednn_linear_speedup(), 2) if device.type == "cpu" else None}
