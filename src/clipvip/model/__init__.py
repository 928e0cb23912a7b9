"""The CLIP-ViP model: shared CLIP encoder layer (its fast paths apart), video proxies, retrieval wrapper, weights."""
from clipvip.model.clip_vip import CLIPViPTowers, VideoSettings
from clipvip.model.factory import KNOWN_ARCHITECTURES, ModelSettings, build_model, compile_model, resolve_clip_config
from clipvip.model.layers import (ATTENTION_IMPLEMENTATIONS, CLIPEncoderLayer, ProxyLayout, eager_attention,
                     eager_proxy_guided_attention, proxy_guided_attention)
from clipvip.model.retrieval_model import CLIPViPRetrieval
from clipvip.model.weights import LoadReport, load_checkpoint, load_clip_weights, read_state_dict, save_checkpoint

__all__ = [
    "CLIPViPTowers", "CLIPViPRetrieval", "VideoSettings", "CLIPEncoderLayer", "ProxyLayout",
    "proxy_guided_attention", "eager_proxy_guided_attention", "eager_attention", "ATTENTION_IMPLEMENTATIONS",
    "ModelSettings", "build_model", "compile_model", "resolve_clip_config", "KNOWN_ARCHITECTURES",
    "LoadReport", "load_checkpoint", "load_clip_weights", "read_state_dict", "save_checkpoint",
]
