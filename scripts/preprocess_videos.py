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
import shutil
import sys
from fractions import Fraction
from typing import Iterator, Optional, Sequence

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv")

# --resize-kernel: ffmpeg's names for its scaler flags -> PyAV's names for the same swscale flags.
RESIZE_KERNELS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "area": "AREA",
                  "lanczos": "LANCZOS", "neighbor": "POINT"}
DEFAULT_KERNEL = "bicubic"


# ---------------------------------------------------------------------------------------------
# Frames at the target rate and size
# ---------------------------------------------------------------------------------------------
def _resampled_frames(path: str, fps: float, single_thread: bool) -> Iterator:
    """Decoded ``av.VideoFrame``s of ``path`` at ``fps`` (0: every frame).

    For each output time ``k / fps`` the decoded frame nearest in time is kept (frames are
    repeated or dropped as needed), which is what ffmpeg's ``fps`` filter does.
    """
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if not single_thread:
            stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        step = 1.0 / fps if fps > 0 else None
        k = 0  # next output frame, due at time k * step
        first_t = None
        prev, prev_t = None, 0.0
        for i, frame in enumerate(container.decode(stream)):
            if step is None:
                yield frame
                continue
            t = frame.time if frame.time is not None else i / rate
            if first_t is None:
                first_t = t  # streams need not start at 0
            t -= first_t
            while k * step <= t + 1e-6:  # epsilon: timestamps are rounded to the time base
                # Output time k * step lies in (prev_t, t]: keep the nearer of the two frames.
                due = k * step
                yield prev if prev is not None and due - prev_t < t - due else frame
                k += 1
            prev, prev_t = frame, t


def _source_rate(path: str) -> Fraction:
    import av

    with av.open(path) as c:
        stream = c.streams.video[0]
        return Fraction(stream.average_rate or stream.guessed_rate or 25)


def _output_size(frame, height: int, width: int) -> tuple[int, int]:
    h, w = (height, width) if height > 0 and width > 0 else (frame.height, frame.width)
    return h - h % 2, w - w % 2  # yuv420p needs even sizes


def _output_rate(src: str, fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001) if fps > 0 else _source_rate(src)


def _encode_video(src: str, dst: str, fps: float, height: int, width: int, crf: int,
                  single_thread: bool, kernel: str = DEFAULT_KERNEL) -> int:
    import av

    tmp = dst + ".tmp.mp4"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    n = 0
    try:
        with av.open(tmp, "w") as out:
            stream = None
            # One scaler for the file: PyAV sets one up anew on every frame.reformat() otherwise.
            reformatter = av.video.reformatter.VideoReformatter()
            for frame in _resampled_frames(src, fps, single_thread):
                if stream is None:
                    h, w = _output_size(frame, height, width)
                    rate = _output_rate(src, fps)
                    stream = out.add_stream("libx264", rate=rate)
                    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                    time_base = stream.codec_context.time_base = 1 / rate
                    stream.options = {"crf": str(crf), "preset": "fast",
                                      **({"threads": "1"} if single_thread else {})}
                image = reformatter.reformat(frame, width=w, height=h, format="yuv420p",
                                             interpolation=RESIZE_KERNELS[kernel])
                # Output frame n is shown at n / rate. The time base must be set with the pts:
                # the reformatted frame keeps the source's (e.g. 1/12800) and the encoder rescales
                # pts from the frame's time base into its own, which turned n/12800 s into pts 0
                # for every frame (broken files that decord then read at the wrong positions).
                image.pts = n
                image.time_base = time_base
                for packet in stream.encode(image):
                    out.mux(packet)
                n += 1
            if stream is None:
                raise ValueError("no frame could be decoded")
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def _dump_frames(src: str, clip_dir: str, clip_id: str, fps: float, height: int, width: int,
                 quality: int, single_thread: bool, kernel: str = DEFAULT_KERNEL) -> int:
    import av
    from PIL import Image

    parent = os.path.dirname(clip_dir) or "."
    tmp = os.path.join(parent, f".{clip_id}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = 0
    try:
        reformatter = av.video.reformatter.VideoReformatter()  # one scaler for the file
        for frame in _resampled_frames(src, fps, single_thread):
            h, w = _output_size(frame, height, width)
            rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                       interpolation=RESIZE_KERNELS[kernel]).to_ndarray()  # (h, w, 3) uint8
            Image.fromarray(rgb).save(os.path.join(tmp, f"{clip_id}_{n:03d}.jpg"), quality=quality)
            n += 1
        if n == 0:
            raise ValueError("no frame could be decoded")
        shutil.rmtree(clip_dir, ignore_errors=True)  # an earlier, broken attempt
        os.replace(tmp, clip_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


# ---------------------------------------------------------------------------------------------
# Skipping finished outputs
# ---------------------------------------------------------------------------------------------
def _video_ok(path: str, fps: float = 0.0, height: int = 0, width: int = 0) -> Optional[int]:
    """Frame count of a finished output video, or None if it must be (re)done.

    None when the file is missing or does not decode, when its size or frame rate is not the
    requested one, or when its frames do not all carry distinct timestamps (what the version of
    this script before the timestamp fix wrote: every pts 0). Only packets are read for that, no
    frame but the first is decoded.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        import av

        with av.open(path) as c:
            stream = c.streams.video[0]
            n = int(stream.frames)
            if height > 0 and (stream.codec_context.height, stream.codec_context.width) != (height, width):
                return None
            if fps > 0 and abs(float(stream.average_rate or 0) - fps) > 1e-3 * fps:
                return None
            pts = [p.pts for p in c.demux(stream) if p.size > 0]
            if n <= 0 or len(pts) != n or None in pts or len(set(pts)) != n:
                return None
            c.seek(0)
            next(iter(c.decode(stream)))
            return n
    except Exception:  # noqa: BLE001 - anything unreadable gets redone
        return None


def _frames_ok(clip_dir: str, clip_id: str) -> Optional[int]:
    """Number of frames of a finished frame folder (renamed into place only when complete)."""
    first = os.path.join(clip_dir, f"{clip_id}_000.jpg")
    if not os.path.isfile(first):
        return None
    try:
        from PIL import Image

        with Image.open(first) as img:
            img.load()
    except Exception:  # noqa: BLE001
        return None
    return sum(1 for name in os.listdir(clip_dir) if name.startswith(clip_id + "_") and name.endswith(".jpg"))


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
def _job(args) -> tuple[str, str, str, int, str]:
    """Process one input; returns (input, clip_id, status ok|skipped|failed, frames, reason)."""
    src, clip_id, dst, opts = args
    try:
        if opts["frames"]:
            done = _frames_ok(dst, clip_id)
        else:
            done = _video_ok(dst, opts["fps"], opts["height"], opts["width"])
        if done:
            return src, clip_id, "skipped", done, ""
        if not os.path.isfile(src):
            raise ValueError("no such file")
        if os.path.getsize(src) == 0:
            raise ValueError("empty file")
        if opts["frames"]:
            n = _dump_frames(src, dst, clip_id, opts["fps"], opts["height"], opts["width"],
                             opts["quality"], opts["single_thread"], opts["kernel"])
        else:
            n = _encode_video(src, dst, opts["fps"], opts["height"], opts["width"], opts["crf"],
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
