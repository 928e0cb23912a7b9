"""clipvip: CLIP-ViP (ICLR 2023) — video proxy tokens on image CLIP, for video-text retrieval.

    import clipvip
    cfg = clipvip.load_config("configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json",
                              ["--e2e_weights_path", "pretrain_clipvip_base_32.pt"])
    model = clipvip.build_model(cfg).eval()
    tokenizer = clipvip.build_tokenizer(cfg)
    video = clipvip.load_clip("video7010.mp4", cfg)   # [T, 3, H, W], sampled as evaluation does
"""
from clipvip.config import Config, load_config, save_config
from clipvip.data.retrieval_dataset import load_clip
from clipvip.errors import CheckpointError, ClipvipError, ConfigError, DataError
from clipvip.model import build_model
from clipvip.tokenizer import build_tokenizer

__version__ = "0.1.0"
__all__ = [
    "Config", "load_config", "save_config", "build_model", "build_tokenizer", "load_clip",
    "ClipvipError", "ConfigError", "CheckpointError", "DataError", "__version__",
]
