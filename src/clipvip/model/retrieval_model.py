"""The retrieval model: CLIP-ViP held as ``clipmodel`` (the released checkpoints' layout)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipvip.model import fast_paths
from clipvip.model.clip_vip import CLIPViPTowers, VideoSettings
from clipvip.model.text_cache import FrozenTextCache


class CLIPViPRetrieval(nn.Module):
    """Encodes videos and sentences into one L2-normalised space.

    ``state_dict()`` keys are ``clipmodel.<HF CLIP name>``, exactly those of the released
    CLIP-ViP checkpoints, so checkpoints load both ways between this project and the original.
    """

    def __init__(self, clip_config, video: VideoSettings):
        super().__init__()
        self.clipmodel = CLIPViPTowers(clip_config, video)
        self.text_cache: FrozenTextCache | None = None  # freeze_text_encoder(cache_entries=N) sets it

    @property
    def uses_proxies(self) -> bool:
        return self.clipmodel.video.use_proxies

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W), normalised pixels -> (B, P) unit vectors."""
        if self.uses_proxies:
            return F.normalize(self.clipmodel.get_video_features(video), dim=-1)
        # Baseline: image CLIP on every frame, unit frame features averaged, renormalised.
        frames = F.normalize(self.clipmodel.get_frame_features(video), dim=-1)  # (B, T, P)
        return F.normalize(frames.mean(dim=1), dim=-1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> (B, P): a one-frame clip (the frame-caption branch of OCL)."""
        return self.encode_video(image[:, None])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, S) -> (B, P) unit vectors."""
        if self.text_cache is None:
            return F.normalize(self.clipmodel.get_text_features(input_ids, attention_mask), dim=-1)
        pooled = self.text_cache(self.clipmodel.text_model, input_ids, attention_mask)  # (B, D)
        return F.normalize(fast_paths.project(self.clipmodel, "text_projection", pooled), dim=-1)

    def forward(self, video, text_input_ids, text_input_mask, image=None, caption_ids=None, caption_masks=None):
        """Features for a training or evaluation batch.

        video (B, T, 3, H, W); text_input_ids/mask (B, S); optional image (B, 3, H, W) with
        caption_ids/masks (B, S) for pretraining. Returns a dict of (B, P) unit vectors:
        ``vis_features``, ``text_features`` and, with images, ``img_features``, ``cap_features``.
        """
        # Text first: the frozen-text cache reads the token ids on the host, which on a GPU then
        # does not wait for the video tower's kernels.
        text_features = self.encode_text(text_input_ids, text_input_mask)
        out = {"vis_features": self.encode_video(video), "text_features": text_features}
        if image is not None:
            if image.dim() == 5:  # (B, 1, 3, H, W) as the original collator gives
                image = image.reshape(-1, *image.shape[2:])
            out["img_features"] = self.encode_image(image)
            out["cap_features"] = self.encode_text(caption_ids.reshape(image.shape[0], -1),
                                                   caption_masks.reshape(image.shape[0], -1))
        return out

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clipmodel.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = math.log(200.0)) -> None:
        """Keep the log-temperature in [0, ln 200] (called after every optimizer step)."""
        self.clipmodel.logit_scale.clamp_(0.0, max_value)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clipmodel.set_grad_checkpointing(enable)

    def set_attention(self, implementation: str = "sdpa") -> None:
        """``"sdpa"`` (default) or ``"eager"`` (the original formulation); see :mod:`.layers`."""
        self.clipmodel.set_attention(implementation)

    def freeze_text_encoder(self, freeze_projection: bool = False, cache_entries: int = 0) -> None:
        """No gradient and eval mode for the text tower (and ``text_projection`` with
        ``freeze_projection``); ``cache_entries`` > 0: remember the frozen tower's pooled state of
        up to that many captions (:class:`~clipvip.model.text_cache.FrozenTextCache`), kept across
        calls (the trainer freezes again after every validation)."""
        if cache_entries > 0 and (self.text_cache is None or self.text_cache.max_entries != cache_entries):
            self.text_cache = FrozenTextCache(cache_entries)
        modules = [self.clipmodel.text_model] + ([self.clipmodel.text_projection] if freeze_projection else [])
        for module in modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)
