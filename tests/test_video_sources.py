"""Video sources other than a path on disk: encoded bytes in memory (VideoBytes, a shard member)
and the optional torchcodec backend.

Bytes must give exactly the frames the same file gives (the decoder is the same; only the I/O
differs), fail with VideoDecodeError naming the member, and never touch the disk.
"""
import logging
import os
import pickle
import random
import tempfile

import numpy as np
import pytest
import torch

from clipvip.apps.synthetic import ClipSpec, render_clip, write_video
from clipvip.data import VideoBytes
from clipvip.data import video as video_mod
from clipvip.data.retrieval_dataset import ClipReader
from clipvip.data.video import (VideoDecodeError, available_backends, count_frames, load_frames,
                                load_sampled_frames, probe_duration)

BACKENDS = available_backends()
T, H, W = 16, 64, 96
NAME = "/data/shards/00003.tar:000030017.mp4"  # a name, not a path: nothing exists there
pytestmark = pytest.mark.skipif("pyav" not in BACKENDS, reason="PyAV is required")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 16-frame H.264 clip (x264 defaults: B-frames), every frame distinct, and its bytes."""
    spec = ClipSpec("clip", "red", "circle", "right", "large", "quickly", background=30,
                    across=0.4, along=0.3)
    frames = render_clip(spec, H, W, T)
    frames = np.clip(frames.astype(int) + np.arange(T)[:, None, None, None] * 6, 0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("bytes")
    path = str(folder / "clip.mp4")
    write_video(path, frames, fps=6)
    with open(path, "rb") as f:
        data = f.read()
    return {"path": path, "data": data, "dir": folder}


@pytest.fixture
def no_temp_files(monkeypatch):
    """Fail the test if anything asks tempfile for a named file (a decoder fed through disk)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file was created while decoding bytes")

    for name in ("NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_give_the_frames_of_the_file(clip, backend, no_temp_files):
    src = VideoBytes(clip["data"], NAME)
    idx = [7, 2, 7, 15, 0, T + 3]  # unsorted, repeated, past the end (clamped)
    assert count_frames(src, backend) == count_frames(clip["path"], backend) == T
    assert torch.equal(load_frames(src, idx, backend), load_frames(clip["path"], idx, backend))
    every = load_frames(src, list(range(T)), backend)
    assert every.dtype == torch.uint8 and every.shape == (T, H, W, 3)
    seen = []
    frames, n = load_sampled_frames(src, lambda k: seen.append(k) or [0, k - 1], backend)
    assert seen == [T] and n == T and torch.equal(frames, every[[0, T - 1]])
    assert probe_duration(src) == pytest.approx(probe_duration(clip["path"]))


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"])
def test_real_clips_from_bytes_equal_the_files(real_videos, name):
    path = real_videos[name]
    with open(path, "rb") as f:
        src = VideoBytes(f.read(), f"shard.tar:{name}")
    n = count_frames(path)
    idx = np.linspace(0, n - 1, 12).round().astype(int).tolist()
    for backend in BACKENDS:
        assert count_frames(src, backend) == n
        assert torch.equal(load_frames(src, idx, backend), load_frames(path, idx, backend)), backend


def _bad_members(data: bytes) -> dict:
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],  # mp4 with the moov atom at the end: the index is lost
        "header_only": data[:64],
        "random": np.random.default_rng(0).bytes(4096),
        "text": b"not a video\n" * 10,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["empty", "truncated", "header_only", "random", "text"])
def test_bad_members_raise_video_decode_error_naming_the_member(clip, backend, kind):
    src = VideoBytes(_bad_members(clip["data"])[kind], NAME)
    with pytest.raises(VideoDecodeError) as info:
        load_frames(src, list(range(T)), backend)
    err = info.value
    assert err.path == NAME and str(err).startswith(f"cannot read video {NAME}: ")
    assert "\n" not in str(err) and "<none>" not in str(err)
    if kind == "empty":
        assert err.reason == "empty member"
    with pytest.raises(VideoDecodeError):
        count_frames(src, backend)
    back = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker processes
    assert str(back) == str(err)


def test_data_that_is_not_bytes_is_named():
    with pytest.raises(VideoDecodeError, match="video data is str, not bytes"):
        count_frames(VideoBytes("not bytes", NAME))


def test_video_bytes_pickles_and_its_repr_leaves_out_the_data(clip):
    src = VideoBytes(clip["data"], NAME)
    assert pickle.loads(pickle.dumps(src)) == src
    assert repr(src) == f"VideoBytes(name={NAME!r}, {len(clip['data'])} bytes)"


@pytest.mark.skipif("decord" not in BACKENDS, reason="decord is not installed")
def test_decord_failure_on_bytes_retries_with_pyav_from_the_start(clip, monkeypatch, caplog):
    """The retry gets a fresh in-memory file: the failed reader consumed its own to the end."""
    class ConsumingFailure:
        def __init__(self, source):
            video_mod._open_arg(source).read()  # what decord does: read the whole file object
            raise RuntimeError("simulated decord failure")

    monkeypatch.setitem(video_mod._READERS, "decord", ConsumingFailure)
    src = VideoBytes(clip["data"], NAME)
    with caplog.at_level(logging.WARNING, logger="clipvip"):
        frames = load_frames(src, [0, 5, 15], "decord")
    assert torch.equal(frames, load_frames(clip["path"], [0, 5, 15], "pyav"))
    assert any(NAME in r.getMessage() and "read it with PyAV" in r.getMessage() for r in caplog.records)


def test_clip_reader_reads_bytes_and_does_not_cache_them(clip):
    reader = ClipReader(n_clips=1, num_frms=4, sample_rate=0, input_res=(32, 32), training=False,
                        jitter=False, backend="pyav", cache={})
    from_bytes, middle = reader.read_video(VideoBytes(clip["data"], NAME), random.Random(0), with_middle=True)
    assert reader.cache == {}  # bytes are never cached (the cache is keyed by path)
    from_file, middle_file = reader.read_video(clip["path"], random.Random(0), with_middle=True)
    assert list(reader.cache) == [clip["path"]]
    assert from_bytes.shape == (4, 3, 32, 32) and middle.shape == (3, 32, 32)
    assert torch.equal(from_bytes, from_file) and torch.equal(middle, middle_file)
