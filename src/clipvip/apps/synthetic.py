"""The project's synthetic benchmark: moving coloured shapes, captions that name the direction.

Real retrieval datasets cannot be downloaded here, so tests and the demo train on clips this
module draws. Each clip shows one shape (colour x shape x size) crossing a plain dark
background in one direction (left/right/up/down) at one speed; its caption names all five.
Because a shape moving left and the same shape moving right from the other end show the same
frames in reverse order, the test set holds *time-reversed twins*: clip pairs whose frames are
exactly reversed (before H.264 compression), recorded with a ``"twin"`` field. A model that
ignores frame order (mean pooling) cannot tell twins apart; CLIP-ViP's temporal pathway should.

Layout written by :func:`generate` (formats of DESIGN §2):

    DIR/videos/<clip_id>.mp4                       train and test clips (H.264, yuv420p)
    DIR/train.jsonl                                {"clip_id", "text": [paraphrases], "twin"?, "attrs"}
    DIR/test.jsonl                                 {"clip_id", "text": "caption", "twin"?, "attrs"}
    DIR/frames/<clip_id>/<clip_id>_{i:03d}.jpg     test clips as frame folders (0-based)
    DIR/test_frames.jsonl                          test.jsonl records plus "num_frame"
    DIR/pretrain/videos/<video>/<video>.<k>.mp4    HD-VILA-style clips, clip id "<video>.<k>.mp4"
    DIR/pretrain/subtitles/                        LMDB: clip_id (utf-8) -> subtitle text (utf-8)
    DIR/pretrain/subtitles.jsonl                   {"clip_id"} per pretraining clip
    DIR/pretrain/captions/                         LMDB: clip_id -> caption of the middle frame
    DIR/pretrain/captions.json                     the same captions as [{"image_id", "caption"}]
    DIR/meta.json                                  the generation parameters

The same seed gives byte-identical annotation files and identical frames; the train, test and
pretraining sets draw from separate random streams, so changing ``n_train`` leaves the test set
unchanged.

    python -m clipvip synthetic --out data/synthetic --n-train 2000 --n-test 200
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
from fractions import Fraction
from typing import Optional, Sequence, Union

import av
import lmdb
import numpy as np
from PIL import Image

from clipvip.apps.cli import HelpFormatter, prog_name
from clipvip.files import atomic_path
from clipvip.logging_utils import get_logger

logger = get_logger("data.synthetic")  # not __name__: that is "__main__" under python -m

COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 195, 60),
    "blue": (45, 95, 240),
    "yellow": (235, 215, 35),
    "purple": (165, 60, 215),
    "cyan": (35, 205, 215),
}
SHAPES = ("square", "circle", "triangle", "cross")
# (dx, dy) of the motion; image rows grow downwards.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Shape extent (side of its bounding box) as a fraction of the shorter frame side.
SIZES = {"small": 0.2, "large": 0.34}
# Fraction of the free track (frame minus shape minus margins) travelled over the clip: even
# the slow small shape moves about 1/3 of the frame, so 8 sampled frames show the direction.
SPEEDS = {"slowly": 0.5, "quickly": 0.95}
BACKGROUND_LEVELS = (12, 60)  # dark grey, uniform per clip
# Backdrops: "plain" is the uniform grey; "gradient" adds a fixed tint that grows with x in the red
# channel and with y in the blue channel (up to BACKDROP_TINT), so that every patch of a frame shows
# where it is. A from-scratch vision tower then reads the shape's position (hence direction and
# speed) from pixels instead of first having to learn it into its position embeddings.
BACKDROPS = ("plain", "gradient")
BACKDROP_TINT = 70
MARGIN = 0.04                 # of the shorter side, kept free at the borders

DIR_PHRASE = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
DIR_SYNONYMS = {
    "left": ("to the left", "leftwards", "from right to left", "towards the left edge"),
    "right": ("to the right", "rightwards", "from left to right", "towards the right edge"),
    "up": ("up", "upwards", "from bottom to top", "towards the top"),
    "down": ("down", "downwards", "from top to bottom", "towards the bottom"),
}
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SPEED_SYNONYMS = {"slowly": ("slowly", "at a slow pace", "gently"),
                  "quickly": ("quickly", "fast", "rapidly", "at high speed")}
SPEED_ADJ = {"slowly": ("slow",), "quickly": ("fast", "quick")}
VERBS = (("moves", "moving"), ("slides", "sliding"), ("travels", "travelling"),
         ("glides", "gliding"))
TRAIN_TEMPLATES = (
    "a {size} {colour} {shape} {verb} {speed} {dir}",
    "the {size} {colour} {shape} {verb} {dir} {speed}",
    "a {speed_adj} {size} {colour} {shape} {verbing} {dir}",
    "there is a {size} {colour} {shape} {verbing} {speed} {dir}",
    "a {colour} {shape}, {size}, {verbing} {dir} {speed}",
    "{dir_cap} {speed}, a {size} {colour} {shape}",
    "a {size} {shape} in {colour} {verb} {speed} {dir}",
    "{speed_adj} motion {dir}: a {size} {colour} {shape}",
)
SUBTITLE_TEMPLATES = (
    "okay so here we have a {colour} {shape} and it goes {dir}",
    "look at this one, the {shape} is {colour} and it is moving {dir}",
    "now watch it go {dir}, see the {colour} {shape}",
    "alright this {shape} in {colour} heads {dir} pretty {speed_adj}",
)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything needed to draw one clip; a pure value, so workers draw it identically."""

    clip_id: str
    colour: str
    shape: str
    direction: str
    size: str
    speed: str
    background: int
    across: float     # position across the motion axis, 0..1 of the free range
    along: float      # where the track starts, 0..1 of the slack along the motion axis
    time_reversed: bool = False  # draw the OPPOSITE direction's clip and reverse its frames
    backdrop: str = "plain"  # one of BACKDROPS

    @property
    def attrs(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "direction": self.direction,
                "size": self.size, "speed": self.speed}


def caption(spec: ClipSpec) -> str:
    """The canonical caption (test sets): unique per colour/shape/direction/size/speed."""
    return f"a {spec.size} {spec.colour} {spec.shape} moves {spec.speed} {DIR_PHRASE[spec.direction]}"


def paraphrases(spec: ClipSpec, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct paraphrases of the caption for training (all name colour, shape, direction)."""
    out: list[str] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        verb, verbing = VERBS[rng.integers(len(VERBS))]
        dir_phrase = _choice(rng, DIR_SYNONYMS[spec.direction])
        text = _choice(rng, TRAIN_TEMPLATES).format(
            size=_choice(rng, SIZE_SYNONYMS[spec.size]), colour=spec.colour, shape=spec.shape,
            verb=verb, verbing=verbing, dir=dir_phrase, dir_cap=f"{verbing} {dir_phrase}",
            speed=_choice(rng, SPEED_SYNONYMS[spec.speed]),
            speed_adj=_choice(rng, SPEED_ADJ[spec.speed]))
        if text not in out:
            out.append(text)
    return out


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) to a shape of half-extent ``r`` centred at 0."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "triangle":
        # Apex up at (0, -r), base from (-r, r) to (r, r); distance to each edge's line.
        k = 1.0 / np.sqrt(5.0)
        right = (2 * dx - dy - r) * k
        left = (-2 * dx - dy - r) * k
        return np.maximum(np.maximum(right, left), dy - r)
    if shape == "cross":
        arm = r / 3.0
        horizontal = np.maximum(np.abs(dx) - r, np.abs(dy) - arm)
        vertical = np.maximum(np.abs(dx) - arm, np.abs(dy) - r)
        return np.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _track(spec: ClipSpec, direction: str, height: int, width: int, frames: int):
    """Centre (x, y) of the shape in every frame, ``[T]`` each, inside the frame throughout."""
    short = min(height, width)
    extent = SIZES[spec.size] * short
    margin = MARGIN * short
    dx, dy = DIRECTIONS[direction]
    # Free ranges of the centre along x and y.
    lo_x, hi_x = margin + extent / 2, width - margin - extent / 2
    lo_y, hi_y = margin + extent / 2, height - margin - extent / 2
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    if dx != 0:
        lo, hi, fixed = lo_x, hi_x, lo_y + spec.across * (hi_y - lo_y)
    else:
        lo, hi, fixed = lo_y, hi_y, lo_x + spec.across * (hi_x - lo_x)
    travel = SPEEDS[spec.speed] * (hi - lo)
    start = lo + spec.along * (hi - lo - travel)
    sign = dx + dy
    pos = start + travel * t if sign > 0 else start + travel - travel * t
    fixed_arr = np.full_like(pos, fixed)
    return (pos, fixed_arr) if dx != 0 else (fixed_arr, pos)


def _backdrop(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    """The static background, float32 ``[H, W, 3]`` (the same in every frame)."""
    base = np.full((height, width, 3), float(spec.background), dtype=np.float32)
    if spec.backdrop == "plain":
        return base
    if spec.backdrop != "gradient":
        raise ValueError(f"unknown backdrop {spec.backdrop!r}; valid: {BACKDROPS}")
    base[..., 0] += BACKDROP_TINT * (np.arange(width, dtype=np.float32) + 0.5)[None, :] / width   # red: x
    base[..., 2] += BACKDROP_TINT * (np.arange(height, dtype=np.float32) + 0.5)[:, None] / height  # blue: y
    return base


def render_clip(spec: ClipSpec, height: int, width: int, frames: int) -> np.ndarray:
    """The clip's frames as uint8 RGB ``[T, H, W, 3]`` (anti-aliased edges)."""
    if spec.time_reversed:
        # A twin is its opposite-direction clip played backwards, frame for frame.
        forward = dataclasses.replace(spec, direction=OPPOSITE[spec.direction],
                                      time_reversed=False)
        return render_clip(forward, height, width, frames)[::-1].copy()
    cx, cy = _track(spec, spec.direction, height, width, frames)  # [T] each
    ys = np.arange(height, dtype=np.float32) + 0.5                # pixel centres
    xs = np.arange(width, dtype=np.float32) + 0.5
    dx = xs[None, None, :] - cx[:, None, None].astype(np.float32)  # (T, 1, W)
    dy = ys[None, :, None] - cy[:, None, None].astype(np.float32)  # (T, H, 1)
    dx, dy = np.broadcast_arrays(dx, dy)                            # (T, H, W)
    r = SIZES[spec.size] * min(height, width) / 2
    # Coverage of each pixel by the shape from the signed distance: a one-pixel ramp.
    alpha = np.clip(0.5 - _shape_sdf(spec.shape, dx, dy, r), 0.0, 1.0)[..., None]  # (T, H, W, 1)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    img = _backdrop(spec, height, width) * (1.0 - alpha) + colour * alpha  # (T, H, W, 3)
    return np.rint(img).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: int = 6, crf: int = 17) -> None:
    """Encode uint8 RGB ``[T, H, W, 3]`` as H.264 (yuv420p) in an mp4 through PyAV.

    Written under a temporary name first: a crash never leaves a half-written clip under the
    final one (the temporary name keeps the extension, from which PyAV picks the container)."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
    with atomic_path(path) as tmp, av.open(tmp, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        # One x264 thread: deterministic output and no oversubscription under multiprocessing.
        stream.options = {"crf": str(crf), "preset": "fast", "threads": "1"}
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_frame_folder(folder: str, clip_id: str, frames: np.ndarray, quality: int = 95) -> None:
    """``{folder}/{clip_id}/{clip_id}_{i:03d}.jpg`` for i = 0..T-1 (what load_frame_folder reads)."""
    clip_dir = os.path.join(folder, clip_id)
    os.makedirs(clip_dir, exist_ok=True)
    for i, array in enumerate(frames):
        Image.fromarray(array).save(os.path.join(clip_dir, f"{clip_id}_{i:03d}.jpg"), quality=quality)


def _draw_job(job) -> None:
    spec, video_path, frame_folder, height, width, frames, fps = job
    array = render_clip(spec, height, width, frames)
    write_video(video_path, array, fps=fps)
    if frame_folder is not None:
        write_frame_folder(frame_folder, spec.clip_id, array)


# ---------------------------------------------------------------------------------------------
# Drawing the sets
# ---------------------------------------------------------------------------------------------
def _random_spec(rng: np.random.Generator, clip_id: str, combo=None) -> ClipSpec:
    if combo is None:
        combo = (_choice(rng, tuple(COLOURS)), _choice(rng, SHAPES), _choice(rng, tuple(DIRECTIONS)),
                 _choice(rng, tuple(SIZES)), _choice(rng, tuple(SPEEDS)))
    colour, shape, direction, size, speed = combo
    return ClipSpec(clip_id=clip_id, colour=colour, shape=shape, direction=direction, size=size,
                    speed=speed, background=int(rng.integers(*BACKGROUND_LEVELS)),
                    across=float(rng.random()), along=float(rng.random()))


def _twin_of(spec: ClipSpec, clip_id: str) -> ClipSpec:
    return dataclasses.replace(spec, clip_id=clip_id, direction=OPPOSITE[spec.direction],
                               time_reversed=True)


def _n_pairs(n: int, twin_fraction: float) -> int:
    return min(n // 2, int(round(n * twin_fraction / 2)))


def draw_train_specs(n: int, seed: int, twin_fraction: float) -> list[tuple[ClipSpec, Optional[str]]]:
    """``n`` training clips of random attributes; ``twin_fraction`` of them in twin pairs."""
    rng = np.random.default_rng([seed, 0])
    n_pairs = _n_pairs(n, twin_fraction)
    out: list[tuple[ClipSpec, Optional[str]]] = []
    for k in range(n):
        clip_id = f"train_{k:05d}"
        if k < 2 * n_pairs and k % 2 == 1:
            base = out[-1][0]
            out.append((_twin_of(base, clip_id), base.clip_id))
            out[-2] = (base, clip_id)
        else:
            out.append((_random_spec(rng, clip_id), None))
    return out


def draw_test_specs(n: int, seed: int, twin_fraction: float) -> list[tuple[ClipSpec, Optional[str]]]:
    """``n`` test clips with unique captions; ``twin_fraction`` of them in twin pairs.

    A twin pair takes both directions of one (colour, shape, size, speed, axis) group; single
    clips come from groups no pair uses, so no single clip has an unrecorded near-twin.
    """
    rng = np.random.default_rng([seed, 1])
    groups = [(c, s, z, v, axis) for c in COLOURS for s in SHAPES for z in SIZES for v in SPEEDS
              for axis in (("left", "right"), ("up", "down"))]
    n_combos = 2 * len(groups)
    if n > n_combos:
        raise ValueError(f"at most {n_combos} test clips have unique captions, asked for {n}")
    n_pairs = _n_pairs(n, twin_fraction)
    n_single = n - 2 * n_pairs
    order = [groups[i] for i in rng.permutation(len(groups))]
    pair_groups, rest = order[:n_pairs], order[n_pairs:]
    # Singles: one direction of an unused group; if groups run out, the other direction too.
    single_combos = [(c, s, axis[int(rng.integers(2))], z, v) for c, s, z, v, axis in rest]
    if n_single > len(single_combos):
        used = set(single_combos)
        single_combos += [(c, s, d, z, v) for c, s, z, v, axis in rest for d in axis
                          if (c, s, d, z, v) not in used]
    single_combos = single_combos[:n_single]

    records: list[tuple[ClipSpec, Optional[str]]] = []
    for c, s, z, v, axis in pair_groups:
        base = _random_spec(rng, "", (c, s, axis[int(rng.integers(2))], z, v))
        records.append((base, "pair"))
        records.append((_twin_of(base, ""), "pair"))
    for combo in single_combos:
        records.append((_random_spec(rng, "", combo), None))
    # Shuffle so twins are not neighbours, then name clips in their final order.
    perm = rng.permutation(len(records))
    names = {int(p): f"test_{k:05d}" for k, p in enumerate(perm)}
    named = [dataclasses.replace(spec, clip_id=names[i]) for i, (spec, _) in enumerate(records)]
    out: list[tuple[ClipSpec, Optional[str]]] = []
    for k in perm:
        k = int(k)
        twin = None
        if records[k][1] == "pair":
            twin = named[k + 1].clip_id if k % 2 == 0 else named[k - 1].clip_id
        out.append((named[k], twin))
    return out


_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def draw_pretrain_specs(n_videos: int, clips_per_video: int, seed: int) -> list[ClipSpec]:
    """HD-VILA-style clips ``<video>.<k>.mp4``: 11-character video ids, clips numbered from 1."""
    rng = np.random.default_rng([seed, 2])
    specs = []
    for _ in range(n_videos):
        # No leading "-": real ids may have one, but it reads as an option to command-line tools.
        first = _ID_ALPHABET[int(rng.integers(62))]
        video = first + "".join(_ID_ALPHABET[i] for i in rng.integers(len(_ID_ALPHABET), size=10))
        for k in range(1, clips_per_video + 1):
            specs.append(_random_spec(rng, f"{video}.{k}.mp4"))
    return specs


def _run_jobs(jobs: list, workers: int) -> None:
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _draw_job(job)
        return
    # fork: workers inherit the imported modules instead of re-importing torch (spawn).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for _ in pool.imap_unordered(_draw_job, jobs, chunksize=8):
            pass


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _write_lmdb(path: str, items: dict[str, str]) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)  # a stale database would keep keys of an earlier run
    env = lmdb.open(path, map_size=1 << 28, subdir=True)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            # Plain utf-8 text on both sides, as the original reads it (txn.get(id.encode()).decode()).
            txn.put(key.encode("utf-8"), value.encode("utf-8"))
    env.close()


def _parse_size(size: Union[int, str, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, str):
        parts = size.lower().split("x")
        size = int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def generate(out_dir: str, n_train: int = 200, n_test: int = 200, seed: int = 0,
             size: Union[int, str, Sequence[int]] = 64, frames: int = 16, *, fps: int = 6,
             twin_fraction: float = 0.7, n_paraphrases: int = 5, n_pretrain_videos: int = 4,
             clips_per_video: int = 3, frame_folders: bool = True,
             workers: Optional[int] = None, backdrop: str = "plain") -> dict[str, str]:
    """Write the synthetic benchmark under ``out_dir``; returns the paths (see module docstring).

    ``size``: an int (square frames), ``(H, W)`` or ``"HxW"``, even and >= 16.
    ``backdrop``: ``"plain"`` or ``"gradient"`` (see :data:`BACKDROPS`); the clips' attributes,
    captions and twins are the same either way.
    ``n_paraphrases``: training captions per clip, each a random paraphrase; 0 gives every training
    clip its one canonical caption (the test sets' wording) instead.
    ``workers``: processes drawing and encoding clips (default: all cores for large sets).
    """
    height, width = _parse_size(size)
    if min(height, width) < 16 or height % 2 or width % 2:
        raise ValueError(f"frame size must be even and >= 16, got {height}x{width}")
    if frames < 2:
        raise ValueError(f"need at least 2 frames to show motion, got {frames}")
    if n_paraphrases < 0:
        raise ValueError(f"n_paraphrases must be >= 0, got {n_paraphrases}")
    if not 0.0 <= twin_fraction <= 1.0:
        raise ValueError(f"twin_fraction must be in [0, 1], got {twin_fraction}")
    if backdrop not in BACKDROPS:
        raise ValueError(f"unknown backdrop {backdrop!r}; valid: {', '.join(BACKDROPS)}")

    root = os.path.abspath(out_dir)
    paths = {
        "root": root,
        "videos": os.path.join(root, "videos"),
        "train": os.path.join(root, "train.jsonl"),
        "test": os.path.join(root, "test.jsonl"),
        "frames": os.path.join(root, "frames"),
        "test_frames": os.path.join(root, "test_frames.jsonl"),
        "pretrain_videos": os.path.join(root, "pretrain", "videos"),
        "pretrain_subtitles": os.path.join(root, "pretrain", "subtitles"),
        "pretrain_subtitles_jsonl": os.path.join(root, "pretrain", "subtitles.jsonl"),
        "pretrain_captions": os.path.join(root, "pretrain", "captions"),
        "pretrain_captions_json": os.path.join(root, "pretrain", "captions.json"),
        "meta": os.path.join(root, "meta.json"),
    }
    os.makedirs(paths["videos"], exist_ok=True)

    train = draw_train_specs(n_train, seed, twin_fraction)
    test = draw_test_specs(n_test, seed, twin_fraction)
    pretrain = draw_pretrain_specs(n_pretrain_videos, clips_per_video, seed)
    if backdrop != "plain":  # after the draws: the random streams do not depend on it
        train = [(dataclasses.replace(spec, backdrop=backdrop), twin) for spec, twin in train]
        test = [(dataclasses.replace(spec, backdrop=backdrop), twin) for spec, twin in test]
        pretrain = [dataclasses.replace(spec, backdrop=backdrop) for spec in pretrain]
    text_rng = np.random.default_rng([seed, 3])
    subtitle_rng = np.random.default_rng([seed, 4])  # apart, so that n_paraphrases leaves subtitles as they are

    jobs = []
    video_of = lambda clip_id: os.path.join(paths["videos"], clip_id + ".mp4")  # noqa: E731
    train_records = []
    for spec, twin in train:
        texts = paraphrases(spec, text_rng, n_paraphrases) if n_paraphrases > 0 else [caption(spec)]
        rec = {"clip_id": spec.clip_id, "text": texts}
        if twin:
            rec["twin"] = twin
        rec["attrs"] = spec.attrs
        train_records.append(rec)
        jobs.append((spec, video_of(spec.clip_id), None, height, width, frames, fps))
    test_records = []
    for spec, twin in test:
        rec = {"clip_id": spec.clip_id, "text": caption(spec)}
        if twin:
            rec["twin"] = twin
        rec["attrs"] = spec.attrs
        test_records.append(rec)
        jobs.append((spec, video_of(spec.clip_id), paths["frames"] if frame_folders else None,
                     height, width, frames, fps))
    subtitles, captions = {}, {}
    for spec in pretrain:
        video = spec.clip_id.split(".")[0]
        jobs.append((spec, os.path.join(paths["pretrain_videos"], video, spec.clip_id), None,
                     height, width, frames, fps))
        subtitles[spec.clip_id] = _choice(subtitle_rng, SUBTITLE_TEMPLATES).format(
            colour=spec.colour, shape=spec.shape, dir=_choice(subtitle_rng, DIR_SYNONYMS[spec.direction]),
            speed_adj=_choice(subtitle_rng, SPEED_ADJ[spec.speed]))
        # A single frame shows no motion: the "middle frame caption" names appearance only.
        captions[spec.clip_id] = f"a {spec.size} {spec.colour} {spec.shape} on a dark background"

    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
    _run_jobs(jobs, workers)

    _write_jsonl(paths["train"], train_records)
    _write_jsonl(paths["test"], test_records)
    if frame_folders:
        _write_jsonl(paths["test_frames"], [{**r, "num_frame": frames} for r in test_records])
    if pretrain:
        os.makedirs(os.path.dirname(paths["pretrain_subtitles"]), exist_ok=True)
        _write_lmdb(paths["pretrain_subtitles"], subtitles)
        _write_lmdb(paths["pretrain_captions"], captions)
        _write_jsonl(paths["pretrain_subtitles_jsonl"], [{"clip_id": k} for k in subtitles])
        with open(paths["pretrain_captions_json"], "w", encoding="utf-8") as f:
            json.dump([{"image_id": k, "caption": v} for k, v in captions.items()], f)
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "height": height, "width": width,
            "frames": frames, "fps": fps, "twin_fraction": twin_fraction, "backdrop": backdrop,
            "n_paraphrases": n_paraphrases,
            "n_pretrain_clips": len(pretrain), "colours": list(COLOURS), "shapes": list(SHAPES),
            "directions": list(DIRECTIONS), "sizes": list(SIZES), "speeds": list(SPEEDS)}
    with open(paths["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    logger.info("synthetic benchmark: %d train, %d test, %d pretraining clips in %s",
                n_train, n_test, len(pretrain), root)
    return paths


def _help_epilog(prog: str) -> str:
    """What ``--help`` shows after the options: the layout table of the module docstring."""
    layout = [line for line in __doc__.splitlines() if line.startswith("    DIR/")]
    return "\n".join([
        "writes (DIR = --out):", *layout, "",
        "The same seed gives the same files. configs/demo/*.json read DIR as <blob_mount_dir>/data",
        "(python -m clipvip demo draws it into <out>/data; docs/first-run.md).", "",
        "example:", f"  {prog} --out data/synthetic --n-train 2000 --n-test 200"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = prog_name("synthetic")
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=_help_epilog(prog),
        description="Draw the synthetic benchmark: moving coloured shapes whose captions name colour,\n"
                    "size, shape, direction and speed; the test set holds time-reversed twins.")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--n-train", type=int, default=200, help="training clips")
    parser.add_argument("--n-test", type=int, default=200, help="test clips (at most the distinct captions)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    parser.add_argument("--size", default="64", help="frame size: 64 or HxW (even)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--fps", type=int, default=6, help="frame rate of the .mp4 files")
    parser.add_argument("--twin-fraction", type=float, default=0.7,
                        help="fraction of clips in time-reversed twin pairs")
    parser.add_argument("--n-paraphrases", type=int, default=5,
                        help="training captions per clip (0: the canonical caption only)")
    parser.add_argument("--n-pretrain-videos", type=int, default=4, help="HD-VILA-style source videos (pretrain/)")
    parser.add_argument("--clips-per-video", type=int, default=3, help="pretraining clips per source video")
    parser.add_argument("--no-frame-folders", action="store_true",
                        help="skip the JPEG frame folders of the test clips")
    parser.add_argument("--workers", type=int, default=None, help="drawing and encoding processes (default: up to 8 for 64 clips or more, else 1)")
    parser.add_argument("--backdrop", choices=BACKDROPS, default="plain",
                        help="plain grey, or a fixed colour gradient that shows position")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, args.n_train, args.n_test, args.seed, args.size, args.frames,
                         fps=args.fps, twin_fraction=args.twin_fraction, n_paraphrases=args.n_paraphrases,
                         n_pretrain_videos=args.n_pretrain_videos,
                         clips_per_video=args.clips_per_video,
                         frame_folders=not args.no_frame_folders, workers=args.workers,
                         backdrop=args.backdrop)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=1))
    return 0

