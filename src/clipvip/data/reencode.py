"""Re-encoding videos at a fixed frame rate and size (H.264 mp4), or as frame folders, through PyAV.

The library side of ``scripts/preprocess_videos.py`` (its docstring tells the why of each choice)
and of ``clipvip shard --reencode``:

* frame rate: for each output time ``k / fps`` the decoded source frame nearest in time is kept
  (frames dropped or repeated), as ffmpeg's ``fps`` filter does; ``fps`` 0 keeps every frame and
  re-times it at the source's average rate;
* size: every frame scaled to exactly ``height x width`` by libswscale with ``kernel`` (bicubic:
  ffmpeg's ``scale`` filter default), in YUV 4:2:0 for videos;
* timestamps: output frame n is shown at ``n / rate`` (constant frame rate), so decord and PyAV
  agree on which frame is frame n.

Outputs go to a file (written under a temporary name, renamed when complete) or to bytes in
memory (:func:`reencode_to_bytes`, :func:`images_to_mp4_bytes`: a shard member needs no
temporary file). ``threads=1`` for the encoder makes x264's output a function of its input and
settings only, not of the machine's core count (the shard packer relies on that).
"""
from __future__ import annotations

import io
import os
import shutil
from fractions import Fraction
from typing import IO, Iterable, Iterator, Optional, Union

import av
import numpy as np
from PIL import Image

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".wmv")

# ffmpeg's names for its scaler flags -> PyAV's names for the same swscale flags.
RESIZE_KERNELS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "area": "AREA",
                  "lanczos": "LANCZOS", "neighbor": "POINT"}
DEFAULT_KERNEL = "bicubic"
DEFAULT_CRF = 23

Target = Union[str, IO[bytes]]  # a file path or a seekable binary file object (the mp4 muxer seeks back)


# ---------------------------------------------------------------------------------------------
# Frames at the target rate and size
# ---------------------------------------------------------------------------------------------
def resampled_frames(path: str, fps: float, single_thread: bool) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``path`` at ``fps`` (0: every frame).

    For each output time ``k / fps`` the decoded frame nearest in time is kept (frames are
    repeated or dropped as needed), which is what ffmpeg's ``fps`` filter does.
    """
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if not single_thread:
            stream.thread_type = "AUTO"  # decoded frames are exact whatever the thread count
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


def source_rate(path: str) -> Fraction:
    with av.open(path) as c:
        stream = c.streams.video[0]
        return Fraction(stream.average_rate or stream.guessed_rate or 25)


def output_size(frame, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` asked for, or the frame's own where 0; even (yuv420p needs even sizes)."""
    h, w = (height, width) if height > 0 and width > 0 else (frame.height, frame.width)
    return h - h % 2, w - w % 2


def output_rate(src: str, fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001) if fps > 0 else source_rate(src)


def encode_frames(target: Target, frames: Iterable[av.VideoFrame], rate: Fraction, height: int, width: int,
                  crf: int = DEFAULT_CRF, threads: Optional[int] = None, kernel: str = DEFAULT_KERNEL) -> int:
    """Encode ``frames`` (any size and format) as H.264 yuv420p mp4 at constant ``rate`` into ``target``.

    Frames are scaled to ``height x width`` (0: the first frame's size, made even). ``threads``
    None lets x264 choose (its output then depends on the core count). Returns the frame count;
    a ``ValueError`` when there was no frame.
    """
    n = 0
    with av.open(target, "w", format="mp4") as out:
        stream = None
        # One scaler for the file: PyAV sets one up anew on every frame.reformat() otherwise.
        reformatter = av.video.reformatter.VideoReformatter()
        for frame in frames:
            if stream is None:
                h, w = output_size(frame, height, width)
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                time_base = stream.codec_context.time_base = 1 / rate
                stream.options = {"crf": str(crf), "preset": "fast",
                                  **({"threads": str(threads)} if threads else {})}
            image = reformatter.reformat(frame, width=w, height=h, format="yuv420p",
                                         interpolation=RESIZE_KERNELS[kernel])
            # Output frame n is shown at n / rate. The time base must be set with the pts: the
            # reformatted frame keeps the source's (e.g. 1/12800) and the encoder rescales pts
            # from the frame's time base into its own, which turned n/12800 s into pts 0 for
            # every frame (broken files that decord then read at the wrong positions).
            image.pts = n
            image.time_base = time_base
            for packet in stream.encode(image):
                out.mux(packet)
            n += 1
        if stream is None:
            raise ValueError("no frame could be decoded")
        for packet in stream.encode():
            out.mux(packet)
    return n


def encode_video(src: str, dst: str, fps: float, height: int, width: int, crf: int = DEFAULT_CRF,
                 single_thread: bool = False, kernel: str = DEFAULT_KERNEL) -> int:
    """Re-encode ``src`` into the file ``dst`` (temporary name, renamed when complete); frame count."""
    tmp = dst + ".tmp.mp4"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    try:
        n = encode_frames(tmp, resampled_frames(src, fps, single_thread), output_rate(src, fps), height, width,
                          crf, 1 if single_thread else None, kernel)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def reencode_to_bytes(src: str, fps: float, height: int, width: int, crf: int = DEFAULT_CRF,
                      kernel: str = DEFAULT_KERNEL) -> tuple[bytes, int]:
    """``src`` re-encoded in memory, single-threaded (the same bytes on every machine with the same
    libraries): ``(mp4 bytes, frame count)``. Every frame is decoded, so a clip that does not
    decode raises here."""
    buffer = io.BytesIO()
    n = encode_frames(buffer, resampled_frames(src, fps, single_thread=True), output_rate(src, fps),
                      height, width, crf, 1, kernel)
    return buffer.getvalue(), n


def images_to_mp4_bytes(images: Iterable[np.ndarray], rate: Fraction, height: int = 0, width: int = 0,
                        crf: int = DEFAULT_CRF, kernel: str = DEFAULT_KERNEL) -> tuple[bytes, int]:
    """RGB images (each ``[H, W, 3]`` uint8), one frame each, as an mp4 at ``rate`` in memory.

    For frame folders (ActivityNet): their frames carry no timestamps, so ``rate`` is nominal and
    every image becomes exactly one frame (frame i of the video is image i).
    """
    frames = (av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24") for image in images)
    buffer = io.BytesIO()
    n = encode_frames(buffer, frames, Fraction(rate).limit_denominator(1001), height, width, crf, 1, kernel)
    return buffer.getvalue(), n


def dump_frames(src: str, clip_dir: str, clip_id: str, fps: float, height: int, width: int,
                quality: int, single_thread: bool, kernel: str = DEFAULT_KERNEL) -> int:
    """``src`` as ``{clip_dir}/{clip_id}_{i:03d}.jpg`` (0-based), the folder renamed into place when complete."""
    parent = os.path.dirname(clip_dir) or "."
    tmp = os.path.join(parent, f".{clip_id}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = 0
    try:
        reformatter = av.video.reformatter.VideoReformatter()  # one scaler for the file
        for frame in resampled_frames(src, fps, single_thread):
            h, w = output_size(frame, height, width)
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
# Finished outputs
# ---------------------------------------------------------------------------------------------
def video_ok(path: str, fps: float = 0.0, height: int = 0, width: int = 0) -> Optional[int]:
    """Frame count of a finished output video, or None if it must be (re)done.

    None when the file is missing or does not decode, when its size or frame rate is not the
    requested one, or when its frames do not all carry distinct timestamps (what the preprocessing
    script wrote before its timestamp fix: every pts 0). Only packets are read for that, no frame
    but the first is decoded.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
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


def frames_ok(clip_dir: str, clip_id: str) -> Optional[int]:
    """Number of frames of a finished frame folder (renamed into place only when complete)."""
    first = os.path.join(clip_dir, f"{clip_id}_000.jpg")
    if not os.path.isfile(first):
        return None
    try:
        with Image.open(first) as img:
            img.load()
    except Exception:  # noqa: BLE001
        return None
    return sum(1 for name in os.listdir(clip_dir) if name.startswith(clip_id + "_") and name.endswith(".jpg"))
