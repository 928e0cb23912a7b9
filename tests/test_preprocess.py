"""scripts/preprocess_videos.py on two synthetic clips, a corrupt file and an empty one."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F

from clipvip.data.synthetic import ClipSpec, render_clip, write_video
from clipvip.data.video import count_folder_frames, count_frames, load_frame_folder, load_frames

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
