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

from conftest import write_distinct_clip
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
    folder = tmp_path_factory.mktemp("bytes")
    path = str(folder / "clip.mp4")
    write_distinct_clip(path, T, H, W)
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


# ---------------------------------------------------------------------------------------------
# torchcodec: optional, imported only when asked for
# ---------------------------------------------------------------------------------------------
TORCHCODEC_ERROR = video_mod.backend_import_error("torchcodec")  # None where it loads
needs_torchcodec = pytest.mark.skipif(TORCHCODEC_ERROR is not None,
                                      reason=f"torchcodec cannot be loaded here: {TORCHCODEC_ERROR}")


def test_torchcodec_is_never_imported_unless_asked_for():
    import subprocess
    import sys

    code = ("import sys, clipvip.data as d; d.resolve_backend(None); d.available_backends(); "
            "d.resolve_backend('pyav'); print('torchcodec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "torchcodec" not in available_backends()  # not in the default order even where it loads


def test_unloadable_torchcodec_is_a_one_line_config_and_import_error(monkeypatch):
    from clipvip.errors import ConfigError

    monkeypatch.setitem(video_mod._importable, "torchcodec", False)
    monkeypatch.setitem(video_mod._import_errors, "torchcodec",
                        "OSError: Could not load this library: libtorchcodec_core7.so "
                        "(libnvrtc.so.13: cannot open shared object file: No such file or directory)")
    monkeypatch.setenv("CLIPVIP_VIDEO_BACKEND", "torchcodec")
    for asked in ("torchcodec", None):  # by name or through $CLIPVIP_VIDEO_BACKEND
        with pytest.raises(ImportError) as info:
            video_mod.resolve_backend(asked)
        message = str(info.value)
        assert isinstance(info.value, ConfigError) and "\n" not in message
        assert "libnvrtc.so.13" in message and "CUDA build of torch" in message and "'pyav'" in message
    assert video_mod.available_backends(optional=True) == available_backends()


def test_the_real_import_error_is_reported_in_one_line():
    if TORCHCODEC_ERROR is None:
        pytest.skip("torchcodec loads here")
    assert "\n" not in TORCHCODEC_ERROR and TORCHCODEC_ERROR.split(":", 1)[0].endswith("Error")
    with pytest.raises(ImportError, match="torchcodec' cannot be loaded here"):
        video_mod.resolve_backend("torchcodec")


class _FakeFrameBatch:
    def __init__(self, data):
        self.data = data


class _FakeVideoDecoder:
    """torchcodec's VideoDecoder as far as the reader uses it, decoding with PyAV (see below)."""
    calls: list = []

    def __init__(self, source, *, dimension_order, num_ffmpeg_threads, device, seek_mode):
        type(self).calls.append({"source_type": type(source), "dimension_order": dimension_order,
                                 "threads": num_ffmpeg_threads, "device": device, "seek_mode": seek_mode})
        src = VideoBytes(source, "fake") if isinstance(source, bytes) else source
        self._frames = load_frames(src, list(range(count_frames(src, "pyav"))), "pyav")  # (N, H, W, 3)

    def __len__(self):
        return self._frames.shape[0]

    def get_frames_at(self, indices):
        if max(indices) >= len(self):  # the real one raises on an index past the end
            raise IndexError(f"Invalid frame index={max(indices)}")
        return _FakeFrameBatch(self._frames[list(indices)])


@pytest.fixture
def fake_torchcodec(monkeypatch):
    """A stand-in torchcodec: checks the reader's side (bytes in, clamping, NHWC, one thread)
    where the real wheel cannot load; the real one is tested below and by scripts/gpu_check.sh."""
    import sys
    import types

    package, decoders = types.ModuleType("torchcodec"), types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = _FakeVideoDecoder
    package.decoders = decoders
    monkeypatch.setitem(sys.modules, "torchcodec", package)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    monkeypatch.setitem(video_mod._importable, "torchcodec", True)
    _FakeVideoDecoder.calls = []
    return _FakeVideoDecoder


def test_torchcodec_reader_against_a_stand_in(clip, fake_torchcodec):
    idx = [7, 2, 7, 15, 0, T + 3, T + 9]  # repeats, and two indices past the end (one frame)
    expected = load_frames(clip["path"], idx, "pyav")
    src = VideoBytes(clip["data"], NAME)
    assert torch.equal(load_frames(src, idx, "torchcodec"), expected)
    assert torch.equal(load_frames(clip["path"], idx, "torchcodec"), expected)
    assert count_frames(src, "torchcodec") == T
    assert [c["source_type"] for c in fake_torchcodec.calls[:2]] == [bytes, str]
    assert all(c["threads"] == 1 and c["dimension_order"] == "NHWC" and c["device"] == "cpu"
               and c["seek_mode"] == "exact" for c in fake_torchcodec.calls)
    on_device, n = video_mod.load_sampled_frames_on_device(src, lambda k: idx, device="cpu")
    assert torch.equal(on_device, expected) and n == T and fake_torchcodec.calls[-1]["device"] == "cpu"
    with pytest.raises(VideoDecodeError, match="empty member"):
        video_mod.load_sampled_frames_on_device(VideoBytes(b"", NAME), lambda k: [0])
    with pytest.raises(ValueError):
        video_mod.load_sampled_frames_on_device(src, lambda k: [])


def test_torchcodec_failure_names_the_member_without_a_pyav_retry(clip, fake_torchcodec, monkeypatch):
    def fail(self, source, **kwargs):
        raise RuntimeError("Could not open input file")

    monkeypatch.setattr(fake_torchcodec, "__init__", fail)
    with pytest.raises(VideoDecodeError) as info:
        load_frames(VideoBytes(clip["data"], NAME), [0], "torchcodec")
    assert info.value.path == NAME and info.value.reason == "torchcodec: RuntimeError: Could not open input file"
    with pytest.raises(VideoDecodeError, match=r"torchcodec \(cuda\): RuntimeError"):
        video_mod.load_sampled_frames_on_device(VideoBytes(clip["data"], NAME), lambda k: [0], device="cuda")


# Where torchcodec loads (scripts/gpu_check.sh). CPU decoding: the same H.264 decoder output (a
# bit-exact standard) converted by libswscale with SWS_BILINEAR and the frame's colour matrix, as
# PyAV 18 does; the bound allows the +-1..2 levels of a different libswscale build (torchcodec
# links the system FFmpeg, PyAV bundles its own), as tests/test_fidelity.py does for decord.
# NVDEC: NVIDIA's decoder gives the same YUV, but torchcodec converts it to RGB with its own CUDA
# kernels (NPP colour twist, chroma upsampled differently): a few levels apart, never a whole frame.
CPU_MAX_LEVELS, CPU_MEAN_LEVELS = 2, 0.1
GPU_MEAN_LEVELS = 3.0


def _closest_frame_is_its_own(got, ref):
    ref = ref.to(torch.float32)
    for k in range(got.shape[0]):
        errs = (ref - got[k].to(torch.float32)).abs().mean(dim=(1, 2, 3))
        assert int(errs.argmin()) == k or errs[k] == errs.min()


@needs_torchcodec
@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4"])
def test_real_torchcodec_matches_pyav_on_real_clips(real_videos, name):
    path = real_videos[name]
    with open(path, "rb") as f:
        src = VideoBytes(f.read(), f"shard.tar:{name}")
    n = count_frames(path, "pyav")
    assert count_frames(src, "torchcodec") == n
    idx = np.linspace(0, n - 1, 12).round().astype(int).tolist()
    ref = load_frames(path, idx, "pyav")
    got = load_frames(src, idx, "torchcodec")
    assert torch.equal(got, load_frames(path, idx, "torchcodec"))
    diff = (got.to(torch.int16) - ref.to(torch.int16)).abs()
    assert diff.max() <= CPU_MAX_LEVELS and diff.float().mean() <= CPU_MEAN_LEVELS, (diff.max(), diff.float().mean())
    assert torch.equal(load_frames(src, [n - 1, n + 5], "torchcodec")[1], got[-1])  # clamped


@needs_torchcodec
@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_real_torchcodec_bad_members(clip, kind):
    src = VideoBytes(_bad_members(clip["data"])[kind], NAME)
    with pytest.raises(VideoDecodeError) as info:
        load_frames(src, list(range(T)), "torchcodec")
    assert info.value.path == NAME and "\n" not in str(info.value)


@needs_torchcodec
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC needs a CUDA GPU")
def test_real_torchcodec_nvdec_matches_cpu(real_videos):
    path = real_videos["bikes.mp4"]
    n = count_frames(path, "pyav")
    idx = np.linspace(0, n - 1, 12).round().astype(int).tolist()
    with open(path, "rb") as f:
        got, _ = video_mod.load_sampled_frames_on_device(VideoBytes(f.read(), "bikes"), lambda k: idx, device="cuda")
    assert got.is_cuda and got.dtype == torch.uint8 and got.shape[-1] == 3
    ref = load_frames(path, idx, "pyav")
    diff = (got.cpu().to(torch.int16) - ref.to(torch.int16)).abs().float()
    assert diff.mean() <= GPU_MEAN_LEVELS, diff.mean()
    _closest_frame_is_its_own(got.cpu(), ref)
