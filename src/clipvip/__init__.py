"""clipvip: CLIP-ViP (ICLR 2023) — video proxy tokens on image CLIP, for video-text retrieval.

    import clipvip
    cfg = clipvip.load_config("configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json",
                              ["--e2e_weights_path", "pretrain_clipvip_base_32.pt"])
    model = clipvip.build_model(cfg).eval()
    tokenizer = clipvip.build_tokenizer(cfg)
    video = clipvip.load_clip("video7010.mp4", cfg)   # [T, 3, H, W], sampled as evaluation does
"""
import random

import torch

from clipvip.config import Config, load_config, save_config
from clipvip.data.retrieval_dataset import ClipReader
from clipvip.errors import CheckpointError, ClipvipError, ConfigError, DataError
from clipvip.model import build_model
from clipvip.tokenizer import build_tokenizer
from clipvip import hf  # registers CLIP-ViP with transformers' AutoConfig, AutoModel, AutoProcessor

__version__ = "0.1.0"
__all__ = [
    "Config", "load_config", "save_config", "build_model", "build_tokenizer", "load_clip",
    "ClipvipError", "ConfigError", "CheckpointError", "DataError", "__version__",
]


def load_clip(path: str, cfg: Config) -> torch.Tensor:
    """``[T, 3, H, W]`` model input of one video, sampled and transformed as evaluation reads it.

    The convenience for a config; the library reads clips through
    ``ClipReader.from_config(cfg, training=False)``, which is all this does.
    """
    # Evaluation sampling draws no random numbers: any generator gives the same frames.
    return ClipReader.from_config(cfg, training=False).read_video(path, random.Random(0))[0]
