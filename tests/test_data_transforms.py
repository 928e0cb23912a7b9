"""Frames -> model input, checked against the formulas written out by hand."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipvip.data.transforms import (CLIP_MEAN, CLIP_STD, center_crop, frames_to_model_input,
                                     normalize, resize)


def _frames(n=2, h=20, w=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_same_size_is_scale_and_normalise_only():
    frames = _frames(h=16, w=16)
    out = frames_to_model_input(frames, (16, 16))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (frames.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_is_bicubic_to_exact_size(antialias):
    """Default: torchvision 0.9's tensor Resize (no antialiasing), what the released checkpoints
    saw; ``antialias=True`` (config ``resize_antialias``): torchvision >= 0.17's default."""
    frames = _frames(h=40, w=60)
    out = frames_to_model_input(frames, (24, 18), **({"antialias": True} if antialias else {}))  # aspect not kept
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(24, 18), mode="bicubic", align_corners=False, antialias=antialias)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 24, 18)
    torch.testing.assert_close(out, (x - mean) / std)
    other = frames_to_model_input(frames, (24, 18), antialias=not antialias)
    assert (other - out).abs().max() > 0.05  # the two kernels really differ
    # An int input_res means a square.
    assert frames_to_model_input(frames, 12).shape == (2, 3, 12, 12)


def test_constant_frame_stays_constant():
    frames = torch.full((1, 31, 47, 3), 200, dtype=torch.uint8)
    out = frames_to_model_input(frames, (224, 224))
    for c in range(3):
        expected = (200 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(out[0, c], torch.full_like(out[0, c], expected), atol=1e-5)


def test_antialiased_downscale_matches_pil_bicubic():
    # torchvision's antialiased tensor Resize follows PIL's bicubic; so must ours, within rounding.
    from PIL import Image

    img = np.asarray(_frames(n=1, h=64, w=80, seed=3)[0])
    pil = np.asarray(Image.fromarray(img).resize((32, 24), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    ours = resize(x, (24, 32), antialias=True)[0].permute(1, 2, 0).clamp(0, 255).numpy()
    assert np.abs(ours - pil).mean() < 1.0


def test_center_crop():
    x = torch.arange(5 * 7).view(1, 1, 5, 7)
    crop = center_crop(x, (3, 3))
    assert crop.tolist() == x[..., 1:4, 2:5].tolist()
    assert torch.equal(center_crop(x, (5, 7)), x)
    # torchvision's placement: top = left = round((7 - 4) / 2) = 2.
    assert center_crop(torch.arange(7 * 7).view(7, 7), (4, 4))[0, 0] == 2 * 7 + 2
    with pytest.raises(ValueError):
        center_crop(x, (6, 3))


def test_normalize_per_channel():
    x = torch.ones(1, 3, 2, 2)
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]


def test_input_checks():
    with pytest.raises(TypeError):
        frames_to_model_input(torch.zeros(1, 8, 8, 3), (8, 8))
    with pytest.raises(ValueError):
        frames_to_model_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (8, 8))
