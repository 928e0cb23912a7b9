"""Data-loading throughput of one worker: decode + sample + transform, against the ffmpeg CLI.

Writes synthetic clips (240x320, the configs' video_res, 6 fps like pre-processed MSR-VTT) to a
folder, then for each backend times what a dataset does per clip: open, sample 12 frames
uniformly (``sample_frame_indices``), decode them (``load_sampled_frames``), and turn them into
model input (``frames_to_model_input``, 224x224). One torch thread and one decoder thread, as in
a DataLoader worker, so the numbers are clips/s per worker. The ``ffmpeg`` command line is the
codec's reference: decoding every frame (null output, RGB pipe), and decoding the same 12 frames
(``select`` filter) with and without its own bicubic resize to 224x224. It pays one process
start per clip, measured separately so that the codec's own cost can be read off.

Wall-clock rates are what a worker delivers on this machine as it is; clips per CPU-second
(CPU time of this process and its finished children, the ffmpeg runs) is the cost of a clip,
which other jobs on a shared machine disturb much less: it is the column to compare.

Used by ``python -m clipvip bench --mode data`` and ``scripts/bench_decode.py``.
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from clipvip.apps.synthetic import draw_train_specs, render_clip, write_video
from clipvip.data.sampling import sample_frame_indices
from clipvip.data.transforms import frames_to_model_input
from clipvip.data.video import available_backends, load_sampled_frames


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ffmpeg runs)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(paths: Sequence[str], fn: Callable[[str], object], repeats: int) -> dict:
    """Clips per second over ``repeats`` passes (after one warm-up pass): wall-clock median and
    best pass, and clips per CPU-second over all passes."""
    for p in paths:  # warm-up: file cache, lazy imports, first-call allocations
        fn(p)
    rates, cpu = [], 0.0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for p in paths:
            fn(p)
        rates.append(len(paths) / (time.perf_counter() - start))
        cpu += cpu_seconds() - cpu_start
    return {"clips_per_s": round(statistics.median(rates), 2), "best_clips_per_s": round(max(rates), 2),
            "clips_per_cpu_s": round(len(paths) * repeats / max(cpu, 1e-9), 2)}


def write_clips(root: str, n: int, height: int, width: int, frames: int, fps: int) -> list[str]:
    """Synthetic moving shapes over a panning textured background, H.264 (libx264 crf 17).

    Flat-colour clips compress to almost nothing and decode unrealistically fast; a textured
    background moving like a slow camera pan gives bitrates in the range of pre-processed web
    video, so decoding costs what it costs on real data.
    """
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k, (spec, _) in enumerate(draw_train_specs(n, seed=0, twin_fraction=0.0)):
        shapes = render_clip(spec, height, width, frames).astype(np.float32)  # (T, H, W, 3)
        # Texture: coarse random field upsampled x8 plus fine noise, larger than the frame.
        coarse = rng.random((height // 8 + 2, (width + 4 * frames) // 8 + 2, 3), dtype=np.float32)
        texture = np.kron(coarse, np.ones((8, 8, 1), np.float32)) * 90
        texture += rng.random(texture.shape, dtype=np.float32) * 25
        pan = np.stack([texture[:height, 4 * t:4 * t + width] for t in range(frames)])  # 4 px/frame
        mask = (np.abs(shapes - spec.background).sum(-1, keepdims=True) > 0)
        video = np.where(mask, shapes, pan + spec.background)
        path = os.path.join(root, f"clip_{k:03d}.mp4")
        if not os.path.exists(path):
            write_video(path, np.clip(video, 0, 255).astype(np.uint8), fps=fps)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The ffmpeg command line, the codec's reference
# ---------------------------------------------------------------------------------------------
_FFMPEG = ["ffmpeg", "-v", "error", "-nostdin", "-threads", "1"]


def ffmpeg_decode_all(path: str, null: bool = False) -> None:
    """Every frame decoded, to raw RGB on a pipe (``null``: to ffmpeg's null muxer)."""
    out = ["-f", "null", "-"] if null else ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    subprocess.run([*_FFMPEG, "-i", path, *out], check=True, stdout=subprocess.DEVNULL)


def ffmpeg_decode_frames(path: str, indices: Sequence[int], size: Optional[int] = None) -> None:
    """Frames ``indices`` (0-based, decode order = presentation order here) to raw RGB on a pipe,
    optionally resized to ``size`` x ``size`` by swscale's bicubic filter."""
    select = "select=" + "+".join(f"eq(n\\,{i})" for i in sorted(set(indices)))
    vf = select + (f",scale={size}:{size}:flags=bicubic" if size else "")
    subprocess.run([*_FFMPEG, "-i", path, "-vf", vf, "-vsync", "passthrough",
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, stdout=subprocess.DEVNULL)


def ffmpeg_start_cpu_s(runs: int = 10) -> float:
    """CPU seconds of starting ffmpeg and doing nothing (``ffmpeg -version``)."""
    start = cpu_seconds()
    for _ in range(runs):
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-version"], check=True, stdout=subprocess.DEVNULL)
    return (cpu_seconds() - start) / runs


def ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def _without_start(row: dict, start_cpu_s: float) -> float:
    """Clips per CPU-second of ``row`` once one process start per clip is taken off."""
    return round(1.0 / max(1e-6, 1.0 / row["clips_per_cpu_s"] - start_cpu_s), 2)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def run_data_bench(num_frms: int = 12, input_res: int = 224, clips: int = 8, frames: int = 90,
                   size: str = "240x320", fps: int = 6, repeats: int = 5,
                   folder: Optional[str] = None) -> dict:
    """The report (a JSON-able dict) of one run; clips are written to ``folder`` (reused if they
    are there) or to a temporary folder that is deleted afterwards."""
    torch.set_num_threads(1)  # what torch's DataLoader sets in each worker
    tmp = None
    root = folder
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench_decode_")
        root = tmp
    try:
        height, width = (int(v) for v in size.lower().split("x"))
        t0 = time.perf_counter()
        paths = write_clips(root, clips, height, width, frames, fps)
        gen_s = time.perf_counter() - t0
        duration = frames / fps
        kbps = statistics.mean(os.path.getsize(q) * 8 / 1000 / duration for q in paths)

        def sampler(n: int) -> list[int]:
            return sample_frame_indices(n, 1, num_frms, training=True, jitter=True)

        results: dict[str, dict] = {}
        for backend in available_backends():
            def decode(path, backend=backend):
                return load_sampled_frames(path, sampler, backend)

            def full(path, backend=backend):
                frames_, _ = load_sampled_frames(path, sampler, backend)  # (12, 240, 320, 3) uint8
                return frames_to_model_input(frames_, (input_res, input_res))  # (12, 3, 224, 224)

            results[backend] = {"decode_sample": timed(paths, decode, repeats),
                                "decode_sample_transform": timed(paths, full, repeats)}
        if shutil.which("ffmpeg"):
            # The frames uniform sampling takes (without jitter, so the same every pass). Uniform
            # sampling always ends at the last frame: the whole clip is decoded either way.
            same = sample_frame_indices(frames, 1, num_frms)
            start_cpu = ffmpeg_start_cpu_s()
            rows = {
                "decode_all_frames_to_rgb_pipe": timed(paths, ffmpeg_decode_all, repeats),
                "decode_all_frames_null_output": timed(paths, lambda p: ffmpeg_decode_all(p, null=True), repeats),
                "decode_same_frames_to_rgb_pipe": timed(paths, lambda p: ffmpeg_decode_frames(p, same), repeats),
                "decode_same_frames_resize_to_rgb_pipe": timed(
                    paths, lambda p: ffmpeg_decode_frames(p, same, input_res), repeats),
            }
            for row in rows.values():
                # The codec alone: the cost per clip minus one process start.
                row["clips_per_cpu_s_without_start"] = _without_start(row, start_cpu)
            results["ffmpeg_cli"] = {**rows, "process_start_cpu_ms": round(1000 * start_cpu, 1),
                                     "version": ffmpeg_version()}
            reference = rows["decode_same_frames_to_rgb_pipe"]["clips_per_cpu_s_without_start"]
            # Cost of a clip in our worker relative to the codec decoding the same frames (1.0 =
            # as cheap as ffmpeg itself, without its process start).
            results["cost_vs_ffmpeg_same_frames"] = {
                f"{b}/{k}": round(reference / results[b][k]["clips_per_cpu_s"], 2)
                for b in available_backends() for k in ("decode_sample", "decode_sample_transform")}
        else:
            results["ffmpeg_cli"] = {"skipped": "no ffmpeg binary on PATH"}

        idx = sampler(frames)
        x = frames_to_model_input(load_sampled_frames(paths[0], lambda n: idx)[0], (input_res, input_res))
        return {
            "machine": {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(),
                        # Other jobs on the machine slow every column alike; recorded for context.
                        "load_average_1min": round(os.getloadavg()[0], 2)},
            "clips": {"count": len(paths), "size": size, "frames": frames, "fps": fps,
                      "content": "moving shapes on a panning textured background",
                      "codec": "H.264 yuv420p (libx264 crf 17, PyAV)",
                      "mean_kbit_per_s": round(kbps), "generate_s": round(gen_s, 1)},
            "per_clip": {"sampled_frames": len(idx), "model_input": list(x.shape)},
            "results": results,
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
