"""The CLIP encoder layer both towers share, with plain and proxy-guided attention.

Parameter names follow HF ``transformers`` CLIP (``self_attn.q_proj``, ``layer_norm1``,
``mlp.fc1``, ...) so released checkpoints and HF CLIP weights load by name.

Shapes: B batch, S sequence, D width, H heads, hd = D / H head width; for video
M = 1 + add_cls_num proxy tokens (CLS first), T frames, L patches per frame, S = M + T*L.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class ProxyLayout:
    """Token layout of a video sequence: M proxy tokens (CLS first), then T frames of L patches."""

    num_proxies: int  # M
    num_frames: int  # T
    patches_per_frame: int  # L


# ---------------------------------------------------------------------------------------------
# Matmuls. On CPUs, torch's fp32 F.linear goes to MKL's sgemm, which on AMD processors runs its
# AVX2 kernels; oneDNN (bundled with torch, what it already uses for bf16) runs AVX-512 there and
# measured 2.0-2.4x faster on the 2-core EPYC of docs/performance.md, forward and backward. The
# fast path therefore sends fp32 CPU matmuls to oneDNN's dense linear primitive (the op torch's
# own compiler emits, ``torch.ops.mkldnn._linear_pointwise``) where it exists; same arithmetic
# (fp32 products, fp32 sums: results differ by summation order only). Off with
# ``CLIPVIP_ONEDNN_LINEAR=0`` or ``layers.ONEDNN_LINEAR = False``.
# The gain is AVX-512's: on an AVX2-only EPYC oneDNN has no wider kernels than MKL and measured
# slower (the demo's CLIP-ViP step 310 ms against 276 ms on one thread; a B/32-shaped tower's
# training step 0.81-0.86x), so the path is on only where torch reports AVX-512 (or AMX) kernels.
# ``CLIPVIP_ONEDNN_LINEAR=1`` forces it on, ``0`` off.
# ---------------------------------------------------------------------------------------------
def _onednn_linear_op():
    """The op, if this torch build has it and it computes a product correctly; else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "none", [], "")
        return op if torch.equal(probe, torch.full((2, 4), 3.0)) else None
    except (AttributeError, RuntimeError):
        return None


def _cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
    except (AttributeError, RuntimeError):
        return False


def _onednn_linear_wanted() -> bool:
    switch = os.environ.get("CLIPVIP_ONEDNN_LINEAR", "")
    if switch in ("0", "1"):
        return switch == "1"
    return _cpu_has_avx512()


_ONEDNN = _onednn_linear_op()
ONEDNN_LINEAR = _ONEDNN is not None and _onednn_linear_wanted()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _ONEDNN(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
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


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; fp32 CPU matmuls go to oneDNN (see above)."""
    if _uses_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# Attention implementations. "sdpa" (default) is the fast path; "eager" is the original
# formulation (HF CLIP's bmm + softmax, CLIP-ViP's per-frame copies of the proxy keys/values),
# kept as the measurable baseline of ``python -m clipvip bench --attn eager`` and selected with
# ``model.set_attention("eager")`` or the config key ``attn_implementation``. Both compute the
# same function (tests hold them within 1e-5); they differ in speed and memory only.
# ---------------------------------------------------------------------------------------------
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def check_attention_implementation(name: str) -> str:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation '{name}'; known: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return name


def proxy_guided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0
) -> torch.Tensor:
    """Proxy-guided attention of CLIP-ViP (the SDPA formulation).

    q, k, v: (B, H, S, hd) with S = M + T*L (any strides with a contiguous last dim).
    Returns (B, H, S, hd), laid out in memory as (B, S, H, hd) so that the caller's
    ``transpose(1, 2).reshape(B, S, D)`` is free.
    - proxy/CLS queries attend to all S tokens;
    - a patch query of frame t attends to the M proxies and the L patches of frame t.
    """
    B, H, S, hd = q.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    assert S == M + T * L, f"sequence {S} != {M} + {T}*{L}"
    # Work in (batch, seq, heads, hd): frames then fold into the batch by a reshape, and SDPA
    # takes the (B', H, S', hd) views of these without further copies.
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, hd) views

    out_proxy = F.scaled_dot_product_attention(
        q[:, :M].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)  # (B, H, M, hd)

    # Frames folded into the batch; keys/values of a frame = the M proxies (broadcast) + its L
    # patches. The expand is free; the cat writes each frame's (M+L) keys once, which costs less
    # than any formulation without it that we measured (see docs/performance.md).
    q_patch = q[:, M:].reshape(B * T, L, H, hd)
    k_frame = torch.cat([k[:, None, :M].expand(B, T, M, H, hd), k[:, M:].reshape(B, T, L, H, hd)], dim=2)
    v_frame = torch.cat([v[:, None, :M].expand(B, T, M, H, hd), v[:, M:].reshape(B, T, L, H, hd)], dim=2)
    out_patch = F.scaled_dot_product_attention(
        q_patch.transpose(1, 2),
        k_frame.reshape(B * T, M + L, H, hd).transpose(1, 2),
        v_frame.reshape(B * T, M + L, H, hd).transpose(1, 2),
        dropout_p=dropout_p)  # (B*T, H, L, hd)
    out = torch.cat([out_proxy.transpose(1, 2), out_patch.transpose(1, 2).reshape(B, T * L, H, hd)], dim=1)
    return out.transpose(1, 2)  # (B, H, S, hd) view of (B, S, H, hd)


def _dropout(probs: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(probs, p) if p > 0 else probs


def eager_proxy_guided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0
) -> torch.Tensor:
    """The original CLIP-ViP formulation: per-frame copies of the proxy keys/values (``repeat``),
    ``bmm`` + softmax. q, k, v: (B, H, S, hd) -> (B, H, S, hd)."""
    B, H, S, hd = q.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    q, k, v = (x.reshape(B * H, S, hd) for x in (q, k, v))
    q = q * hd ** -0.5
    # Proxy/CLS queries: all tokens.
    probs = _dropout(torch.softmax(torch.bmm(q[:, :M], k.transpose(1, 2)), dim=-1), dropout_p)
    out_proxy = torch.bmm(probs, v)  # (B*H, M, hd)
    # Patch queries, one group per frame; keys = the proxies repeated per frame + that frame's patches.
    q_patch = q[:, M:].reshape(B * H * T, L, hd)
    k_frame = torch.cat([k[:, :M].repeat(1, T, 1).reshape(B * H * T, M, hd), k[:, M:].reshape(B * H * T, L, hd)], 1)
    v_frame = torch.cat([v[:, :M].repeat(1, T, 1).reshape(B * H * T, M, hd), v[:, M:].reshape(B * H * T, L, hd)], 1)
    probs = _dropout(torch.softmax(torch.bmm(q_patch, k_frame.transpose(1, 2)), dim=-1), dropout_p)
    out_patch = torch.bmm(probs, v_frame).reshape(B * H, T * L, hd)
    return torch.cat([out_proxy, out_patch], dim=1).reshape(B, H, S, hd)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """HF CLIP's eager attention: additive mask, ``bmm`` + softmax.

    q, k, v: (B, H, S, hd); attn_mask: bool (B, 1, S, S), True = may attend. -> (B, H, S, hd).
    """
    B, H, S, hd = q.shape
    q, k, v = (x.reshape(B * H, S, hd) for x in (q, k, v))
    scores = torch.bmm(q * hd ** -0.5, k.transpose(1, 2)).view(B, H, S, S)
    if attn_mask is not None:
        additive = torch.zeros(attn_mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + additive.masked_fill_(~attn_mask, torch.finfo(scores.dtype).min)
    probs = _dropout(torch.softmax(scores, dim=-1), dropout_p).view(B * H, S, S)
    return torch.bmm(probs, v).view(B, H, S, hd)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, attn_implementation: str = "sdpa"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.attn_implementation = check_attention_implementation(attn_implementation)
        # Separate projections, as HF names them (checkpoints load by name); the sdpa path runs
        # them as one fused (3D, D) matmul.
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _qkv_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One (B*S, D) x (D, 3D) matmul instead of three; the weights are concatenated per call
        (3*D*D elements, small next to the activations) so that they stay HF's three parameters."""
        B, S, D = x.shape
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3D, D)
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # (3D,)
        qkv = linear(x, weight, bias).view(B, S, 3, self.num_heads, self.head_dim)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))  # 3 x (B, H, S, hd) views

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        layout: Optional[ProxyLayout] = None,
    ) -> torch.Tensor:
        """x: (B, S, D); attn_mask: bool (B, 1, S, S), True = may attend; layout: video token layout."""
        B, S, D = x.shape
        dropout_p = self.dropout if self.training else 0.0
        proxies = layout is not None and layout.num_frames > 1
        eager = self.attn_implementation == "eager"
        if eager:
            split = lambda t: t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, S, hd)
        else:
            q, k, v = self._qkv_fused(x)  # (B, H, S, hd)
        # bf16 on a CPU: torch's CPU SDPA kernel is 2.5-3x slower than bmm + softmax for these short
        # sequences (forward and backward; docs/performance.md), so the fast path uses bmm there too.
        use_bmm = eager or (q.device.type == "cpu" and q.dtype != torch.float32)
        if use_bmm:
            if proxies:
                out = eager_proxy_guided_attention(q, k, v, layout, dropout_p)
            else:
                out = eager_attention(q, k, v, attn_mask, dropout_p)
        elif proxies:
            out = proxy_guided_attention(q, k, v, layout, dropout_p)
        else:
            # One frame (or text): every token may attend to every other, up to attn_mask.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, S, D)
        if eager:
            return self.out_proj(out)
        return linear(out, self.out_proj.weight, self.out_proj.bias)


QUICK_GELU_ALPHA = 1.702


def quick_gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(quick_gelu(fc1(x)))`` with the activation's scalings folded into the two matmuls.

    quick_gelu(h) = h * sigmoid(a*h) = silu(a*h) / a, with a = 1.702. ``a`` goes into fc1's GEMM
    (``addmm`` alpha/beta) and ``1/a`` into fc2's, so one elementwise pass (silu) is left of the
    three (mul, sigmoid, mul) of the written-out formula. Same function up to float rounding.
    x: (..., D) -> (..., D).
    """
    a = QUICK_GELU_ALPHA
    if _uses_onednn(x, fc1.weight):
        # oneDNN's primitive has no alpha/beta: scale the weights instead (weight-sized, not
        # activation-sized work).
        z = linear(x, fc1.weight * a, fc1.bias * a)  # (..., I) = a*h
        z = F.silu(z, inplace=not (torch.is_grad_enabled() and z.requires_grad))
        return linear(z, fc2.weight * (1.0 / a), fc2.bias)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, D)
    z = torch.addmm(fc1.bias, x, fc1.weight.t(), beta=a, alpha=a)  # (N, I) = a*h
    # In place where no gradient needs z (evaluation): one buffer less.
    z = F.silu(z, inplace=not (torch.is_grad_enabled() and z.requires_grad))
    out = torch.addmm(fc2.bias, z, fc2.weight.t(), alpha=1.0 / a)  # (N, D)
    return out.view(*shape[:-1], out.shape[-1])


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; known: {sorted(ACTIVATIONS)}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.fold_activation = True  # quick_gelu folded into the matmuls (False: as written, "eager")
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_activation and self.activation_name == "quick_gelu":
            return quick_gelu_mlp(x, self.fc1, self.fc2)
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.self_attn = CLIPAttention(D, config.num_attention_heads, getattr(config, "attention_dropout", 0.0))
        self.layer_norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(D, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def set_implementation(self, name: str) -> None:
        """``"sdpa"``: fused QKV, SDPA, quick_gelu folded into the MLP matmuls; ``"eager"``: the
        original layer (three projections, bmm + softmax attention, quick_gelu as written)."""
        self.self_attn.attn_implementation = check_attention_implementation(name)
        self.mlp.fold_activation = name == "sdpa"

    def forward(self, x, attn_mask=None, layout=None):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask=attn_mask, layout=layout)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, x, attn_mask=None, layout=None):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, layout, use_reentrant=False)
            else:
                x = layer(x, attn_mask, layout)
        return x
