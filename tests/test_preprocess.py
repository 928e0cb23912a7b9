"""scripts/preprocess_videos.py on synthetic clips, a corrupt file, an empty one, and real footage."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipvip.apps.synthetic import ClipSpec, render_clip, write_video
from clipvip.data.video import (available_backends, count_folder_frames, count_frames, load_frame_folder,
                                load_frames)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "preprocess_videos.py"
T, FPS = 12, 6  # 2 s of video


@pytest.fixture(scope="module")
def pre():
    spec = importlib.util.spec_from_file_location("preprocess_videos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered by name so worker processes can unpickle its functions.
    sys.modules["preprocess_videos"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("preprocess_videos", None)


@pytest.fixture()
def raw(tmp_path):
    root = tmp_path / "raw"
    for k, (colour, direction) in enumerate([("red", "left"), ("blue", "up")]):
        s = ClipSpec(f"v{k}", colour, "square", direction, "large", "quickly", 20, 0.5, 0.5)
        sub = root / "sub" if k else root
        write_video(str(sub / f"video{k}.mp4"), render_clip(s, 48, 64, T), fps=FPS)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.avi").write_bytes(b"")
    (root / "notes.txt").write_text("not a video")
    return root


def _failed(out):
    lines = (out / "failed.txt").read_text().splitlines()
    return sorted(os.path.basename(line.split("\t")[0]) for line in lines)


def test_reencode_videos(pre, raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert pre.main([str(raw), str(out), "--fps", "3", "--size", "32x40", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] == 2 and summary["failed"] == 2 and summary["inputs"] == 4
    assert _failed(out) == ["broken.mp4", "empty.avi"]
    first = out / "video0.mp4"
    nested = out / "sub" / "video1.mp4"  # the folder structure is kept
    for path in (first, nested):
        assert count_frames(str(path), "pyav") == 6  # 2 s at 3 fps
        assert load_frames(str(path), [0], "pyav").shape == (1, 32, 40, 3)
    # Halving the frame rate keeps every other frame: output frame k is closest to source 2k.
    src = load_frames(str(raw / "video0.mp4"), range(T), "pyav").float().permute(0, 3, 1, 2)
    src = F.interpolate(src, size=(32, 40), mode="bicubic", antialias=True, align_corners=False)
    dst = load_frames(str(first), range(6), "pyav").float().permute(0, 3, 1, 2)
    err = (dst[:, None] - src[None]).abs().mean(dim=(2, 3, 4))  # (6, T)
    assert err.argmin(dim=1).tolist() == [0, 2, 4, 6, 8, 10]

    # A second run skips the finished outputs and redoes a broken one.
    mtime = first.stat().st_mtime_ns
    nested.write_bytes(b"garbage")
    assert pre.main([str(raw), str(out), "--fps", "3", "--size", "32x40", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {**summary, "ok": 1, "skipped": 1, "failed": 2}
    assert first.stat().st_mtime_ns == mtime
    assert count_frames(str(nested), "pyav") == 6
    assert not list(out.rglob("*.tmp*"))


def test_frame_folders(pre, raw, tmp_path, capsys):
    out = tmp_path / "frames"
    assert pre.main([str(raw), str(out), "--frames", "--fps", "0", "--size", "0", "--workers", "1"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert records == [{"clip_id": "video0", "num_frame": T}, {"clip_id": "video1", "num_frame": T}]
    assert (out / "video0" / "video0_000.jpg").is_file()  # numbered from 0
    assert count_folder_frames(str(out), "video1") == T
    frames = load_frame_folder(str(out), "video0", [0, T - 1])
    video = load_frames(str(raw / "video0.mp4"), [0, T - 1], "pyav")
    assert frames.shape == video.shape == (2, 48, 64, 3)
    assert (frames.float() - video.float()).abs().mean() < 3
    assert _failed(out) == ["broken.mp4", "empty.avi"]
    # Idempotent: nothing is redone.
    assert pre.main([str(raw), str(out), "--frames", "--fps", "0", "--size", "0", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 2 and summary["ok"] == 0


def test_input_list_and_bad_size(pre, raw, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("video0.mp4\nmissing.mp4\n")
    out = tmp_path / "listed"
    assert pre.main([str(raw), str(out), "--list", str(listing), "--size", "16x16", "--workers", "1"]) == 0
    assert (out / "video0.mp4").is_file()
    assert _failed(out) == ["missing.mp4"]
    with pytest.raises(SystemExit):
        pre.main([str(raw), str(out), "--size", "15x16"])


# ------------------------------------------------------------------------------ real footage
# Issue 17: outputs whose every pts was 0 (the source's 1/12800 time base left on the frames)
# decoded with the right frame count, so only timestamps and a decord-vs-PyAV comparison on real
# camera footage show the damage: decord seeks by pts and returned frame 56 for 59.
def _pyav_frames(path):
    """(frames uint8 [N, H, W, 3], presentation times in s, stream) of every frame, in order."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames, times = [], []
        for f in c.decode(stream):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(f.time)
        info = {"rate": stream.average_rate, "frames": stream.frames,
                "duration": float(stream.duration * stream.time_base),
                "container_duration": c.duration / 1e6, "size": (stream.height, stream.width)}
    return np.stack(frames), times, info


def _source_info(path):
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        times = [f.time for f in c.decode(stream)]
        return stream.average_rate, times


@pytest.fixture(scope="module")
def real_raw(real_videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_raw")
    for name in ("bikes.mp4", "carphone_pristine.mp4"):  # 640x272 25 fps, 176x144 29.97 fps
        os.symlink(real_videos[name], root / name)
    return root


@pytest.mark.parametrize("fps", [6, 0])
def test_real_footage_plays_and_decodes_alike(pre, real_raw, tmp_path, capfd, fps):
    from fractions import Fraction

    out = tmp_path / f"out{fps}"
    # Every frame of the 250 of bikes would take seconds more: at fps 0 the NTSC-rate clip only.
    names = ["bikes.mp4", "carphone_pristine.mp4"] if fps else ["carphone_pristine.mp4"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(names))
    # The README's command, at the configs' size.
    assert pre.main([str(real_raw), str(out), "--list", str(listing), "--fps", str(fps),
                     "--size", "240x320", "--workers", "1"]) == 0
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] == len(names) and summary["failed"] == 0
    for name in names:
        src_rate, src_times = _source_info(real_raw / name)
        rate = Fraction(fps) if fps else src_rate
        # Output time k / fps exists while it does not pass the last source frame.
        n = len(src_times) if fps == 0 else int((src_times[-1] - src_times[0]) * fps + 1e-6) + 1
        frames, times, info = _pyav_frames(out / name)
        assert len(frames) == info["frames"] == n, name
        assert info["size"] == (240, 320)
        assert info["rate"] == rate, name  # the old script: 360, 144 fps
        assert info["duration"] == pytest.approx(n / rate, abs=1e-3)  # the old: 0.167 s
        assert info["container_duration"] == pytest.approx(n / rate, abs=1e-3)
        # Strictly increasing presentation times, frame k at k / rate.
        assert times == pytest.approx([k / rate for k in range(n)], abs=1e-4)

        if "decord" not in available_backends():
            continue
        import decord

        # decord on its own (no stderr filter of ours): every frame, then a fresh reader asked for
        # the datasets' 12 uniform frames (seeks), both exactly PyAV's frames. Both decoders
        # convert YUV to RGB with swscale's defaults, so equality is exact, not approximate.
        capfd.readouterr()
        every = decord.VideoReader(str(out / name), num_threads=1)
        assert len(every) == n
        assert np.array_equal(every.get_batch(list(range(n))).asnumpy(), frames), name
        idx = np.linspace(0, n - 1, 12).round().astype(int).tolist()
        seeking = decord.VideoReader(str(out / name), num_threads=1)
        assert np.array_equal(seeking.get_batch(idx).asnumpy(), frames[idx]), (name, idx)
        assert np.array_equal(seeking[n - 1].asnumpy(), frames[n - 1])  # a backward seek after
        del every, seeking
        err = capfd.readouterr().err
        assert "corrupted" not in err and "ERROR" not in err, err
        # And through the library, default backend and PyAV alike.
        assert torch.equal(load_frames(str(out / name), idx), load_frames(str(out / name), idx, "pyav"))


def _broken_old_output(path, n=12, size=(240, 320)):
    """What the script wrote before the fix: 6 fps declared, frames carrying a 1/12800 time base."""
    import av
    from fractions import Fraction

    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 6)
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 12800)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_outputs_of_the_broken_version_are_redone(pre, raw, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _broken_old_output(out / "video0.mp4", n=6, size=(32, 40))
    assert pre._video_ok(str(out / "video0.mp4")) is None  # every pts 0
    assert pre.main([str(raw), str(out), "--fps", "3", "--size", "32x40", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] == 2 and summary["skipped"] == 0
    assert pre._video_ok(str(out / "video0.mp4"), 3, 32, 40) == 6
    # Another rate or size is another output, not a finished one.
    assert pre._video_ok(str(out / "video0.mp4"), 6, 32, 40) is None
    assert pre._video_ok(str(out / "video0.mp4"), 3, 48, 64) is None


@pytest.mark.parametrize("kernel", ["bicubic", "neighbor"])
def test_frame_folders_of_real_footage(pre, real_raw, tmp_path, capsys, kernel):
    """--frames at 6 fps: the nearest source frames, scaled with the kernel asked for."""
    import av

    out = tmp_path / "frames"
    args = [str(real_raw), str(out), "--frames", "--fps", "6", "--size", "136x320", "--workers", "1"]
    assert pre.main(args + ["--resize-kernel", kernel]) == 0
    capsys.readouterr()
    with av.open(str(real_raw / "bikes.mp4")) as c:  # 25 fps from t = 0
        src = list(c.decode(video=0))
    n = count_folder_frames(str(out), "bikes")
    assert n == 60  # 10 s
    # Output k is due at k / 6 s: the nearest of the source frames i / 25 (ties, at k = 3 mod 6,
    # depend on timestamp rounding and are left out).
    ks = [k for k in range(n) if k % 6 != 3]
    got = load_frame_folder(str(out), "bikes", ks).numpy().astype(np.float32)  # (K, 136, 320, 3)

    def scaled(interpolation):
        return np.stack([src[round(k * 25 / 6)].to_ndarray(width=320, height=136, format="rgb24",
                                                           interpolation=interpolation) for k in ks])

    own = {"bicubic": "BICUBIC", "neighbor": "POINT"}[kernel]
    other = {"bicubic": "POINT", "neighbor": "BICUBIC"}[kernel]
    err_own = np.abs(got - scaled(own)).mean()
    err_other = np.abs(got - scaled(other)).mean()
    assert err_own < 2.0, err_own  # JPEG at quality 95 (1.3 measured)
    assert err_own < 0.6 * err_other, (err_own, err_other)


def test_help_names_the_resize_kernel(pre, capsys):
    with pytest.raises(SystemExit):
        pre.main(["--help"])
    text = capsys.readouterr().out
    assert "--resize-kernel" in text and "libswscale" in text and "bicubic" in text
    with pytest.raises(SystemExit):
        pre.main(["a", "b", "--resize-kernel", "magic"])
