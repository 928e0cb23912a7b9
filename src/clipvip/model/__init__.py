"""The CLIP-ViP model: shared CLIP encoder layer, video proxies, retrieval wrapper, weights."""
from .clip_vip import CLIPViPModel, VideoSettings
from .factory import KNOWN_ARCHITECTURES, build_model, resolve_clip_config
from .layers import CLIPEncoderLayer, ProxyLayout, proxy_guided_attention
from .retrieval import CLIPViPRetrieval
from .weights import LoadReport, load_checkpoint, load_clip_weights, read_state_dict, save_checkpoint

__all__ = [
    "CLIPViPModel", "CLIPViPRetrieval", "VideoSettings", "CLIPEncoderLayer", "ProxyLayout",
    "proxy_guided_attention", "build_model", "resolve_clip_config", "KNOWN_ARCHITECTURES",
    "LoadReport", "load_checkpoint", "load_clip_weights", "read_state_dict", "save_checkpoint",
]
