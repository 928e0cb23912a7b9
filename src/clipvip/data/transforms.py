"""Frames to model input, without torchvision (DESIGN §2, §6).

The official configs use the same transform for training and evaluation (the original's
``init_transform_dict_simple``): scale to [0, 1], bicubic resize of every frame to exactly
``input_res`` (the aspect ratio is not kept), a center crop of that same size (a no-op, kept so
the pipeline reads like the original), and CLIP's normalisation.

The resize is, by default, the kernel the released checkpoints were trained and evaluated with:
the original's Docker image pins torchvision 0.9.0, whose tensor ``Resize`` is
``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing (a = -0.75, a fixed
4-tap support). ``antialias=True`` (config ``resize_antialias``) is torchvision >= 0.17's default
instead: PIL's kernel (a = -0.5, support widened by the downscale factor), another function even
when upscaling. docs/fidelity.md.

Where it runs: a DataLoader worker only decodes; its frames leave it as uint8 RGB at their
decoded size, ``[T, H, W, 3]`` per clip (channels last, as the decoders return them: no permute
or float copy in the worker, and a quarter of float32's bytes per pixel to collate, pin and copy
to the device). The
transform runs where the model is, on whatever device holds the frames: :class:`VideoTransform`
(the training step, evaluation, the search encoder) and the HF processor (on the CPU, at once)
all call the one :func:`frames_to_model_input`. The transform draws no random numbers: the random
parts of reading a clip (frame jitter, caption choice) happen in the worker, so moving the
transform changes nothing about a seed's batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = Union[int, Sequence[int]]


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def resize(x: torch.Tensor, size: Size, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of float images ``[N, C, H, W]`` to exactly ``size`` (h, w).

    ``antialias=False`` (default): torchvision 0.9's tensor Resize, the released checkpoints'
    input. ``antialias=True``: the antialiased kernel of torchvision >= 0.17 / PIL, which filters
    detail out when downscaling instead of aliasing it. Values are not clamped (bicubic
    overshoots slightly at edges), as in torchvision for float input.
    """
    h, w = _hw(size)
    if tuple(x.shape[-2:]) == (h, w):
        # Both kernels are the identity at scale 1 (torchvision 0.9 interpolates anyway; its
        # output equals the input exactly, since every sample falls on a source pixel centre).
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)


def center_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """The central ``size`` (h, w) window of ``[..., H, W]``, placed as torchvision rounds it."""
    h, w = _hw(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"crop {h}x{w} is larger than the image {H}x{W}")
    top = int(round((H - h) / 2.0))
    left = int(round((W - w) / 2.0))
    return x[..., top:top + h, left:left + w]


def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[N, C, H, W]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# (x / 255 - mean) / std as one multiply-add: x * _SCALE + _SHIFT, per channel.
_SCALE = tuple(1.0 / (255.0 * s) for s in CLIP_STD)
_SHIFT = tuple(-m / s for m, s in zip(CLIP_MEAN, CLIP_STD))
# (scale, shift) [1, 3, 1, 1] float32 per device, made once and filled there from Python numbers:
# a copy from the host's pageable memory would make a step on a GPU wait for the device.
_AFFINE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _AFFINE:
        _AFFINE[device] = tuple(torch.stack([torch.full((), v, device=device) for v in values]).view(1, 3, 1, 1)
                                for values in (_SCALE, _SHIFT))
    return _AFFINE[device]


def frames_to_model_input(frames: torch.Tensor, input_res: Size = (224, 224),
                          antialias: bool = False) -> torch.Tensor:
    """uint8 RGB frames ``[..., H, W, 3]`` to normalised float32 ``[..., 3, h, w]``, on their device.

    The one transform of the package (module docstring). Leading dimensions are kept: ``[N, H,
    W, 3]`` frames, ``[B, T, H, W, 3]`` a batch of clips, ``[H, W, 3]`` one image. Computes
    ``normalize(center_crop(resize(frames / 255, antialias)))``, arranged for speed: the frames go
    to channels-first memory before the resize (torch's antialiased bicubic kernel is about 1.5x
    faster on NCHW than on the channels-last view ``permute`` gives), and the division by 255
    moves after the resize, where it joins the normalisation in one multiply-add. Resize and crop
    are linear, so this is the same function up to float rounding (about 1e-6). Every frame is
    resized on its own: the result does not depend on how frames are batched, beyond the last
    bit of the kernels.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 [..., H, W, 3], got {frames.dtype}")
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got {tuple(frames.shape)}")
    lead, (H, W) = frames.shape[:-3], frames.shape[-3:-1]
    x = frames.reshape(-1, H, W, 3)                       # (N, H, W, 3), N = product of the leading dims
    x = x.permute(0, 3, 1, 2).contiguous().float()        # (N, 3, H, W) in [0, 255], NCHW memory
    x = resize(x, input_res, antialias)                   # (N, 3, h, w)
    x = center_crop(x, input_res)                         # (N, 3, h, w), unchanged
    scale, shift = _affine(x.device)
    x = torch.addcmul(shift, x, scale)                    # a new contiguous tensor
    return x.view(*lead, 3, *x.shape[-2:])                # (..., 3, h, w)


@dataclass(frozen=True)
class VideoTransform:
    """How decoded frames become model input (``input_res``, ``resize_antialias``): the transform of
    a batch, run on the device that holds it (the model's).

    ``transform(frames)`` takes what the collators give:

    * a uint8 tensor ``[..., H, W, 3]``: ``video`` [B, T, H, W, 3], ``image`` [B, H, W, 3], one
      clip [T, H, W, 3]; -> float ``[..., 3, h, w]``;
    * a list of uint8 tensors of different sizes, one per clip (loose files of different
      resolutions in one batch): clips of one size are transformed together, and the results
      are stacked in list order -> ``[len, ..., 3, h, w]``;
    * a float tensor: already model input (batches built by hand, the benchmark's random
      clips), returned as it is.
    """

    input_res: tuple[int, int] = (224, 224)  # (h, w) fed to the model
    antialias: bool = False  # False: the released checkpoints' kernel (torchvision 0.9)

    @classmethod
    def from_config(cls, cfg: Mapping) -> "VideoTransform":
        return cls(input_res=_hw(cfg.input_res), antialias=bool(cfg.resize_antialias))

    def __call__(self, frames: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(frames, torch.Tensor):
            if frames.is_floating_point():
                return frames
            return frames_to_model_input(frames, self.input_res, self.antialias)
        clips = list(frames)
        if not clips:
            raise ValueError("no frames to transform")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, clip in enumerate(clips):
            by_size.setdefault(tuple(clip.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(clips)
        for positions in by_size.values():
            group = self(torch.stack([clips[i] for i in positions]))  # (b, ..., 3, h, w)
            for i, x in zip(positions, group.unbind(0)):
                out[i] = x
        return torch.stack(out)  # (len, ..., 3, h, w)
