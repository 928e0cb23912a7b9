"""The CLIP encoder layer both towers share, with plain and proxy-guided attention.

This is the model as the paper describes it, in plain PyTorch. Faster ways to compute the same
function on particular machines (fused projections, a folded activation, oneDNN matmuls, CPU
bf16 attention kernels) live in :mod:`clipvip.model.fast_paths`, behind one switch.

Parameter names follow HF ``transformers`` CLIP (``self_attn.q_proj``, ``layer_norm1``,
``mlp.fc1``, ...) so released checkpoints and HF CLIP weights load by name.

Shapes: B batch, S sequence, D width, H heads, hd = D / H head width; for video
M = 1 + add_cls_num proxy tokens (CLS first), T frames, L patches per frame, S = M + T*L.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipvip.model import fast_paths


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(fast_paths.QUICK_GELU_ALPHA * x)


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
# Attention implementations. "sdpa" (default): attention through torch's SDPA kernels, and the
# fast paths of clipvip.model.fast_paths where its switch is on; "eager": the original
# formulation (HF CLIP's three projections and bmm + softmax, CLIP-ViP's per-frame copies of the
# proxy keys/values, quick_gelu as written), the measurable baseline of ``python -m clipvip
# bench`` selected with ``model.set_attention("eager")`` or the config key
# ``attn_implementation``. Both compute the same function (tests hold them within 1e-5); they
# differ in speed and memory only.
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
        # Separate projections, as HF names them: checkpoints load by name.
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

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
        fast = not eager and fast_paths.ENABLED
        if fast:
            q, k, v = fast_paths.fused_qkv(x, self.q_proj, self.k_proj, self.v_proj, self.num_heads)
        else:
            split = lambda t: t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, S, hd)
        if eager or (fast and fast_paths.prefers_bmm_attention(q)):
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
        if fast:
            return fast_paths.linear(out, self.out_proj.weight, self.out_proj.bias)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; known: {sorted(ACTIVATIONS)}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.fold_activation = True  # may fold quick_gelu into the matmuls (a fast path; False: "eager")
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_activation and self.activation_name == "quick_gelu" and fast_paths.ENABLED:
            return fast_paths.quick_gelu_mlp(x, self.fc1, self.fc2)
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
        """``"sdpa"``: SDPA attention, and the fast paths where their switch is on; ``"eager"``:
        the original layer (three projections, bmm + softmax attention, quick_gelu as written)."""
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
