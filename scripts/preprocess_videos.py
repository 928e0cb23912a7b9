#!/usr/bin/env python
"""Re-encode raw videos at a fixed frame rate and size, or dump them as frame folders.

The original CLIP-ViP trained on pre-processed copies of the datasets (MSR-VTT at 6 fps; the
configs' ``video_res`` is 240x320), made with the ffmpeg command line; decoding a short
low-resolution clip is what keeps a data loader ahead of the GPU. This script does the same job
in-process through PyAV (no ffmpeg binary needed). Two outputs:

* videos (default): ``{out}/{relative path}.mp4``, H.264 yuv420p, no audio, constant frame rate:
  frame k has timestamp k / fps, so every player and both of our decoders (decord, PyAV) agree on
  which frame is frame k;
* ``--frames`` (ActivityNet, ``vis_format: "frame"``): ``{out}/{clip_id}/{clip_id}_{i:03d}.jpg``
  numbered from 0, the layout ``clipvip.data.video.load_frame_folder`` reads, plus
  ``{out}/frames.jsonl`` with ``{"clip_id", "num_frame"}`` for the annotations.

Frame rate: for each output time k / fps the decoded source frame nearest in time is kept (frames
are dropped or repeated), as ffmpeg's ``fps`` filter does; ``--fps 0`` keeps every frame and
re-times it at the source's average rate.

Resizing: every frame is scaled to exactly ``--size`` (the aspect ratio is not kept, as the model's
own transform does not keep it) by libswscale, the scaler inside ffmpeg, called through PyAV. The
kernel is ``--resize-kernel``, bicubic by default: that is the ffmpeg command line's default for its
``scale`` filter (swscale's cubic with B=0, C=0.6, its support widened by the scale factor when
shrinking, so downscaling is antialiased), so the frames match what the original's preprocessing
with ffmpeg produced, give or take the encoder's own losses. Videos are scaled in YUV 4:2:0
before encoding; frame folders are scaled and converted to RGB in the same swscale call, then
written as JPEG by Pillow.

Runs are idempotent: an output that exists, decodes, and has the requested frame rate and size and
valid timestamps is skipped (so outputs of an older, broken version of this script are redone),
outputs are written under a temporary name and renamed when complete, and inputs that cannot be
read are listed in ``{out}/failed.txt`` (path, tab, reason) instead of stopping the run.

    python scripts/preprocess_videos.py raw/msrvtt/videos data/msrvtt/videos_6fps --fps 6
    python scripts/preprocess_videos.py raw/anet data/anet/frames --frames --fps 1 --workers 8
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from typing import Optional, Sequence

# The re-encoding itself is library code (clipvip shard --reencode uses it too).
from clipvip.data.reencode import (DEFAULT_KERNEL, RESIZE_KERNELS, VIDEO_EXTS, dump_frames, encode_video,
                                   frames_ok, video_ok)

# The names this script had before the move (tests and older callers use them).
_video_ok, _frames_ok = video_ok, frames_ok


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
def _job(args) -> tuple[str, str, str, int, str]:
    """Process one input; returns (input, clip_id, status ok|skipped|failed, frames, reason)."""
    src, clip_id, dst, opts = args
    try:
        if opts["frames"]:
            done = frames_ok(dst, clip_id)
        else:
            done = video_ok(dst, opts["fps"], opts["height"], opts["width"])
        if done:
            return src, clip_id, "skipped", done, ""
        if not os.path.isfile(src):
            raise ValueError("no such file")
        if os.path.getsize(src) == 0:
            raise ValueError("empty file")
        if opts["frames"]:
            n = dump_frames(src, dst, clip_id, opts["fps"], opts["height"], opts["width"],
                            opts["quality"], opts["single_thread"], opts["kernel"])
        else:
            n = encode_video(src, dst, opts["fps"], opts["height"], opts["width"], opts["crf"],
                             opts["single_thread"], opts["kernel"])
        return src, clip_id, "ok", n, ""
    except Exception as e:  # noqa: BLE001 - one broken input never stops the run
        reason = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
        return src, clip_id, "failed", 0, reason


def find_inputs(root: str, list_file: Optional[str] = None) -> list[str]:
    """Video files under ``root`` (recursively), or the paths listed in ``list_file``."""
    if list_file:
        with open(list_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        return [n if os.path.isabs(n) else os.path.join(root, n) for n in names]
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(VIDEO_EXTS):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def _parse_size(text: str) -> tuple[int, int]:
    if text in ("0", "source", "keep"):
        return 0, 0
    h, w = (int(v) for v in text.lower().split("x"))
    if h % 2 or w % 2 or h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be HxW with even positive values, got {text}")
    return h, w


def main(argv: Optional[Sequence[str]] = None) -> int:
    # The whole docstring: what is done to the frames (rate, resize kernel) belongs in --help.
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder of raw videos (searched recursively)")
    p.add_argument("output", help="output folder")
    p.add_argument("--list", help="text file of input paths (relative to INPUT) instead of a search")
    p.add_argument("--fps", type=float, default=6.0,
                   help="output frame rate: the nearest source frame is kept for each output time; "
                        "0 keeps every frame, re-timed at the source's average rate (6)")
    p.add_argument("--size", type=_parse_size, default=(240, 320),
                   help="output HxW, scaled without keeping the aspect ratio, as the model's "
                        "transform does; 0 keeps the source size (240x320: the configs' video_res)")
    p.add_argument("--resize-kernel", choices=sorted(RESIZE_KERNELS), default=DEFAULT_KERNEL,
                   help="libswscale (ffmpeg's scaler, through PyAV) kernel for --size; the default "
                        "bicubic (B=0, C=0.6, antialiased when shrinking) is the default of "
                        "ffmpeg's scale filter, the original's preprocessing tool "
                        f"({DEFAULT_KERNEL})")
    p.add_argument("--frames", action="store_true", help="write frame folders instead of videos")
    p.add_argument("--crf", type=int, default=23, help="x264 quality for videos (23)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for --frames (95)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    args = p.parse_args(argv)

    from tqdm import tqdm

    inputs = find_inputs(args.input, args.list)
    os.makedirs(args.output, exist_ok=True)
    opts = {"frames": args.frames, "fps": args.fps, "height": args.size[0], "width": args.size[1],
            "crf": args.crf, "quality": args.quality, "single_thread": args.workers > 1,
            "kernel": args.resize_kernel}
    jobs = []
    for src in inputs:
        rel = os.path.relpath(src, args.input)
        if args.frames:
            clip_id = os.path.splitext(os.path.basename(src))[0]
            dst = os.path.join(args.output, clip_id)
        else:
            clip_id = os.path.splitext(rel)[0]
            dst = os.path.join(args.output, clip_id + ".mp4")
        jobs.append((src, clip_id, dst, opts))

    results = []
    bar = tqdm(total=len(jobs), unit="video", desc="frames" if args.frames else "videos")
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context().Pool(args.workers) as pool:
            for r in pool.imap_unordered(_job, jobs):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_job(job))
            bar.update()
    bar.close()

    results.sort()
    failed = [r for r in results if r[2] == "failed"]
    with open(os.path.join(args.output, "failed.txt"), "w", encoding="utf-8") as f:
        for src, _, _, _, reason in failed:
            f.write(f"{src}\t{reason}\n")
    if args.frames:
        with open(os.path.join(args.output, "frames.jsonl"), "w", encoding="utf-8") as f:
            for _, clip_id, status, n, _ in sorted(results, key=lambda r: r[1]):
                if status != "failed":
                    f.write(json.dumps({"clip_id": clip_id, "num_frame": n}) + "\n")
    counts = {s: sum(r[2] == s for r in results) for s in ("ok", "skipped", "failed")}
    print(json.dumps({"inputs": len(results), **counts, "output": os.path.abspath(args.output)}))
    if failed:
        print(f"{len(failed)} input(s) could not be read; see {os.path.join(args.output, 'failed.txt')}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
