"""``CLIPViPProcessor``: captions and videos to model input, exactly as evaluation reads them.

Videos go through :class:`clipvip.data.retrieval_dataset.ClipReader` in evaluation mode (the
same frame indices, decoder, resize kernel and normalisation as ``clipvip.load_clip`` and the
evaluation datasets); frames already in memory (a uint8 array ``[T, H, W, 3]`` or a list of PIL
images: every frame of the clip) are sampled by the reader's own ``indices`` and transformed by
the same ``frames_to_model_input``. Captions go through the project's CLIP tokenizer, padded to
``max_txt_len`` as the evaluation collator pads them.

``preprocessor_config.json`` holds :class:`VideoInputSettings` and the normalisation::

    {"processor_class": "CLIPViPProcessor", "n_clips": 1, "num_frms": 12, "sample_rate": 0,
     "input_res": [224, 224], "resize_kernel": "bicubic", "image_mean": [...], "image_std": [...],
     "max_txt_len": 50, "video_backend": "decord"}

``sample_rate`` 0: ``n_clips * num_frms`` frames spread uniformly over the clip; > 0: MMAction's
segments. ``resize_kernel``: ``"bicubic"`` (torchvision 0.9, no antialiasing: the released
checkpoints' input) or ``"bicubic_antialias"`` (PIL / torchvision >= 0.17); data/transforms.py.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from clipvip.data.retrieval_dataset import ClipReader, tokenize
from clipvip.data.transforms import CLIP_MEAN, CLIP_STD, frames_to_model_input
from clipvip.data.video import VideoBytes, resolve_backend
from clipvip.errors import ConfigError, DataError
from clipvip.files import atomic_write_json
from clipvip.hf.hub import hub_options_in
from clipvip.tokenizer import load_clip_tokenizer
from clipvip.weights_ref import resolve_folder

PREPROCESSOR_CONFIG = "preprocessor_config.json"
RESIZE_KERNELS = {"bicubic": False, "bicubic_antialias": True}  # name -> antialias


@dataclass(frozen=True)
class VideoInputSettings:
    """How evaluation reads a clip (the config's ``test_*`` sampling) and pads a caption."""

    n_clips: int
    num_frms: int
    sample_rate: int
    input_res: tuple[int, int]  # (H, W)
    resize_antialias: bool
    max_txt_len: int
    video_backend: str

    @classmethod
    def from_config(cls, cfg) -> "VideoInputSettings":
        return cls(n_clips=int(cfg.test_n_clips), num_frms=int(cfg.test_num_frms), sample_rate=int(cfg.sample_rate),
                   input_res=tuple(int(v) for v in cfg.input_res), resize_antialias=bool(cfg.resize_antialias),
                   max_txt_len=int(cfg.max_txt_len), video_backend=str(cfg.video_backend))

    def to_json(self) -> dict:
        kernel = next(name for name, antialias in RESIZE_KERNELS.items() if antialias == self.resize_antialias)
        return {"n_clips": self.n_clips, "num_frms": self.num_frms, "sample_rate": self.sample_rate,
                "input_res": list(self.input_res), "resize_kernel": kernel,
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                "max_txt_len": self.max_txt_len, "video_backend": self.video_backend}

    @classmethod
    def from_json(cls, data: Mapping, source: str) -> "VideoInputSettings":
        """The settings of a ``preprocessor_config.json``; refused where this code cannot honour them."""
        try:
            kernel = data["resize_kernel"]
            if kernel not in RESIZE_KERNELS:
                raise ConfigError(f"{source}: resize_kernel '{kernel}' is not one of {', '.join(RESIZE_KERNELS)}")
            # frames_to_model_input applies CLIP's normalisation only.
            for key, expected in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
                if not np.allclose(data[key], expected, rtol=0, atol=1e-7):
                    raise ConfigError(f"{source}: {key} {data[key]} is not CLIP's {list(expected)}, "
                                      "the only normalisation clipvip applies")
            return cls(n_clips=int(data["n_clips"]), num_frms=int(data["num_frms"]),
                       sample_rate=int(data["sample_rate"]), input_res=tuple(int(v) for v in data["input_res"]),
                       resize_antialias=RESIZE_KERNELS[kernel], max_txt_len=int(data["max_txt_len"]),
                       video_backend=str(data["video_backend"]))
        except KeyError as e:
            raise ConfigError(f"{source}: no {e.args[0]!r}") from None


class CLIPViPProcessor(ProcessorMixin):
    """``processor(text=[...], videos=[...], return_tensors="pt")`` -> ``input_ids``,
    ``attention_mask`` ``[B, max_txt_len]`` and ``pixel_values [B, T, 3, H, W]``.

    A video is a file path, an encoded file in memory (:class:`clipvip.data.video.VideoBytes`), a
    uint8 array or tensor ``[T, H, W, 3]`` (every frame of the clip, RGB), or a list of PIL images
    (the same); ``videos`` may also be one such video alone.
    """

    attributes = ["tokenizer"]  # transformers 4; 5 reads the __init__ signature
    tokenizer_class = ("CLIPTokenizer", "CLIPTokenizerFast")

    def __init__(self, tokenizer, settings: VideoInputSettings):
        super().__init__(tokenizer)
        self.settings = settings
        # Evaluation mode: no jitter, and the RNG is never drawn from.
        self.reader = ClipReader(n_clips=settings.n_clips, num_frms=settings.num_frms,
                                 sample_rate=settings.sample_rate, input_res=settings.input_res,
                                 training=False, jitter=False, backend=resolve_backend(settings.video_backend),
                                 antialias=settings.resize_antialias)

    def __call__(self, text=None, videos=None, return_tensors: str = "pt", **unused) -> BatchFeature:
        if unused:
            raise TypeError(f"CLIPViPProcessor: unknown arguments {', '.join(sorted(unused))}")
        if return_tensors != "pt":
            raise ValueError(f"CLIPViPProcessor returns torch tensors only (return_tensors='pt'), got {return_tensors!r}")
        if text is None and videos is None:
            raise ValueError("CLIPViPProcessor: give text=, videos= or both")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            data["input_ids"], data["attention_mask"] = tokenize(self.tokenizer, texts, self.settings.max_txt_len)
        if videos is not None:
            data["pixel_values"] = torch.stack([self.video_input(v) for v in _as_video_list(videos)])
        return BatchFeature(data=data)

    def video_input(self, video) -> torch.Tensor:
        """``[T, 3, H, W]`` model input of one video (a path, encoded bytes, a uint8 array, a list of PIL images)."""
        if isinstance(video, VideoBytes):
            return self.reader.read_video(video, random.Random(0))[0]
        if isinstance(video, (str, os.PathLike)):
            return self.reader.read_video(os.fspath(video), random.Random(0))[0]
        if isinstance(video, (list, tuple)):
            video = np.stack([np.asarray(image.convert("RGB")) for image in video])  # (F, H, W, 3)
        frames = torch.as_tensor(video)  # (F, H, W, 3) uint8: every frame of the clip
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise DataError(f"a video array must be [T, H, W, 3] with T >= 1, got {tuple(frames.shape)}")
        return frames_to_model_input(frames[self.reader.indices(frames.shape[0], random.Random(0))],
                                     self.reader.input_res, self.reader.antialias)

    def to_dict(self) -> dict:
        """What ``preprocessor_config.json`` holds (also transformers' ``repr`` of a processor)."""
        return {"processor_class": type(self).__name__, **self.settings.to_json()}

    def save_pretrained(self, save_directory: str, **unused) -> list[str]:
        """The tokenizer files and ``preprocessor_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        files = list(self.tokenizer.save_pretrained(save_directory))
        path = os.path.join(save_directory, PREPROCESSOR_CONFIG)
        atomic_write_json(path, self.to_dict(), indent=2)
        return files + [path]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> "CLIPViPProcessor":
        """From a converted folder or a Hub id (through the local Hugging Face cache). Of
        transformers' loading options only those that say where the files come from apply
        (``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``force_download``)."""
        folder = resolve_folder(str(pretrained_model_name_or_path), **hub_options_in(kwargs))
        path = os.path.join(folder, PREPROCESSOR_CONFIG)
        try:
            with open(path, encoding="utf-8") as f:
                settings = VideoInputSettings.from_json(json.load(f), path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls(load_clip_tokenizer(folder), settings)


def _as_video_list(videos) -> Sequence:
    """``videos`` as a list of videos: one path, array or list of PIL images alone is one video."""
    if isinstance(videos, (str, os.PathLike, VideoBytes)) or (hasattr(videos, "ndim") and videos.ndim == 4):
        return [videos]
    videos = list(videos)
    if videos and hasattr(videos[0], "convert"):  # PIL images: the frames of one video
        return [videos]
    return videos
