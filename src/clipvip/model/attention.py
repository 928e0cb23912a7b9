"""Attention as the encoder layer computes it: plain, and proxy-guided (the paper's idea).

Every function here computes the same function as the others of its kind, up to float summation
order (tests/test_model.py, tests/test_fast_paths.py); they differ in speed and memory only.

Proxy-guided attention over a video's S = M + T*L tokens (M proxies, CLS first, then T frames of
L patches; :class:`ProxyLayout`):

- a proxy/CLS query attends to all S tokens;
- a patch query of frame t attends to the M proxies and the L patches of frame t.

Its formulations, all taking and returning (B, H, S, hd) unless said otherwise:

- :func:`proxy_guided_attention` (``cat``): the model as layers.py runs it: two SDPA calls, the
  frames folded into the batch, each frame's keys/values ``[proxies; its patches]`` written by
  one ``cat`` per tensor;
- :func:`eager_proxy_guided_attention`: the original CLIP-ViP code (proxy keys/values copied per
  frame with ``repeat``, ``bmm`` + softmax), the baseline of ``clipvip bench``;
- the fast-path variants that :mod:`clipvip.model.fast_paths` selects by name
  (``proxy_attention``), each avoiding the per-frame key/value ``cat`` another way:
  ``views`` (:func:`frame_major_tokens` + :func:`frame_major_attention`: the tokens are laid out
  frame by frame before the QKV projection, each frame's row holding a copy of the proxies, so
  q, k and v of every frame are views of the projection's output), ``buffer``
  (:func:`buffer_proxy_attention`: keys and values written together into one preallocated
  per-frame buffer), ``mask`` (:func:`masked_proxy_attention`: one SDPA call over all S tokens
  with a block mask: no copies, S^2 scores) and ``flex`` (:func:`flex_proxy_attention`:
  FlexAttention with the same mask as a block mask; fused only under ``torch.compile``, and
  with no backward on CPUs).

Shapes: B batch, S sequence, H heads, hd head width; N = M + L tokens of a frame-major row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProxyLayout:
    """Token layout of a video sequence: M proxy tokens (CLS first), then T frames of L patches."""

    num_proxies: int  # M
    num_frames: int  # T
    patches_per_frame: int  # L


def _dropout(probs: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(probs, p) if p > 0 else probs


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


def proxy_guided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0
) -> torch.Tensor:
    """Proxy-guided attention of CLIP-ViP (the SDPA formulation).

    q, k, v: (B, H, S, hd) with S = M + T*L (any strides with a contiguous last dim).
    Returns (B, H, S, hd), laid out in memory as (B, S, H, hd) so that the caller's
    ``transpose(1, 2).reshape(B, S, D)`` is free.
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
    # patches. The expand is free; the cat writes each frame's (M+L) keys once.
    q_patch = q[:, M:].reshape(B * T, L, H, hd)
    k_frame = torch.cat([k[:, None, :M].expand(B, T, M, H, hd), k[:, M:].reshape(B, T, L, H, hd)], dim=2)
    v_frame = torch.cat([v[:, None, :M].expand(B, T, M, H, hd), v[:, M:].reshape(B, T, L, H, hd)], dim=2)
    out_patch = F.scaled_dot_product_attention(
        q_patch.transpose(1, 2),
        k_frame.reshape(B * T, M + L, H, hd).transpose(1, 2),
        v_frame.reshape(B * T, M + L, H, hd).transpose(1, 2),
        dropout_p=dropout_p)  # (B*T, H, L, hd)
    return _join(out_proxy, out_patch, B, T, L)


def _join(out_proxy: torch.Tensor, out_patch: torch.Tensor, B: int, T: int, L: int) -> torch.Tensor:
    """(B, H, M, hd) proxy and (B*T, H, L, hd) patch outputs -> (B, H, S, hd), laid out in memory
    as (B, S, H, hd): one copy, into the layout the output projection reads."""
    H, hd = out_proxy.shape[1], out_proxy.shape[3]
    out = torch.cat([out_proxy.transpose(1, 2), out_patch.transpose(1, 2).reshape(B, T * L, H, hd)], dim=1)
    return out.transpose(1, 2)


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


# ---------------------------------------------------------------------------------------------
# Fast-path variants (selected by clipvip.model.fast_paths; the same function as the above)
# ---------------------------------------------------------------------------------------------
def frame_major_tokens(x: torch.Tensor, layout: ProxyLayout) -> torch.Tensor:
    """``views``, step 1: (B, S, D) tokens -> (B, T, M+L, D), frame t's row = [proxies; its patches].

    One copy of the layer's input (width D) instead of the per-frame copies of keys and values
    (2 x D) after the projection; the proxies are then projected T times (M/L more QKV work: 8 %
    at B/32, 2 % at B/16). Under autocast the copy is made in the autocast dtype, where the
    projection would cast it anyway.
    """
    B, S, D = x.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return torch.cat([x[:, None, :M].expand(B, T, M, D), x[:, M:].reshape(B, T, L, D)], dim=2)


def _cached(build):
    """``build`` remembered by its arguments in eager code; inside compiled code dynamo traces
    ``build`` itself (it does not keep Python caches of tensors), so there it is called directly."""
    cached = functools.lru_cache(maxsize=16)(build)

    @functools.wraps(build)
    def get(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    return get


@_cached
def _frame_major_proxy_keys(T: int, M: int, L: int, device: torch.device) -> torch.Tensor:
    """bool (1, T*(M+L)): the keys a proxy query sees in the frame-major layout: every patch and
    the proxies of frame 0 only (frames 1.. hold copies of the same proxies)."""
    keep = torch.ones(T, M + L, dtype=torch.bool, device=device)
    keep[1:, :M] = False
    return keep.reshape(1, T * (M + L))


def frame_major_attention(qkv: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0) -> torch.Tensor:
    """``views``, step 2: qkv (B, T, M+L, 3, H, hd), the projection of :func:`frame_major_tokens`,
    -> (B, H, S, hd) laid out as (B, S, H, hd). Every q, k, v handed to SDPA is a view of ``qkv``."""
    B, T, N, _, H, hd = qkv.shape
    M, L = layout.num_proxies, layout.patches_per_frame
    q, k, v = qkv.unbind(3)  # (B, T, N, H, hd) views
    # Patch queries of frame t against its own row: frames fold into the batch (B*T, ...).
    out_patch = F.scaled_dot_product_attention(
        q[:, :, M:].reshape(B * T, L, H, hd).transpose(1, 2),
        k.reshape(B * T, N, H, hd).transpose(1, 2), v.reshape(B * T, N, H, hd).transpose(1, 2),
        dropout_p=dropout_p)  # (B*T, H, L, hd)
    # Proxy queries (frame 0's copy) against every row, the other frames' proxy copies masked.
    keys = _frame_major_proxy_keys(T, M, L, qkv.device)
    out_proxy = F.scaled_dot_product_attention(
        q[:, 0, :M].transpose(1, 2), k.reshape(B, T * N, H, hd).transpose(1, 2),
        v.reshape(B, T * N, H, hd).transpose(1, 2), attn_mask=keys, dropout_p=dropout_p)  # (B, H, M, hd)
    return _join(out_proxy, out_patch, B, T, L)


def buffer_proxy_attention(qkv: torch.Tensor, layout: ProxyLayout, dropout_p: float = 0.0) -> torch.Tensor:
    """``buffer``: qkv (B, S, 3, H, hd), the fused projection -> (B, H, S, hd) laid out as
    (B, S, H, hd). Each frame's ``[proxies; patches]`` keys AND values are written into one
    preallocated (B, T, M+L, 2, H, hd) buffer by two slice copies (the proxies broadcast over the
    frames, then the patches), where ``cat`` writes keys and values apart."""
    B, S, _, H, hd = qkv.shape
    M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
    kv = qkv[:, :, 1:]  # (B, S, 2, H, hd) view
    frames = kv.new_empty(B, T, M + L, 2, H, hd)
    frames[:, :, :M] = kv[:, None, :M]
    frames[:, :, M:] = kv[:, M:].reshape(B, T, L, 2, H, hd)
    k_frame, v_frame = frames.reshape(B * T, M + L, 2, H, hd).unbind(2)  # (B*T, M+L, H, hd) views
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, hd) views
    out_patch = F.scaled_dot_product_attention(
        qkv[:, M:, 0].reshape(B * T, L, H, hd).transpose(1, 2), k_frame.transpose(1, 2), v_frame.transpose(1, 2),
        dropout_p=dropout_p)  # (B*T, H, L, hd)
    out_proxy = F.scaled_dot_product_attention(q[:, :, :M], k, v, dropout_p=dropout_p)  # (B, H, M, hd)
    return _join(out_proxy, out_patch, B, T, L)


@_cached
def proxy_mask(M: int, T: int, L: int, device: torch.device) -> torch.Tensor:
    """bool (S, S), True = may attend: proxy-guided attention as one mask over the whole sequence."""
    S = M + T * L
    frame = torch.arange(S, device=device).sub(M).div(L, rounding_mode="floor")  # -1 for the proxies
    proxy = frame < 0
    return proxy[:, None] | proxy[None, :] | (frame[:, None] == frame[None, :])


def masked_proxy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """``mask``: one SDPA call over all S tokens with :func:`proxy_mask`. No copies at all; S^2
    scores where the other formulations compute T*L*(M+L) + M*S (10x more at B/32, 12 frames),
    and a mask keeps SDPA off its flash kernel."""
    mask = proxy_mask(layout.num_proxies, layout.num_frames, layout.patches_per_frame, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@_cached
def _flex_block_mask(M: int, T: int, L: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q_idx, kv_idx):
        return (q_idx < M) | (kv_idx < M) | ((q_idx - M) // L == (kv_idx - M) // L)

    S = M + T * L
    return create_block_mask(allowed, None, None, S, S, device=str(device))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_proxy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ProxyLayout,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """``flex``: FlexAttention with proxy-guided attention as its block mask (blocks of 128 x 128
    tokens that the mask leaves empty are skipped; partial blocks are masked element by element).
    On CUDA the attention is compiled (FlexAttention is only fused under ``torch.compile``); on a
    CPU it runs torch's unfused reference, forward only (torch has no CPU backward for it)."""
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p > 0:
        raise ValueError("proxy_attention=flex has no attention dropout; use another variant")
    block_mask = _flex_block_mask(layout.num_proxies, layout.num_frames, layout.patches_per_frame, q.device)
    flex = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return flex(q, k, v, block_mask=block_mask)
