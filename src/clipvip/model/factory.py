"""Build the retrieval model: architecture, initialisation, checkpoint, attention, compile.

:class:`ModelSettings` is what the model needs of a config; :func:`build_model` takes those
settings, or a whole :class:`clipvip.config.Config` and reads them from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import CLIPConfig

from clipvip.config import Config
from clipvip.errors import CheckpointError, ConfigError
from clipvip.logging_utils import get_logger
from clipvip.model import fast_paths as fast_path_switch
from clipvip.model.clip_vip import VideoSettings
from clipvip.model.layers import ATTENTION_IMPLEMENTATIONS, CLIPEncoderLayer
from clipvip.model.retrieval_model import CLIPViPRetrieval
from clipvip.model.weights import load_checkpoint, load_clip_weights
from clipvip.weights_ref import hub_cached_folder, is_hub_id

LOGGER = get_logger("model")


def _openai_base(patch_size: int) -> dict:
    """The published architecture of OpenAI's CLIP ViT-B/32 and ViT-B/16 (HF layout)."""
    return {
        "projection_dim": 512,
        "text_config": {
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 224, "patch_size": patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
    }


# Architectures known by name, so that the official configs build offline without the hub.
KNOWN_ARCHITECTURES = {
    "openai/clip-vit-base-patch32": _openai_base(32),
    "openai/clip-vit-base-patch16": _openai_base(16),
}


def resolve_clip_config(name_or_path: str) -> CLIPConfig:
    """The CLIP architecture: a HF folder (or its config.json), or a known model name."""
    if not name_or_path:
        raise ConfigError("clip_config is empty: give a HF CLIP folder or a known name "
                          f"({', '.join(KNOWN_ARCHITECTURES)})")
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        try:
            return CLIPConfig.from_json_file(path)
        except Exception as e:
            raise ConfigError(f"{path}: not a CLIP config.json: {e}") from None
    if name_or_path in KNOWN_ARCHITECTURES:
        return CLIPConfig(**KNOWN_ARCHITECTURES[name_or_path])
    cached = hub_cached_folder(name_or_path, "config.json")
    if cached:
        return CLIPConfig.from_json_file(os.path.join(cached, "config.json"))
    raise ConfigError(
        f"clip_config '{name_or_path}' is neither a folder with config.json nor a known name "
        f"({', '.join(KNOWN_ARCHITECTURES)})"
    )


@dataclass(frozen=True)
class ModelSettings:
    """What :func:`build_model` reads of a config (the keys of the same names)."""

    clip_config: str  # HF CLIP folder (or its config.json) or a KNOWN_ARCHITECTURES name
    input_res: tuple[int, ...]  # (H, W) of the frames fed to the model
    max_txt_len: int  # text tokens per caption
    video: VideoSettings  # clip_vision_additional_config
    e2e_weights_path: Optional[str]  # a released or fine-tuned checkpoint, loaded exactly
    clip_weights: Optional[str]  # image CLIP to initialise from, where there is no checkpoint
    gradient_checkpointing: bool
    attn_implementation: str  # "sdpa" or "eager"
    compile: bool  # torch.compile the encoder layers
    fast_paths: str = ""  # the fast paths' switch value (fast_paths.parse); "": leave the process's as it is

    def __post_init__(self):
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation: unknown '{self.attn_implementation}'; "
                              f"known: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        try:
            fast_path_switch.parse(self.fast_paths)
        except ValueError as e:
            raise ConfigError(f"fast_paths: {e}") from None

    @classmethod
    def from_config(cls, cfg: Config) -> "ModelSettings":
        return cls(
            clip_config=cfg.clip_config,
            input_res=tuple(int(v) for v in cfg.input_res),  # load_config makes it [H, W]
            max_txt_len=int(cfg.max_txt_len),
            video=VideoSettings.from_config(cfg.clip_vision_additional_config),
            e2e_weights_path=cfg.e2e_weights_path or None,
            clip_weights=cfg.clip_weights or None,
            gradient_checkpointing=bool(cfg.gradient_checkpointing),
            attn_implementation=cfg.attn_implementation,
            compile=bool(cfg.compile),
            fast_paths=str(cfg.fast_paths or ""),
        )


def check_input_sizes(settings: ModelSettings, clip_config: CLIPConfig) -> None:
    """``max_txt_len`` and ``input_res`` must fit the position embeddings of the two towers.

    Checked when the model is built, before any data is read: otherwise the first text batch,
    after every video of an evaluation was encoded, fails with a tensor size mismatch, and the
    first video batch with a ValueError from inside the vision tower.
    """
    side = int(clip_config.vision_config.image_size)
    res = list(settings.input_res)
    if res != [side, side]:
        raise ConfigError(
            f"input_res {res} does not match clip_config '{settings.clip_config}': its vision position "
            f"embedding is for {side}x{side} frames (vision_config.image_size); use --input_res {side}")
    limit = int(clip_config.text_config.max_position_embeddings)
    length = settings.max_txt_len
    if length > limit:
        raise ConfigError(
            f"max_txt_len {length} is more than the {limit} text positions of clip_config "
            f"'{settings.clip_config}' (text_config.max_position_embeddings); use --max_txt_len {limit} or less")
    if length < 2:
        raise ConfigError(f"max_txt_len {length}: a caption needs at least 2 tokens (start and end)")


def compile_model(model, **compile_kwargs):
    """``torch.compile`` every encoder layer in place and return the model.

    ``nn.Module.compile`` keeps the module tree, so state-dict keys (checkpoints) do not change,
    and every caller of the towers (training, ``encode_video``, ``encode_text``, evaluation) runs
    the compiled layers. Compilation itself happens at the first call of each shape; raises
    :class:`ConfigError` where this torch has no ``torch.compile``.
    """
    if not hasattr(torch, "compile") or not hasattr(torch.nn.Module, "compile"):
        raise ConfigError(f"compile: torch {torch.__version__} has no torch.compile / nn.Module.compile; "
                          "set compile to 0")
    import torch._dynamo as dynamo

    # The layers of both towers share one code object: room for the shapes and modes of both
    # towers (train/eval, text/video, sdpa/eager) before dynamo gives up and runs eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    for module in model.modules():
        if isinstance(module, CLIPEncoderLayer):
            module.compile(**compile_kwargs)
    return model


def build_model(settings: Union[ModelSettings, Config], load_weights: bool = True) -> CLIPViPRetrieval:
    """The retrieval model: CLIP-ViP (``type: ViP``) or the mean-pool CLIP baseline.

    ``settings``: :class:`ModelSettings`, or a config to read them from (the public entry:
    ``clipvip.build_model(load_config(...))``). Weights: ``e2e_weights_path`` (a released or
    fine-tuned checkpoint) loads exactly and makes ``clip_weights`` unnecessary; otherwise
    ``clip_weights`` initialises from image CLIP; with neither the model is randomly initialised.
    """
    if not isinstance(settings, ModelSettings):
        settings = ModelSettings.from_config(settings)
    clip_config = resolve_clip_config(settings.clip_config)
    check_input_sizes(settings, clip_config)
    model = CLIPViPRetrieval(clip_config, settings.video)
    if load_weights:
        if settings.e2e_weights_path:
            path = settings.e2e_weights_path
            if not (os.path.exists(path) or is_hub_id(path)):  # the official configs hold a placeholder path
                start = f"clip_weights '{settings.clip_weights}'" if settings.clip_weights else "random weights"
                raise CheckpointError(
                    f"e2e_weights_path '{path}' not found: pass --e2e_weights_path FILE (a released or "
                    f"fine-tuned .pt), or --e2e_weights_path none to start from {start}")
            load_checkpoint(model, path)
        elif settings.clip_weights:
            load_clip_weights(model, settings.clip_weights)
        else:
            LOGGER.info("no clip_weights or e2e_weights_path: the model is randomly initialised")
    if settings.fast_paths:  # process-wide, as CLIPVIP_FAST_PATHS
        fast_path_switch.configure(settings.fast_paths)
    if settings.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_attention(settings.attn_implementation)
    if settings.compile:
        compile_model(model)
    return model
