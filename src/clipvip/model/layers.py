"""The CLIP encoder layer both towers share, with plain and proxy-guided attention.

This is the model as the paper describes it, in plain PyTorch; the attention itself, plain and
proxy-guided, is written in :mod:`clipvip.model.attention`. Faster ways to compute the same
function on particular machines (fused projections, a folded activation, oneDNN matmuls, CPU
bf16 attention kernels, low-precision weight copies, other layouts of proxy-guided attention)
live in :mod:`clipvip.model.fast_paths`, behind its switches (one master switch and named ones):
the layers below hand their whole forward to it where it is on.

Parameter names follow HF ``transformers`` CLIP (``self_attn.q_proj``, ``layer_norm1``,
``mlp.fc1``, ...) so released checkpoints and HF CLIP weights load by name.

Shapes: B batch, S sequence, D width, H heads, hd = D / H head width; for video
M = 1 + add_cls_num proxy tokens (CLS first), T frames, L patches per frame, S = M + T*L.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipvip.model import attention, fast_paths
from clipvip.model.attention import (ProxyLayout, eager_attention, eager_proxy_guided_attention,  # noqa: F401 (re-exported)
                                     proxy_guided_attention)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(fast_paths.QUICK_GELU_ALPHA * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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

    # The weights its fast path computes from the parameters (the fused QKV): what low-precision copies are made of.
    fast_weights = fast_paths.attention_weights

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
        if self.attn_implementation == "sdpa" and fast_paths.ENABLED:
            return fast_paths.self_attention(self, x, attn_mask, layout if proxies else None, dropout_p)
        split = lambda t: t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, S, hd)
        if self.attn_implementation == "eager":
            if proxies:
                out = attention.eager_proxy_guided_attention(q, k, v, layout, dropout_p)
            else:
                out = attention.eager_attention(q, k, v, attn_mask, dropout_p)
        elif proxies:
            out = attention.proxy_guided_attention(q, k, v, layout, dropout_p)
        else:
            # One frame (or text): every token may attend to every other, up to attn_mask.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))


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

    # The weights its fast path uses (quick_gelu's scalings folded in): what low-precision copies are made of.
    fast_weights = fast_paths.mlp_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_activation and fast_paths.ENABLED:
            return fast_paths.mlp(self, x)
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
