"""Features of videos and sentences for search: the model loaded once, videos decoded by workers.

A video's frames are read exactly as evaluation reads them: :class:`clipvip.data.retrieval_dataset.ClipReader`
built with ``training=False`` (the config's ``test_n_clips * test_num_frms`` frames, uniform
when ``sample_rate`` is 0, the same decoder and transform), encoded under the config's precision
in batches of ``test_batch_size``. Sentences are tokenised as evaluation does (``max_txt_len``).
So a search index scores a caption against a video with the numbers the retrieval evaluation uses.

``clipvip encode`` writes its features into a folder, in chunks, so an interrupted run resumes:

    OUT/meta.json                  kind (video | text), dim, model and config fingerprints
    OUT/parts/part-NNNNNN.npy      float32 [n, dim] unit vectors of one chunk
    OUT/parts/part-NNNNNN.tsv      id <TAB> source (video path or sentence) per row; written
                                   after the .npy, so a chunk counts only once both are there
    OUT/features.npy, OUT/ids.txt  every chunk merged (rebuilt at the end of each run)
    OUT/failed.tsv                 path <TAB> reason of each unreadable video of the last run
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from clipvip import __version__
from clipvip.config import DATASET_KEYS, DEFAULTS, NESTED_DEFAULTS, Config, load_config
from clipvip.data.loader import LoaderSettings, build_eval_loader
from clipvip.data.retrieval_dataset import ClipReader, RetrievalCollator, Sentences, VideoFiles, VideoOnlyView
from clipvip.data.video import VideoDecodeError, probe_video
from clipvip.engine.encode import iter_encoded
from clipvip.errors import DataError
from clipvip.logging_utils import get_logger
from clipvip.model import build_model, fast_paths
from clipvip.tokenizer import build_tokenizer
from clipvip.precision import autocast, autocast_dtype, precision_from_config
from clipvip.apps.search.errors import IndexMismatchError
from clipvip.apps.search.storage import atomic_save_npy, writer_lock
from clipvip.files import atomic_write_text

LOGGER = get_logger("search.encode")

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".ogv", ".3gp", ".ts")
# Config keys that change what a feature means, beyond the weights themselves.
# logit_scale_init_value only sets the initial temperature: it never changes a feature.
FINGERPRINT_KEYS = ("test_n_clips", "test_num_frms", "sample_rate", "input_res", "resize_antialias",
                    "max_txt_len")
# Config keys holding local paths, made absolute before a config is stored with an index.
PATH_KEYS = ("clip_config", "clip_weights", "e2e_weights_path")


# ---------------------------------------------------------------------------------------------
# Which videos
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoItem:
    id: str
    path: str


def _check_unique(items: Sequence[VideoItem]) -> list[VideoItem]:
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise DataError(f"two videos have the id '{item.id}' (the file name without extension): "
                            f"{seen[item.id]} and {item.path}; rename one")
        seen[item.id] = item.path
    return list(items)


def _video_files(folder: str, recursive: bool) -> Iterator[str]:
    """Paths below ``folder`` (relative, "/"-separated) of the video files (by extension) directly in
    it, or at any depth with ``recursive``; hidden files and folders left out, sorted."""
    seen: set[str] = set()  # real paths of the folders walked: a symlink loop is walked once

    def walk(relative: str) -> Iterator[str]:
        here = os.path.join(folder, relative)
        if os.path.realpath(here) in seen:
            return
        seen.add(os.path.realpath(here))
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list the video folder {here}: {e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            below = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir():
                if recursive:
                    yield from walk(below)
            elif os.path.splitext(entry.name)[1].lower() in VIDEO_EXTENSIONS and entry.is_file():
                yield below

    return walk("")


def list_videos(folder: str, recursive: bool = False) -> list[VideoItem]:
    """The video files (by extension) directly in ``folder``, or at any depth with ``recursive``,
    sorted, with id = the path below ``folder`` without its extension: the file stem for the files
    directly in it (``cat_042``), ``trip/cat_042`` one folder down."""
    if not os.path.isdir(folder):
        raise DataError(f"video folder not found: {folder}")
    return _check_unique([VideoItem(os.path.splitext(relative)[0], os.path.abspath(os.path.join(folder, relative)))
                          for relative in _video_files(folder, recursive)])


def count_videos_in_subfolders(folder: str) -> int:
    """How many video files lie in the subfolders of ``folder``, which :func:`list_videos` leaves
    out unless ``recursive`` (said in the commands' summaries, so none is missed unknowingly)."""
    return sum(1 for relative in _video_files(folder, recursive=True) if "/" in relative)


def probe_videos(items: Sequence[VideoItem]) -> tuple[list[VideoItem], list[tuple[VideoItem, str]]]:
    """``(readable, [(item, reason), ...])``: ``items`` sorted by :func:`clipvip.data.video.probe_video`,
    which reads each file's header only (a missing or empty file, no video stream, a still image
    renamed .mp4), so a folder holding nothing to encode is known before a model is loaded."""
    readable, unreadable = [], []
    for item in items:
        try:
            probe_video(item.path)
        except VideoDecodeError as e:
            unreadable.append((item, e.reason or str(e)))
        else:
            readable.append(item)
    return readable, unreadable


def read_video_list(list_file: str) -> list[VideoItem]:
    """Video paths, one per line (blank lines and ``#`` comments skipped), with id = file stem."""
    lines = _read_lines(list_file, "video list")
    items = [VideoItem(os.path.splitext(os.path.basename(line))[0], os.path.abspath(line))
             for line in lines if not line.startswith("#")]
    return _check_unique(items)


def read_sentences(path: str) -> list[str]:
    """Non-blank lines of a text file, stripped."""
    return _read_lines(path, "sentence file")


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Config and fingerprints
# ---------------------------------------------------------------------------------------------
def resolve_config(config: str | Mapping | None, weights: str | None = None,
                   overrides: Sequence[str] = ()) -> Config:
    """The config of a search command: a file (or a stored dict), command-line overrides, ``--weights``.

    Local paths in it are made absolute, so the config still works when stored with an index and
    read back from another directory.
    """
    if isinstance(config, Mapping):
        cfg = _reload(config, overrides)
    else:
        cfg = load_config(config, list(overrides))
    if weights:
        cfg.e2e_weights_path = weights
    for key in PATH_KEYS:
        value = cfg[key]
        if value and os.path.exists(value):
            cfg[key] = os.path.abspath(value)
    cfg.blob_mount_dir = ""  # already joined to the paths above (as save_config writes a config)
    return cfg


def _reload(stored: Mapping, overrides: Sequence[str]) -> Config:
    """A config stored with an index, through ``load_config`` again (defaults, validation, overrides).

    Keys this version of clipvip does not know (an index built by another version) are dropped:
    what changes a feature is in the fingerprints, which are checked against the index anyway.
    The datasets are dropped too: search never reads them.
    """
    values = {}
    for key, value in json.loads(json.dumps(stored)).items():
        if key not in DEFAULTS or key in DATASET_KEYS:
            continue
        if key in NESTED_DEFAULTS and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in NESTED_DEFAULTS[key]}
        values[key] = value
    return load_config(values, list(overrides))


def config_fingerprint(cfg: Mapping) -> str:
    """sha256 of the config keys that decide what a feature means (frames, transform, text length)."""
    vision = dict(cfg.clip_vision_additional_config)
    vision.pop("logit_scale_init_value")
    keyed = {key: cfg[key] for key in FINGERPRINT_KEYS}
    keyed["clip_vision_additional_config"] = vision
    text = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the state dict (name, dtype, shape, bytes): the weights themselves.

    Content, not path: the same checkpoint moved elsewhere keeps its fingerprint.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class EncodedVideos:
    """One batch of :meth:`Encoder.iter_videos`."""

    items: list[VideoItem]
    durations: list[float | None]
    features: np.ndarray  # float32 [len(items), dim]
    failed: list[tuple[VideoItem, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """The model of ``cfg``, loaded once, in eval mode; features as float32 numpy unit vectors."""

    def __init__(self, cfg: Config, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device else default_device()
        # The same seed as the retrieval app: tensors the checkpoint does not hold (proxies
        # initialised from CLIP weights) come out identical on every build.
        torch.manual_seed(int(cfg.seed))
        self.model = build_model(cfg).eval().to(self.device)
        self.tokenizer = build_tokenizer(cfg)
        self.text_collator = RetrievalCollator(self.tokenizer, int(cfg.max_txt_len))  # tokenised as evaluation does
        self.reader = ClipReader.from_config(cfg, training=False)
        self.loader = LoaderSettings.from_config(cfg)
        self.precision = precision_from_config(cfg, self.device.type)
        self.batch_size = self.loader.test_batch_size
        self.dim = int(self.model.clipmodel.visual_projection.out_features)
        self.model_fingerprint = model_fingerprint(self.model)
        self.config_fingerprint = config_fingerprint(cfg)

    def describe(self) -> dict:
        """What identifies this model in an index or an encode folder."""
        return {"dim": self.dim, "model_fingerprint": self.model_fingerprint,
                "config_fingerprint": self.config_fingerprint}

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float32 [N, dim] for ``texts``, in batches, through the evaluation's encoder (no bar)."""
        loader = build_eval_loader(Sentences(texts), self.loader, batch_size=max(1, int(batch_size or self.batch_size)),
                                   collate_fn=self.text_collator, n_workers=0)
        out = [np.zeros((0, self.dim), np.float32)]
        out += [self._as_numpy(encoded.features)
                for encoded in iter_encoded(self._encode_texts, loader, self.device, "texts", progress=False)]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def cut_texts(self, texts: Sequence[str]) -> list[dict | None]:
        """For each text longer than the model reads (``max_txt_len`` tokens, start and end marks
        included) ``{"tokens": its length, "max_txt_len", "read": the words kept}``; None for the others.

        Tokenising truncates silently; a search command says what the model read instead.
        """
        limit = int(self.cfg.max_txt_len)
        kept = limit - 2  # <|startoftext|> and <|endoftext|> take two of the positions
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [{"tokens": len(t) + 2, "max_txt_len": limit, "read": self.tokenizer.decode(t[:kept]).strip()}
                if len(t) > kept else None for t in ids]

    def _encode_texts(self, batch: dict) -> torch.Tensor:
        """[B, dim] features of a batch's ``text_input_ids`` / ``text_input_mask`` (B, L), on the device."""
        with self._weights(), autocast(self.precision, self.device.type):
            return self.model.encode_text(batch["text_input_ids"], batch["text_input_mask"])

    def _weights(self):
        """bf16/fp16: the low-precision weight copies, cast at the first batch only (their masters
        do not change here; clipvip.model.low_precision)."""
        return fast_paths.weight_copies(self.model, autocast_dtype(self.precision))

    @torch.no_grad()
    def encode_video_tensor(self, video: torch.Tensor) -> np.ndarray:
        """float32 [B, dim] for ``video``: uint8 frames (B, T, H, W, 3) or model input (B, T, 3, h, w)."""
        return self._as_numpy(self._encode_videos(video.to(self.device)))

    def _encode_videos(self, video) -> torch.Tensor:
        """[B, dim] features of ``video``, already on the device: uint8 frames (B, T, H, W, 3), or a list of
        clips of mixed sizes, made model input there by the evaluation's transform; or model input."""
        video = self.reader.transform(video)  # (B, T, 3, h, w) float32, outside autocast
        with self._weights(), autocast(self.precision, self.device.type):
            return self.model.encode_video(video)

    @staticmethod
    def _as_numpy(features: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(features.float().cpu().numpy(), dtype=np.float32)

    def encode_video_file(self, path: str) -> np.ndarray:
        """float32 [dim] for one video file (raises :class:`clipvip.data.VideoDecodeError`)."""
        frames, _ = self.reader.read_frames(path, random.Random(0))  # (T, H, W, 3) uint8
        return self.encode_video_tensor(frames[None])[0]

    def iter_videos(self, items: Sequence[VideoItem], batch_size: int | None = None,
                    workers: int = 0) -> Iterator[EncodedVideos]:
        """Encode ``items`` in order, ``workers`` processes decoding; unreadable ones reported, not raised.

        The evaluation's encoder (:func:`clipvip.engine.encode.iter_encoded`) over the files read
        as evaluation reads test videos, batch after batch, so a caller can store each as it comes.
        """
        if not items:
            return
        view = VideoOnlyView(VideoFiles([v.id for v in items], [v.path for v in items], self.reader),
                             mark_unreadable=True)
        loader = build_eval_loader(view, self.loader, batch_size=max(1, int(batch_size or self.batch_size)),
                                   n_workers=max(0, int(workers)), persistent_workers=False)
        for encoded in iter_encoded(lambda batch: self._encode_videos(batch["video"]), loader, self.device, "videos"):
            failed = [(items[i], reason) for i, reason in encoded.failed]
            for item, reason in failed:
                LOGGER.warning("skipping unreadable video %s: %s", item.path, reason)
            if encoded.features is None:
                yield EncodedVideos([], [], np.zeros((0, self.dim), np.float32), failed)
                continue
            yield EncodedVideos([items[i] for i in encoded.batch["indices"].tolist()], encoded.batch["durations"],
                                self._as_numpy(encoded.features), failed)


# ---------------------------------------------------------------------------------------------
# `clipvip encode`: resumable, chunked feature folders
# ---------------------------------------------------------------------------------------------
_PART = re.compile(r"^part-(\d{6})\.tsv$")


def _clean(text: str) -> str:
    return " ".join(str(text).split())  # no tab or newline may reach a .tsv cell


class FeatureFolder:
    """The output folder of ``clipvip encode`` (module docstring): chunks written atomically."""

    def __init__(self, out: str, meta: Mapping):
        self.out = out
        self.parts = os.path.join(out, "parts")
        os.makedirs(self.parts, exist_ok=True)
        path = os.path.join(out, "meta.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: cannot read: {e}") from None
            for key in ("kind", "dim", "model_fingerprint", "config_fingerprint"):
                if old.get(key) != meta.get(key):
                    raise IndexMismatchError(
                        f"{out} already holds features with another {key} ({old.get(key)} != {meta.get(key)}): "
                        "resume with the same model, config and input kind, or choose another --out")
        else:
            atomic_write_text(path, json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
        self.meta = dict(meta)

    def committed_parts(self) -> list[tuple[str, str]]:
        """``(npy path, tsv path)`` of every complete chunk, in order."""
        out = []
        for name in sorted(os.listdir(self.parts)):
            m = _PART.match(name)
            npy = os.path.join(self.parts, f"part-{m.group(1)}.npy") if m else None
            if npy and os.path.isfile(npy):
                out.append((npy, os.path.join(self.parts, name)))
        return out

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for _, tsv in self.committed_parts():
            done.update(row[0] for row in _read_tsv(tsv))
        return done

    def write_part(self, ids: Sequence[str], sources: Sequence[str], features: np.ndarray) -> str:
        parts = self.committed_parts()
        number = int(os.path.basename(parts[-1][1])[5:11]) + 1 if parts else 0
        stem = os.path.join(self.parts, f"part-{number:06d}")
        atomic_save_npy(stem + ".npy", np.ascontiguousarray(features, dtype=np.float32))
        # The .tsv commits the chunk: it is renamed into place after the .npy is complete.
        atomic_write_text(stem + ".tsv", "".join(f"{_clean(i)}\t{_clean(s)}\n" for i, s in zip(ids, sources)))
        return stem

    def merge(self) -> int:
        """Rebuild ``features.npy`` and ``ids.txt`` from the chunks; returns the row count."""
        ids, feats = read_parts(self.out)
        atomic_save_npy(os.path.join(self.out, "features.npy"), feats)
        atomic_write_text(os.path.join(self.out, "ids.txt"), "".join(f"{i}\n" for i in ids))
        return len(ids)

    def write_failed(self, failed: Sequence[tuple[str, str]]) -> str:
        path = os.path.join(self.out, "failed.tsv")
        atomic_write_text(path, "".join(f"{_clean(p)}\t{_clean(r)}\n" for p, r in failed))
        return path


def _read_tsv(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def read_parts(out: str) -> tuple[list[str], np.ndarray]:
    """``(ids, float32 [N, dim])`` of every complete chunk of an encode folder, first occurrence of an id kept."""
    folder = FeatureFolder.__new__(FeatureFolder)
    folder.parts = os.path.join(out, "parts")
    ids: list[str] = []
    arrays = []
    seen: set[str] = set()
    for npy, tsv in folder.committed_parts():
        rows = _read_tsv(tsv)
        array = np.load(npy, allow_pickle=False)
        if array.shape[0] != len(rows):
            raise DataError(f"{npy} holds {array.shape[0]} rows but {tsv} lists {len(rows)} ids")
        keep = [k for k, row in enumerate(rows) if row[0] not in seen]
        for k in keep:
            seen.add(rows[k][0])
            ids.append(rows[k][0])
        arrays.append(array[keep])
    dim = arrays[0].shape[1] if arrays else 0
    return ids, (np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32))


def read_features(out: str) -> tuple[list[str], np.ndarray]:
    """``(ids, features)`` written by ``clipvip encode`` into ``out``."""
    feats = np.load(os.path.join(out, "features.npy"), allow_pickle=False)
    with open(os.path.join(out, "ids.txt"), encoding="utf-8") as f:
        ids = [line.rstrip("\n") for line in f]
    if len(ids) != feats.shape[0]:
        return read_parts(out)  # interrupted between the two renames of merge(): the chunks are the truth
    return ids, feats


@dataclass
class EncodeSummary:
    encoded: int
    already: int
    failed: list[tuple[str, str]]


def encode_to_folder(encoder: Encoder, out: str, *, videos: Sequence[VideoItem] | None = None,
                     sentences: Sequence[str] | None = None, batch_size: int | None = None, workers: int = 0,
                     chunk_size: int = 1024) -> EncodeSummary:
    """``clipvip encode``: features of ``videos`` (or ``sentences``) into ``out``, skipping ids already there."""
    kind = "video" if videos is not None else "text"
    with writer_lock(out):
        folder = FeatureFolder(out, {"kind": kind, **encoder.describe(), "clipvip_version": __version__})
        done = folder.done_ids()
        failed: list[tuple[str, str]] = []
        encoded = 0
        pending_ids: list[str] = []
        pending_src: list[str] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            nonlocal pending_ids, pending_src, pending
            if pending_ids:
                folder.write_part(pending_ids, pending_src, np.concatenate(pending))
                pending_ids, pending_src, pending = [], [], []

        if videos is not None:
            todo = [v for v in videos if v.id not in done]
            for batch in encoder.iter_videos(todo, batch_size, workers):
                failed.extend((item.path, reason) for item, reason in batch.failed)
                pending_ids += [v.id for v in batch.items]
                pending_src += [v.path for v in batch.items]
                pending.append(batch.features)
                encoded += len(batch.items)
                if len(pending_ids) >= chunk_size:
                    flush()
            already = len(videos) - len(todo)
        else:
            # A sentence's id is its 1-based line number among the file's non-blank lines.
            todo_txt = [(str(n), s) for n, s in enumerate(sentences or [], start=1) if str(n) not in done]
            step = max(1, int(chunk_size))
            for start in range(0, len(todo_txt), step):
                chunk = todo_txt[start:start + step]
                pending_ids += [i for i, _ in chunk]
                pending_src += [s for _, s in chunk]
                pending.append(encoder.encode_texts([s for _, s in chunk], batch_size))
                encoded += len(chunk)
                flush()
            already = len(sentences or []) - len(todo_txt)
        flush()
        folder.write_failed(failed)
        folder.merge()
    return EncodeSummary(encoded=encoded, already=already, failed=failed)

