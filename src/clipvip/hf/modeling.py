"""``CLIPViPModel``: the retrieval model as a Hugging Face ``PreTrainedModel``.

It holds the project's model (:class:`clipvip.model.clip_vip.CLIPViPTowers`) as ``clipmodel``,
so its ``state_dict`` is exactly the released checkpoints' (``clipmodel.<HF CLIP name>``, the
keys of :class:`clipvip.model.CLIPViPRetrieval`) and ``model.safetensors`` loads both ways.

Features: ``get_video_features`` / ``get_text_features`` return what evaluation ranks with,
``CLIPViPRetrieval.encode_video`` / ``encode_text``: unit vectors. transformers' ``CLIPModel``
returns the projections before normalisation, but CLIP-ViP's mean-pooled baseline
(``use_proxies`` false) has no such feature (it averages unit frame features), and code written
for ``CLIPModel`` normalises what it gets, which leaves a unit vector unchanged. The similarity
is then ``logit_scale.exp() * video @ text.T``, as ``forward`` gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from clipvip.hf.configuration import CLIPViPConfig
from clipvip.hf.hub import hub_options_in
from clipvip.model.clip_vip import CLIPViPTowers
from clipvip.model.retrieval_model import CLIPViPRetrieval
from clipvip.weights_ref import resolve_folder


@dataclass
class CLIPViPOutput(ModelOutput):
    """``logits_per_video`` [B_v, B_t] (its transpose ``logits_per_text``): scaled cosine
    similarities; ``video_embeds`` [B_v, P] and ``text_embeds`` [B_t, P]: unit vectors."""

    logits_per_video: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class CLIPViPModel(PreTrainedModel):
    """CLIP-ViP video and text towers. ``CLIPViPModel.from_pretrained(folder or "owner/name")``."""

    config_class = CLIPViPConfig
    base_model_prefix = "clipmodel"
    main_input_name = "pixel_values"

    def __init__(self, config: CLIPViPConfig):
        super().__init__(config)
        retrieval = CLIPViPRetrieval(config.clip_config(), config.video_settings())
        self.clipmodel = retrieval.clipmodel
        # The retrieval wrapper shares ``clipmodel`` without being a submodule, so the weights
        # appear once, under ``clipmodel.``; it supplies encode_video / encode_text.
        object.__setattr__(self, "_retrieval", retrieval)
        self.post_init()

    @property
    def retrieval(self) -> CLIPViPRetrieval:
        """The project's retrieval model on these weights (evaluation, search, fine-tuning)."""
        return self._retrieval

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """The project's own initialisation; the ``position_ids`` buffers (never saved) set to arange."""
        if isinstance(module, CLIPViPTowers):
            module.init_weights()
        position_ids = getattr(module, "position_ids", None)
        if isinstance(position_ids, torch.Tensor) and not position_ids.is_meta:
            position_ids.copy_(torch.arange(position_ids.shape[-1]).expand_as(position_ids))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs: Any) -> "CLIPViPModel":
        """transformers' ``from_pretrained`` on a converted folder; a Hub id is first resolved to
        its snapshot in the local HF cache (downloaded when online), or a one-line
        :class:`clipvip.ClipvipError` naming the download command where it cannot be."""
        folder = resolve_folder(str(pretrained_model_name_or_path), **hub_options_in(kwargs))
        return super().from_pretrained(folder, *model_args, **kwargs)

    def get_video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, T, 3, H, W] (the processor's) -> [B, P] unit vectors."""
        return self.retrieval.encode_video(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, S] -> [B, P] unit vectors."""
        return self.retrieval.encode_text(input_ids, attention_mask)

    # The names the rest of the project uses for the same features.
    encode_video = get_video_features
    encode_text = get_text_features

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> CLIPViPOutput:
        """Features of whichever inputs are given; with both, the scaled similarities."""
        video = self.get_video_features(pixel_values) if pixel_values is not None else None
        text = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits = None
        if video is not None and text is not None:
            logits = self.clipmodel.logit_scale.exp() * video @ text.T  # (B_v, B_t)
        return CLIPViPOutput(logits_per_video=logits, logits_per_text=None if logits is None else logits.T,
                             video_embeds=video, text_embeds=text)
