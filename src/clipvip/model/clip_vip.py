"""CLIP-ViP: image CLIP turned into a video encoder with video proxy tokens.

Module and parameter names are HF CLIP's (``vision_model.embeddings.patch_embedding``,
``pre_layrnorm`` [sic], ``visual_projection``, ``logit_scale``) plus the two new tensors
``vision_model.embeddings.added_cls`` (the proxies) and ``temporal_embedding``, so that the
released checkpoints load into :class:`CLIPViPTowers` by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clipvip.model import fast_paths
from clipvip.model.layers import CLIPAttention, CLIPEncoder, CLIPEncoderLayer, ProxyLayout, check_attention_implementation


@dataclass(frozen=True)
class VideoSettings:
    """The video-specific part of the model config (``clip_vision_additional_config``)."""

    use_proxies: bool = True  # type == "ViP"; False: frame-wise CLIP, mean-pooled
    add_cls_num: int = 3
    temporal_size: int = 12
    use_temporal_embed: bool = True
    logit_scale_init_value: float = 4.60
    temporal_init_std: float = 0.0  # 0: zeros, as the original; > 0: normal(0, std)

    @classmethod
    def from_config(cls, extra: Mapping[str, Any]) -> "VideoSettings":
        """From a config's ``clip_vision_additional_config``, where load_config has filled in
        every key (``clipvip.config.VISION_ADDITIONAL_DEFAULTS``)."""
        use_proxies = extra["type"] == "ViP"
        return cls(
            use_proxies=use_proxies,
            add_cls_num=int(extra["add_cls_num"]) if use_proxies else 0,
            temporal_size=int(extra["temporal_size"]),
            use_temporal_embed=bool(extra["if_use_temporal_embed"]) and use_proxies,
            logit_scale_init_value=float(extra["logit_scale_init_value"]),
            temporal_init_std=float(extra["temporal_init_std"]),
        )


@torch.no_grad()
def init_temporal_embedding(embedding: torch.Tensor, std: float) -> None:
    """Zeros (the original: a CLIP-initialised model starts as image CLIP), or normal(0, std).

    From scratch, zeros leave frame order invisible until the embedding has grown: the tokens of
    frame t differ from those of frame t' only through it. An embedding of the order of the patch
    features (std about 0.5 at patch 16 with the 0.02 random init) lets attention weigh frames
    differently from the first step (the demo uses 0.5; docs/demo.md).
    """
    if std > 0:
        nn.init.normal_(embedding, std=std)
    else:
        nn.init.zeros_(embedding)


class VideoEmbeddings(nn.Module):
    """Patch + spatial position + temporal embeddings, with CLS and proxy tokens in front.

    video (B, T, 3, H, W) -> tokens (B, M + T*L, D), layout (M, T, L).
    """

    def __init__(self, config, video: VideoSettings):
        super().__init__()
        D = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.randn(D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + 1, D)
        # Not saved: HF and the released checkpoints may or may not carry it; it is always arange.
        self.register_buffer("position_ids", torch.arange(self.num_patches + 1)[None], persistent=False)
        # The patch embedding's fast path (fast_paths.embed_patches); set_attention("eager"),
        # the original formulation, turns it off with the layers' fast paths.
        self.fast_paths = True
        self.add_cls_num = video.add_cls_num
        if video.use_proxies:
            # The video proxy tokens; standard normal at init, as the original.
            self.added_cls = nn.Parameter(torch.randn(video.add_cls_num, D))
        self.use_temporal_embed = video.use_temporal_embed
        if video.use_temporal_embed:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, video.temporal_size, D))
            init_temporal_embedding(self.temporal_embedding, video.temporal_init_std)

    # The weight its fast path uses (the convolution's as a matrix): what low-precision copies are made of.
    fast_weights = fast_paths.patch_weights

    def temporal_embed_for(self, num_frames: int) -> torch.Tensor:
        """(1, T, D): the temporal embedding, linearly interpolated along time when T differs."""
        embed = self.temporal_embedding
        if num_frames != embed.shape[1]:
            embed = F.interpolate(embed.transpose(1, 2), size=num_frames, mode="linear").transpose(1, 2)
        return embed

    def forward(self, video: torch.Tensor):
        B, T, C, H, W = video.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(
                f"frames are {H}x{W} but the model's position embedding is for {self.image_size}x{self.image_size}"
                " (set input_res to match the CLIP config)"
            )
        frames = video.reshape(B * T, C, H, W).to(self.patch_embedding.weight.dtype)
        if self.fast_paths and fast_paths.ENABLED:
            patches = fast_paths.embed_patches(self, frames)  # (B*T, L, D)
        else:
            patches = self.patch_embedding(frames).flatten(2).transpose(1, 2)  # (B*T, L, D)
        L, D = patches.shape[1], patches.shape[2]
        patches = patches.reshape(B, T, L, D)
        positions = self.position_embedding(self.position_ids)  # (1, 1+L, D)
        patches = patches + positions[:, None, 1:]  # every frame gets the spatial positions 1..L
        if self.use_temporal_embed:
            patches = patches + self.temporal_embed_for(T)[:, :, None]  # (1, T, 1, D)
        cls = self.class_embedding.expand(B, 1, D)
        if self.add_cls_num:
            cls = torch.cat([cls, self.added_cls.expand(B, -1, -1)], dim=1)  # (B, M, D)
        cls = cls + positions[:, :1]  # CLS and every proxy get position 0
        tokens = torch.cat([cls, patches.reshape(B, T * L, D)], dim=1)  # (B, M + T*L, D)
        return tokens, ProxyLayout(cls.shape[1], T, L)


class VisionTransformer(nn.Module):
    def __init__(self, config, video: VideoSettings):
        super().__init__()
        self.embeddings = VideoEmbeddings(config, video)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> pooled CLS state (B, D)."""
        tokens, layout = self.embeddings(video)
        hidden = self.encoder(self.pre_layrnorm(tokens), layout=layout)
        return self.post_layernorm(hidden[:, 0])


class TextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        S = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :S])


class TextTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, S) -> pooled state at the EOS token (B, D)."""
        B, S = input_ids.shape
        hidden = self.embeddings(input_ids)
        # bool (B, 1, S, S), True = may attend: causal, and never to padding keys.
        allowed = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        hidden = self.final_layer_norm(self.encoder(hidden, attn_mask=allowed))
        # EOS (49407) is the largest id; argmax returns its first position, before any padding.
        eos_position = input_ids.argmax(dim=-1)
        return hidden[torch.arange(B, device=hidden.device), eos_position]


class CLIPViPTowers(nn.Module):
    """The two towers, their projections and the learnable log-temperature ``logit_scale``."""

    def __init__(self, clip_config, video: VideoSettings):
        super().__init__()
        self.clip_config = clip_config
        self.video = video
        vision, text = clip_config.vision_config, clip_config.text_config
        self.text_model = TextTransformer(text)
        self.vision_model = VisionTransformer(vision, video)
        self.visual_projection = nn.Linear(vision.hidden_size, clip_config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, clip_config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(video.logit_scale_init_value)))
        self.init_weights()

    # The projections' weights, for low-precision copies (clipvip.model.low_precision).
    fast_weights = fast_paths.projection_weights

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init (used when no CLIP weights are loaded: tests, benchmarks, from-scratch runs)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        embeddings = self.vision_model.embeddings
        nn.init.normal_(embeddings.class_embedding, std=embeddings.class_embedding.shape[0] ** -0.5)
        if hasattr(embeddings, "added_cls"):
            nn.init.normal_(embeddings.added_cls)
        if hasattr(embeddings, "temporal_embedding"):
            init_temporal_embedding(embeddings.temporal_embedding, self.video.temporal_init_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_model.encoder.gradient_checkpointing = enable
        self.vision_model.encoder.gradient_checkpointing = enable

    def set_attention(self, implementation: str = "sdpa") -> None:
        """``"sdpa"`` (the default: SDPA attention, and the fast paths of
        :mod:`clipvip.model.fast_paths` where their switch is on) or ``"eager"`` (the original
        formulation: three projections, bmm + softmax, quick_gelu written out; the baseline of
        ``python -m clipvip bench``) in every encoder layer of both towers. The same function
        either way."""
        check_attention_implementation(implementation)
        self.vision_model.embeddings.fast_paths = implementation != "eager"
        for module in self.modules():
            if isinstance(module, CLIPEncoderLayer):
                module.set_implementation(implementation)

    @property
    def attention_implementation(self) -> str:
        names = {m.attn_implementation for m in self.modules() if isinstance(m, CLIPAttention)}
        return names.pop() if len(names) == 1 else "mixed"

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, S) token ids -> (B, P) projected, not normalised."""
        return fast_paths.project(self, "text_projection", self.text_model(input_ids, attention_mask))

    def get_video_features(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, P) projected, not normalised (ViP: the CLS of the whole clip)."""
        return fast_paths.project(self, "visual_projection", self.vision_model(video))

    def get_frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, P): every frame encoded alone as an image, not normalised."""
        B, T = video.shape[:2]
        frames = video.reshape(B * T, 1, *video.shape[2:])
        return self.get_video_features(frames).reshape(B, T, -1)
