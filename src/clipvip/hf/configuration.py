"""``CLIPViPConfig``: everything that rebuilds a CLIP-ViP model, as a Hugging Face config.

``config.json`` of a converted folder holds HF CLIP's ``text_config`` / ``vision_config`` /
``projection_dim`` (the towers) and the fields of :class:`clipvip.model.clip_vip.VideoSettings`
at the top level (``use_proxies``: ViP or the mean-pooled frame baseline, ``add_cls_num``: the
proxy count, ``temporal_size``, ``use_temporal_embed``, ``logit_scale_init_value``,
``temporal_init_std``). A key missing from a file takes the value of ``CLIPConfig()`` /
``VideoSettings()``, so the defaults stay where the model defines them.
"""
from __future__ import annotations

from dataclasses import fields

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig

from clipvip.model.clip_vip import VideoSettings
from clipvip.weights_ref import MODEL_TYPE


class CLIPViPConfig(PretrainedConfig):
    """HF CLIP's two tower configs and the projection width, plus the video settings.

    An ``__init__`` of its own rather than dataclass fields, so that the class works with the
    keyword-argument configs of transformers 4 and the dataclass configs of transformers 5 alike.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    def __init__(self, text_config=None, vision_config=None, projection_dim=None, **kwargs):
        towers = CLIPConfig(text_config=_as_dict(text_config), vision_config=_as_dict(vision_config),
                            **({} if projection_dim is None else {"projection_dim": projection_dim}))
        self.text_config = towers.text_config
        self.vision_config = towers.vision_config
        self.projection_dim = towers.projection_dim
        defaults = VideoSettings()
        for field in fields(VideoSettings):
            setattr(self, field.name, kwargs.pop(field.name, getattr(defaults, field.name)))
        super().__init__(**kwargs)

    @classmethod
    def from_parts(cls, clip_config: CLIPConfig, video: VideoSettings) -> "CLIPViPConfig":
        """The config of a model built from ``clip_config`` and ``video`` (what ``build_model`` reads)."""
        return cls(text_config=clip_config.text_config.to_dict(), vision_config=clip_config.vision_config.to_dict(),
                   projection_dim=clip_config.projection_dim,
                   **{field.name: getattr(video, field.name) for field in fields(VideoSettings)})

    def clip_config(self) -> CLIPConfig:
        """The HF CLIP architecture of the two towers."""
        return CLIPConfig(text_config=self.text_config.to_dict(), vision_config=self.vision_config.to_dict(),
                          projection_dim=self.projection_dim)

    def video_settings(self) -> VideoSettings:
        return VideoSettings(**{field.name: getattr(self, field.name) for field in fields(VideoSettings)})


def _as_dict(config):
    """A sub-config as the dict ``CLIPConfig`` takes in every transformers version (None stays None)."""
    return config.to_dict() if isinstance(config, PretrainedConfig) else config
