#!/usr/bin/env python
"""Data-loading throughput of one worker: decode + sample + transform, decord vs PyAV.

Writes synthetic clips (240x320, the configs' video_res, 6 fps like pre-processed MSR-VTT) to
a temporary folder, then for each backend times what a dataset does per clip: open, sample
12 frames uniformly (``sample_frame_indices``), decode them (``load_sampled_frames``), and turn
them into model input (``frames_to_model_input``, 224x224). One torch thread and one decoder
thread, as in a DataLoader worker, so the numbers are clips/s per worker. The ``ffmpeg``
command line decoding every frame of the same clips (to a null output, and to raw RGB on a
pipe) is the reference for the codec itself; it pays one process start per clip (skipped,
with a note, where no ffmpeg binary is installed).

    python scripts/bench_decode.py --clips 8 --frames 90 --repeats 5

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ffmpeg runs)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(paths: list[str], fn: Callable[[str], object], repeats: int) -> dict:
    """Clips per second over ``repeats`` passes (after one warm-up pass).

    Wall-clock rates (median and best pass) are what a worker delivers on this machine as it
    is; clips per CPU-second is the cost of a clip, which other jobs on a shared machine
    disturb much less, so it is the column to compare between runs.
    """
    for p in paths:  # warm-up: file cache, lazy imports, first-call allocations
        fn(p)
    rates, cpu = [], 0.0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        for p in paths:
            fn(p)
        rates.append(len(paths) / (time.perf_counter() - start))
        cpu += _cpu_seconds() - cpu_start
    return {"clips_per_s": round(statistics.median(rates), 2), "best_clips_per_s": round(max(rates), 2),
            "clips_per_cpu_s": round(len(paths) * repeats / cpu, 2)}


def _write_clips(root: str, n: int, height: int, width: int, frames: int, fps: int) -> list[str]:
    """Synthetic moving shapes over a panning textured background.

    The benchmark's flat-colour clips compress to almost nothing and decode unrealistically
    fast; a textured background moving like a slow camera pan gives bitrates in the range of
    pre-processed web video, so decoding costs what it costs on real data.
    """
    import numpy as np

    from clipvip.data.synthetic import draw_train_specs, render_clip, write_video

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
        write_video(path, np.clip(video, 0, 255).astype(np.uint8), fps=fps)
        paths.append(path)
    return paths


def _ffmpeg_decode(path: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-threads", "1", "-i", path,
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                   check=True, stdout=subprocess.DEVNULL)


def _ffmpeg_decode_only(path: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-threads", "1", "-i", path, "-f", "null", "-"],
                   check=True, stdout=subprocess.DEVNULL)


def _ffmpeg_start_cpu_s(runs: int = 10) -> float:
    """CPU seconds of starting ffmpeg and doing nothing (``ffmpeg -version``)."""
    start = _cpu_seconds()
    for _ in range(runs):
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-version"], check=True,
                       stdout=subprocess.DEVNULL)
    return (_cpu_seconds() - start) / runs


def _ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8, help="distinct clips per pass")
    p.add_argument("--frames", type=int, default=90, help="frames per clip (90 = 15 s at 6 fps)")
    p.add_argument("--size", default="240x320", help="clip HxW")
    p.add_argument("--fps", type=int, default=6)
    p.add_argument("--num-frms", type=int, default=12, help="frames sampled per clip")
    p.add_argument("--input-res", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="reuse clips in this folder instead of a temporary one")
    args = p.parse_args(argv)

    import torch

    from clipvip.data import (available_backends, frames_to_model_input, load_sampled_frames,
                              sample_frame_indices)

    torch.set_num_threads(1)  # what torch's DataLoader sets in each worker
    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench_decode_")
        root = tmp
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
        t0 = time.perf_counter()
        paths = _write_clips(root, args.clips, height, width, args.frames, args.fps)
        gen_s = time.perf_counter() - t0
        duration = args.frames / args.fps
        kbps = statistics.mean(os.path.getsize(q) * 8 / 1000 / duration for q in paths)

        def sampler(n: int) -> list[int]:
            return sample_frame_indices(n, 1, args.num_frms, training=True, jitter=True)

        results: dict[str, dict] = {}
        for backend in available_backends():
            def decode(path, backend=backend):
                return load_sampled_frames(path, sampler, backend)

            def full(path, backend=backend):
                frames, _ = load_sampled_frames(path, sampler, backend)  # (12, 240, 320, 3) uint8
                return frames_to_model_input(frames, (args.input_res, args.input_res))  # (12, 3, 224, 224)

            results[backend] = {"decode_sample": _timed(paths, decode, args.repeats),
                                "decode_sample_transform": _timed(paths, full, args.repeats)}
        if shutil.which("ffmpeg"):
            # Every frame decoded (inter-coded frames need their references anyway), converted
            # to RGB and piped out; includes starting one process per clip.
            null = _timed(paths, _ffmpeg_decode_only, args.repeats)
            start_cpu = _ffmpeg_start_cpu_s()
            results["ffmpeg_cli"] = {
                "decode_all_frames_to_rgb_pipe": _timed(paths, _ffmpeg_decode, args.repeats),
                "decode_all_frames_null_output": null,
                # The codec alone: the null-output cost per clip minus one process start.
                "process_start_cpu_ms": round(1000 * start_cpu, 1),
                "null_output_without_start_clips_per_cpu_s":
                    round(1.0 / max(1e-6, 1.0 / null["clips_per_cpu_s"] - start_cpu), 2),
                "version": _ffmpeg_version()}
        else:
            results["ffmpeg_cli"] = {"skipped": "no ffmpeg binary on PATH"}

        frames = sampler(args.frames)
        x = frames_to_model_input(load_sampled_frames(paths[0], lambda n: frames)[0],
                                  (args.input_res, args.input_res))
        report = {
            "machine": {"cpu": _cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(),
                        # Other jobs on the machine slow every column alike; recorded for context.
                        "load_average_1min": round(os.getloadavg()[0], 2)},
            "clips": {"count": len(paths), "size": args.size, "frames": args.frames, "fps": args.fps,
                      "content": "moving shapes on a panning textured background",
                      "codec": "H.264 yuv420p (libx264 crf 17, PyAV)",
                      "mean_kbit_per_s": round(kbps), "generate_s": round(gen_s, 1)},
            "per_clip": {"sampled_frames": len(frames), "model_input": list(x.shape)},
            "results": results,
        }
        print(json.dumps(report, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
