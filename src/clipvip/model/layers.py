"""The CLIP encoder layer both towers share, with plain and proxy-guided attention.

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


def proxy_guided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0
) -> torch.Tensor:
    """Proxy-guided attention of CLIP-ViP.

    q, k, v: (B, H, S, hd) with S = M + T*L. Returns (B, H, S, hd).
    - proxy/CLS queries attend to all S tokens;
    - a patch query of frame t attends to the M proxies and the L patches of frame t.
    """
    B, H, S, hd = q.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    assert S == M + T * L, f"sequence {S} != {M} + {T}*{L}"

    out_proxy = F.scaled_dot_product_attention(q[:, :, :M], k, v, dropout_p=dropout_p)  # (B, H, M, hd)

    # Per-frame keys/values: the M proxies broadcast to every frame, then that frame's patches.
    q_patch = q[:, :, M:].reshape(B, H, T, L, hd)
    k_frame = torch.cat([k[:, :, None, :M].expand(B, H, T, M, hd),
                         k[:, :, M:].reshape(B, H, T, L, hd)], dim=3)  # (B, H, T, M+L, hd)
    v_frame = torch.cat([v[:, :, None, :M].expand(B, H, T, M, hd),
                         v[:, :, M:].reshape(B, H, T, L, hd)], dim=3)  # (B, H, T, M+L, hd)
    # Fold frames into the batch so SDPA sees 4-D inputs (the layout its fused kernels take).
    fold = lambda x: x.transpose(1, 2).reshape(B * T, H, x.shape[3], hd)  # noqa: E731
    out_patch = F.scaled_dot_product_attention(fold(q_patch), fold(k_frame), fold(v_frame), dropout_p=dropout_p)
    out_patch = out_patch.reshape(B, T, H, L, hd).transpose(1, 2).reshape(B, H, T * L, hd)
    return torch.cat([out_proxy, out_patch], dim=2)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
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
        split = lambda t: t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, S, hd)
        dropout_p = self.dropout if self.training else 0.0
        if layout is not None and layout.num_frames > 1:
            out = proxy_guided_attention(q, k, v, layout, dropout_p)
        else:
            # One frame (or text): every token may attend to every other, up to attn_mask.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; known: {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
