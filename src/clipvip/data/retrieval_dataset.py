"""Text-video retrieval datasets (MSR-VTT, DiDeMo, LSMDC, ActivityNet) and their collator.

Training (``training=True``): one example per clip; each time a clip is drawn, ONE of its
captions is picked at random (a per-dataset RNG, reseeded per DataLoader worker, so the choice
changes from epoch to epoch and is reproducible for a given seed and worker count).

Evaluation (``training=False``) follows the multi-caption protocol: every caption is a query
whose target is its video; each video is encoded once and each caption once. The dataset keeps

* ``dataset.videos``: clip ids, in annotation order (records sharing a clip id are one video);
* ``dataset.texts``: ``(caption, video_index)`` pairs, in annotation order;

and serves them through two views, :class:`VideoOnlyView` (``dataset.video_view()``) and
:class:`TextOnlyView` (``dataset.text_view()``), so an evaluator can iterate videos and texts
independently. In evaluation mode the dataset itself indexes videos, like its video view.

Bad input (DESIGN §2): at training time a clip that cannot be read (missing, empty, truncated or
undecodable video, no usable caption) is replaced by a random other clip, at most ``MAX_TRIES``
times in a row before a :class:`DataError`; every item says how many clips were skipped to produce
it (``num_skipped``; the collator sums it per batch) and which (``bad_samples``: the training
process warns once per clip and run, and lists them at its end; :mod:`clipvip.data.bad_samples`). At
evaluation time nothing is replaced: an unreadable video is dropped with all its captions
(:meth:`VideoRetrievalDataset.drop_videos`), and ``skipped_clip_ids`` / ``skip_reasons`` say
which and why. :meth:`VideoRetrievalDataset.scan_readable` drops what a cheap check finds before
the run; a file that passes it and fails while being decoded (frame data cut behind an intact
header) comes out of ``video_view(mark_unreadable=True)`` as a marker item, not an exception,
and the evaluator drops it the same way. The same view over plain :class:`VideoFiles` is what
``clipvip encode`` and search indexing read (one encoder for all three: ``clipvip.engine.encode``).

Items carry the clip's frames as the decoder gave them, uint8 ``[T, H, W, 3]`` at the decoded
size; the collator stacks them (a list where sizes differ) and the model's side turns them into
model input with ``reader.transform`` (:class:`clipvip.data.transforms.VideoTransform`). The
float entry points (``ClipReader.read_video``, ``dataset.load_video``) apply it at once.

A dataset is built from its config entry (:class:`~clipvip.data.annotations.DatasetEntry`), a
:class:`ClipReader` and :class:`DatasetSettings`; ``from_config`` makes all three from a config.
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from clipvip.errors import DataError
from clipvip.logging_utils import get_logger
from clipvip.data.annotations import AnnotationRule, ClipRecord, DatasetEntry, load_annotations, select_rule
from clipvip.data.bad_samples import BadSample, carry, carry_from_items
from clipvip.data.sampling import middle_frame_index, sample_frame_indices
from clipvip.data.transforms import VideoTransform
from clipvip.data.video import (VideoBytes, count_folder_frames, count_frames, load_frame_folder,
                                load_sampled_frames, probe_duration, resolve_backend)

LOGGER = get_logger(__name__)

MAX_TRIES = 10  # clips tried per training example before giving up (the original's num_retries)

# What a clip that cannot be read raises: our own DataError (VideoDecodeError, a missing LMDB key,
# an empty caption), and the OS/decoder errors that escape the readers. Programming errors
# (TypeError, AttributeError, ...) are not caught, so bugs are not silently "substituted" away.
BAD_SAMPLE_ERRORS = (DataError, OSError, RuntimeError, ValueError, EOFError, KeyError)


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = (int(v) for v in value)
    return h, w


# ----------------------------------------------------------------------------------------------
# Frames of one clip
# ----------------------------------------------------------------------------------------------
@dataclass
class ClipReader:
    """Samples and decodes the frames of one clip (shared by every dataset here); ``transform``
    makes them model input where the model is."""

    n_clips: int
    num_frms: int
    sample_rate: int
    input_res: tuple[int, int]
    training: bool
    jitter: bool
    backend: str
    # False: the released checkpoints' resize kernel (torchvision 0.9, no antialiasing); data/transforms.py.
    antialias: bool = False
    # ``cache_clips``: every frame of a clip, decoded once (uint8 [F, h, w, 3], by path); frames are
    # then sampled and transformed from memory, giving exactly what decoding would give.
    cache: dict | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Mapping, training: bool) -> "ClipReader":
        prefix = "train" if training else "test"
        return cls(
            n_clips=int(cfg[f"{prefix}_n_clips"]),
            num_frms=int(cfg[f"{prefix}_num_frms"]),
            sample_rate=int(cfg.sample_rate),
            input_res=_resolution(cfg.input_res),
            training=training,
            # Jitter is a training-time augmentation only.
            jitter=training and bool(cfg.sample_jitter),
            backend=resolve_backend(cfg.video_backend),
            antialias=bool(cfg.resize_antialias),
            cache={} if cfg.cache_clips else None,
        )

    @property
    def num_frames(self) -> int:
        return self.n_clips * self.num_frms

    @property
    def transform(self) -> VideoTransform:
        """uint8 frames -> model input, as this reader's settings say (run where the model is)."""
        return VideoTransform(self.input_res, self.antialias)

    def indices(self, num_total: int, rng: random.Random) -> list[int]:
        return sample_frame_indices(num_total, self.n_clips, self.num_frms, self.sample_rate,
                                    training=self.training, jitter=self.jitter, rng=rng)

    def read_video(self, source: str | VideoBytes, rng: random.Random, with_middle: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(video [T, 3, h, w], middle frame [3, h, w] or None)``: :meth:`read_frames` made model
        input at once, on the CPU (``clipvip.load_clip``, the HF processor, one search query)."""
        frames, middle = self.read_frames(source, rng, with_middle)
        return self.transform(frames), (self.transform(middle) if middle is not None else None)

    def read_frames(self, source: str | VideoBytes, rng: random.Random, with_middle: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(frames uint8 [T, H, W, 3], middle frame uint8 [H, W, 3] or None)`` of a video file or
        of encoded bytes in memory (:class:`VideoBytes`, e.g. a shard member), at the decoded size.

        The middle frame is decoded in the same pass as the clip (one open of the file).
        """
        def index_fn(num_total: int) -> list[int]:
            picked = self.indices(num_total, rng)
            return picked + [middle_frame_index(num_total)] if with_middle else picked

        # The cache is keyed by path; bytes come from a stream that shows each sample once an
        # epoch (and a name is not proof of the same bytes), so they are always decoded.
        if self.cache is not None and not isinstance(source, VideoBytes):
            every = self.cache.get(source)
            if every is None:  # (F, h, w, 3) uint8; index_fn then sees the same frame count as when decoding
                every = self.cache[source] = load_sampled_frames(source, lambda n: list(range(n)),
                                                                 backend=self.backend)[0]
            frames = every[index_fn(every.shape[0])]
        else:
            frames, _ = load_sampled_frames(source, index_fn, backend=self.backend)  # (T[+1], H, W, 3) uint8
        if with_middle:
            return frames[:-1], frames[-1]
        return frames, None

    def read_folder_frames(self, root: str, clip_id: str, num_frame: int, rng: random.Random) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` of a frame folder ``{root}/{clip_id}`` with ``num_frame`` frames."""
        if self.cache is not None:
            key = os.path.join(root, clip_id)
            every = self.cache.get(key)
            if every is None:
                every = self.cache[key] = load_frame_folder(root, clip_id, range(num_frame))  # (F, h, w, 3)
            frames = every[self.indices(num_frame, rng)]
        else:
            frames = load_frame_folder(root, clip_id, self.indices(num_frame, rng))  # (T, H, W, 3) uint8
        return frames


# ----------------------------------------------------------------------------------------------
# What a dataset reads of the run config
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSettings:
    """What a dataset reads of the run config besides its own entry and its :class:`ClipReader`."""

    seed: int  # the RNG behind caption choice, frame jitter and replacement picks starts from it
    max_txt_len: int  # text tokens per caption: the collator pads and truncates to it
    dummy_data: bool  # random frames instead of decoded ones (retrieval sets; a pipeline check)

    @classmethod
    def from_config(cls, cfg: Mapping) -> "DatasetSettings":
        return cls(seed=int(cfg.seed), max_txt_len=int(cfg.max_txt_len), dummy_data=bool(cfg.dummy_data))


# ----------------------------------------------------------------------------------------------
# Replacement of unreadable training clips
# ----------------------------------------------------------------------------------------------
class SubstitutingDataset(Dataset):
    """Base of the training datasets: per-dataset RNG, per-worker reseeding, substitution.

    Subclasses implement ``_load(index) -> dict`` (raising a ``BAD_SAMPLE_ERRORS`` error for a
    clip that cannot be used) and ``clip_path(index) -> str`` (the path named in warnings).
    """

    training: bool
    max_tries: int = MAX_TRIES
    name: str = ""

    def _init_state(self, seed: int) -> None:
        self.num_skipped = 0  # substitutions made by THIS copy (a worker's copy counts its own)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the RNG behind caption choice, frame jitter and replacement picks."""
        self.rng = random.Random(seed)

    def init_worker(self, worker_id: int, seed: int) -> None:
        """Called in each DataLoader worker (see loader.py): own RNG stream, own handles."""
        self.reseed(seed)

    def _load(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def clip_path(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``dataset[index]``, or ``dataset[(index, seed)]`` from a sampler that seeds every item.

        With a seed (``clipvip.data.loader.ResumableSampler``), the caption choice, frame jitter
        and replacement picks of this item depend on that seed alone, not on the RNG stream of
        the worker that happens to load it, so a resumed run sees the same examples.
        """
        started = time.perf_counter()
        if isinstance(key, tuple):
            index, seed = key
            self.reseed(int(seed))
        else:
            index = key
        item = self._fetch(int(index))
        item["load_s"] = time.perf_counter() - started  # summed per batch: the loader's throughput
        return item

    def _fetch(self, index: int) -> dict:
        """The item at ``index``; in training, a random replacement when it cannot be read."""
        if not self.training:
            try:
                item = self._load(index)
            except DataError:
                raise
            except BAD_SAMPLE_ERRORS as e:
                raise DataError(f"{self.clip_path(index)}: {type(e).__name__}: {e}") from e
            item["num_skipped"] = 0
            return item
        bad: list[BadSample] = []
        last_error: BaseException | None = None
        for _ in range(self.max_tries):
            try:
                item = self._load(index)
            except BAD_SAMPLE_ERRORS as e:
                last_error = e
                self.num_skipped += 1
                # Warned about once per run by the training process (clipvip.data.bad_samples).
                bad.append(BadSample(self.name, self.clip_path(index), unreadable_reason(e)))
                LOGGER.debug("%s: skipping unreadable clip %s (%s); using a random other clip",
                             self.name, self.clip_path(index), e)
                index = self.rng.randrange(len(self))
                continue
            item["num_skipped"] = len(bad)
            return carry(item, bad)
        raise DataError(
            f"{self.name}: {self.max_tries} clips in a row could not be read (last: {last_error}); "
            f"check the dataset's 'vis' and 'txt' paths") from last_error


# ----------------------------------------------------------------------------------------------
# The retrieval dataset
# ----------------------------------------------------------------------------------------------
class VideoRetrievalDataset(SubstitutingDataset):
    """One retrieval set: its ``entry`` (of ``train_datasets`` / ``val_datasets``) read by ``reader``.

    Training (``reader.training``) item: ``{"video": uint8 [T, H, W, 3], "text": str, "clip_id", "index",
    "num_skipped"}``. Evaluation item (videos): ``{"video", "clip_id", "index": video index,
    "num_skipped": 0}``. ``rule`` forces an annotation rule by name (see
    :mod:`clipvip.data.annotations`). :meth:`from_config` builds one from a run config.
    """

    def __init__(self, entry: DatasetEntry, reader: ClipReader, settings: DatasetSettings, tokenizer=None,
                 rule: AnnotationRule | str | None = None):
        self.training = reader.training
        self.name = entry.name
        self.vis = entry.vis
        self.rule = rule if isinstance(rule, AnnotationRule) else select_rule(entry, rule)
        self.reader = reader
        self.dummy_data = settings.dummy_data
        self.collator = RetrievalCollator(tokenizer, settings.max_txt_len) if tokenizer is not None else None
        self._init_state(settings.seed)

        records = load_annotations(entry.txt, entry, self.rule)
        if not records:
            raise DataError(f"{entry.txt}: the annotation file lists no clips")
        self.skip_reasons: dict[str, str] = {}  # clip id -> why it is not evaluated, in the order left out
        if self.training:
            self.records: list[ClipRecord] = records
            self.videos = [r.clip_id for r in records]
            self.texts = [(t, i) for i, r in enumerate(records) for t in r.texts]
        else:
            self._build_eval_index(records)
        LOGGER.info("[%s] %s: %d videos, %d captions (rule '%s')", self.name,
                    "train" if self.training else "eval", len(self.videos), len(self.texts), self.rule.name)

    @classmethod
    def from_config(cls, cfg: Mapping, entry: Mapping, tokenizer=None, training: bool = False,
                    rule: AnnotationRule | str | None = None) -> "VideoRetrievalDataset":
        """The set of config ``entry`` (a dict of ``cfg.train_datasets`` etc.), read as ``cfg`` says."""
        return cls(DatasetEntry.from_config(entry), ClipReader.from_config(cfg, bool(training)),
                   DatasetSettings.from_config(cfg), tokenizer, rule)

    @property
    def skipped_clip_ids(self) -> list[str]:
        """Clip ids left out of evaluation (unreadable), in the order they were left out."""
        return list(self.skip_reasons)

    # -- evaluation index ------------------------------------------------------------------
    def _build_eval_index(self, records: Sequence[ClipRecord]) -> None:
        """Merge records per clip id. A clip without a usable caption stays a video: a candidate
        of every text query (the gallery does not depend on which captions exist), no query itself."""
        by_id: dict[str, ClipRecord] = {}
        captions: dict[str, list[str]] = {}
        for r in records:
            if r.clip_id not in by_id:
                by_id[r.clip_id] = r
                captions[r.clip_id] = []
            captions[r.clip_id].extend(r.texts)
        self.records = list(by_id.values())
        self.videos = list(by_id)
        self.texts = [(t, i) for i, cid in enumerate(self.videos) for t in captions[cid]]
        if not self.texts:
            where = records[0].where.rsplit(":", 1)[0] or self.name
            raise DataError(f"{where}: no clip has a non-empty caption; evaluation has nothing to query")
        empty = [cid for cid in self.videos if not captions[cid]]
        if empty:
            LOGGER.warning("[%s] %d clips have no non-empty caption: they are text-to-video candidates, "
                           "not video-to-text queries: %s", self.name, len(empty), _preview(empty))

    def scan_readable(self, decode: bool = False) -> list[str]:
        """Check every video up front; drop the unreadable ones with their captions.

        Evaluation never substitutes clips, so a test video that cannot be read is removed with
        all its captions before the run. Returns the skipped clip ids (also logged, and added to
        ``self.skipped_clip_ids``). By default the check is cheap (the container opens and
        reports frames; the frame folder holds frames), which misses a file whose header is
        intact but whose frame data is cut: ``decode=True`` also decodes the frames evaluation
        will read (about the cost of one evaluation pass over the videos). Without it such a
        file is dropped when the evaluator fails to decode it (``video_view(mark_unreadable=True)``).
        No readable video at all is a :class:`DataError` (see :meth:`drop_videos`).
        """
        bad: dict[int, str] = {}
        for i, record in enumerate(self.records):
            try:
                if record.is_frame_folder:
                    present = count_folder_frames(self.vis, record.clip_id)
                    if present < record.num_frame:
                        LOGGER.debug("%s: %d frames, annotation says %d", record.path, present, record.num_frame)
                else:
                    count_frames(record.path, backend=self.reader.backend)
                if decode:
                    self.load_frames(i)
            except BAD_SAMPLE_ERRORS as e:
                bad[i] = unreadable_reason(e)
        return self.drop_videos(bad)

    def drop_videos(self, reasons: Mapping[int, str], log: bool = True) -> list[str]:
        """Remove the videos at these indices, with all their captions; returns their clip ids.

        ``reasons``: video index (into the current ``self.videos``) -> why it cannot be used. The
        remaining videos keep their order and the captions' video indices are renumbered, so
        ``text_to_video()`` stays consistent with features encoded in ``self.videos`` order.
        ``log``: one warning line per video (path and reason) and a summary; an evaluator on
        several processes logs on one. Dropping every video with a caption is a :class:`DataError`:
        nothing would be left to query.
        """
        if not reasons:
            return []
        n_videos = len(self.records)
        if all(v in reasons for _, v in self.texts):  # no query would be left (nor, often, any video)
            first = min(reasons)
            captioned = len({v for _, v in self.texts})
            which = f"{captioned} test videos" + ("" if captioned == n_videos else " with a caption")
            raise DataError(f"[{self.name}] none of the {which} can be read (first: "
                            f"{_naming(self.records[first].path, reasons[first])}); check the dataset's 'vis' path")
        keep = [i for i in range(n_videos) if i not in reasons]
        new_index = {old: new for new, old in enumerate(keep)}
        bad = [self.records[i].clip_id for i in sorted(reasons)]
        if log:
            n_captions = Counter(v for _, v in self.texts)
            for i in sorted(reasons):
                n = n_captions[i]
                LOGGER.warning("[%s] unreadable video left out of evaluation with its %d caption%s: %s", self.name,
                               n, "" if n == 1 else "s", _naming(self.records[i].path, reasons[i]))
        for i in sorted(reasons):
            self.skip_reasons[self.records[i].clip_id] = reasons[i]
        self.records = [self.records[i] for i in keep]
        self.videos = [r.clip_id for r in self.records]
        self.texts = [(t, new_index[v]) for t, v in self.texts if v in new_index]
        if log:
            LOGGER.warning("[%s] %d of %d videos cannot be read and are left out of evaluation "
                           "with their captions: %s", self.name, len(bad), n_videos, _preview(bad))
        return bad

    # -- items -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def clip_id(self, index: int) -> str:
        return self.records[index].clip_id

    def clip_path(self, index: int) -> str:
        return self.records[index].path

    def read_clip(self, index: int) -> dict:
        """``{"video": uint8 [T, H, W, 3]}`` of video ``index`` (the item :class:`VideoOnlyView` completes)."""
        return {"video": self.load_frames(index)}

    def load_video(self, index: int) -> torch.Tensor:
        """Model input ``[T, 3, h, w]`` of video ``index``: :meth:`load_frames`, transformed at once."""
        return self.reader.transform(self.load_frames(index))

    def load_frames(self, index: int) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` frames of video ``index`` (raises on a clip that cannot be read)."""
        record = self.records[index]
        if self.dummy_data:  # random frames at the input size: the rest of the pipeline as for real ones
            h, w = self.reader.input_res
            return torch.randint(0, 256, (self.reader.num_frames, h, w, 3), dtype=torch.uint8)
        if record.is_frame_folder:
            return self.reader.read_folder_frames(self.vis, record.clip_id, record.num_frame, self.rng)
        return self.reader.read_frames(record.path, self.rng)[0]

    def _load(self, index: int) -> dict:
        record = self.records[index]
        item = {"clip_id": record.clip_id, "index": index}
        if self.training:
            if not record.texts:
                raise DataError(f"{record.where}: no non-empty caption for {record.clip_id}")
            # One caption per example, drawn afresh each time the clip is drawn.
            item["text"] = record.texts[self.rng.randrange(len(record.texts))]
        item["video"] = self.load_frames(index)
        return item

    def partners(self, key: str) -> list[int]:
        """For each clip the index of the clip its record names in field ``key`` (e.g. ``"twin"``), or -1."""
        index = {r.clip_id: i for i, r in enumerate(self.records)}
        return [index.get(r.extra.get(key), -1) if isinstance(r.extra.get(key), str) else -1
                for r in self.records]

    # -- views for the evaluator -------------------------------------------------------------
    def video_view(self, mark_unreadable: bool = False) -> "VideoOnlyView":
        """The videos, one item each (``mark_unreadable``: a marker item instead of a raise; see the view)."""
        return VideoOnlyView(self, mark_unreadable)

    def text_view(self) -> "TextOnlyView":
        return TextOnlyView(self)

    def text_to_video(self) -> list[int]:
        """The target video index of every text query, in text order."""
        return [v for _, v in self.texts]


class VideoOnlyView(Dataset):
    """Every clip of a source once, in its order (no text, no substitution): what encoders read.

    The source is a :class:`VideoRetrievalDataset` (evaluation) or :class:`VideoFiles` (``clipvip
    encode``, search indexing); it has ``len()``, ``clip_id(index)``, ``clip_path(index)``,
    ``read_clip(index) -> {"video": uint8 [T, H, W, 3], ...}`` and a ``collator`` (or None).

    A clip that cannot be read raises a :class:`DataError` naming its path; with
    ``mark_unreadable=True`` (what the encoders use) its item is a marker instead,
    ``{"clip_id", "index", "num_skipped": 0, "failed": reason}`` without ``"video"``. An exception
    in a DataLoader worker ends the whole loader, and so the whole evaluation, for one clip;
    a marker travels back like any item. The view's ``collator`` then leaves markers out of the
    stack and lists them in the batch's ``failed`` entry, ``[(index, reason), ...]``
    (:class:`MarkedVideoCollator`).
    """

    def __init__(self, source, mark_unreadable: bool = False):
        self.dataset = source
        self.mark_unreadable = bool(mark_unreadable)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def collator(self):
        """The source's collator (or a tokenizer-free one: videos need none); marker-aware if marking."""
        inner = self.dataset.collator if self.dataset.collator is not None else RetrievalCollator(None)
        return MarkedVideoCollator(inner) if self.mark_unreadable else inner

    def __getitem__(self, index: int) -> dict:
        source = self.dataset
        item = {"clip_id": source.clip_id(index), "index": index, "num_skipped": 0}
        try:
            item.update(source.read_clip(index))
        except BAD_SAMPLE_ERRORS as e:
            if not self.mark_unreadable:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{source.clip_path(index)}: {type(e).__name__}: {e}") from e
            item["failed"] = unreadable_reason(e)
        return item

    def init_worker(self, worker_id: int, seed: int) -> None:
        if hasattr(self.dataset, "init_worker"):
            self.dataset.init_worker(worker_id, seed)


class VideoFiles(Dataset):
    """Video files by path, each read as evaluation reads a test video: a :class:`VideoOnlyView` source.

    ``read_clip`` also gives the container's duration in seconds (metadata, no decoding; None if
    unknown), which a search index keeps beside each video.
    """

    collator = None  # the view's tokenizer-free default

    def __init__(self, ids: Sequence[str], paths: Sequence[str], reader: ClipReader):
        if len(ids) != len(paths):
            raise ValueError(f"{len(ids)} ids for {len(paths)} video paths")
        self.ids, self.paths = list(ids), list(paths)
        self.reader = reader
        self.rng = random.Random(0)  # evaluation sampling never draws from it

    def __len__(self) -> int:
        return len(self.paths)

    def clip_id(self, index: int) -> str:
        return self.ids[index]

    def clip_path(self, index: int) -> str:
        return self.paths[index]

    def read_clip(self, index: int) -> dict:
        path = self.paths[index]
        frames, _ = self.reader.read_frames(path, self.rng)  # (T, H, W, 3) uint8
        return {"video": frames, "duration": probe_duration(path)}


class MarkedVideoCollator:
    """Items of a marking :class:`VideoOnlyView` -> a batch of the readable ones plus ``failed``.

    The readable items go through ``inner`` (``video`` [b, T, H, W, 3], ``indices`` [b], ...,
    b <= B); ``failed`` is ``[(index, reason), ...]`` of the others. A batch of markers only has
    no ``video`` and empty ``indices`` [0].
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, items: list[dict]) -> dict:
        ok = [it for it in items if "failed" not in it]
        if ok:
            batch = self.inner(ok)
        else:
            batch = {"clip_ids": [], "indices": torch.zeros(0, dtype=torch.long), "num_skipped": 0}
        batch["failed"] = [(it["index"], it["failed"]) for it in items if "failed" in it]
        return batch


class TextOnlyView(Dataset):
    """Every caption of a retrieval set once, in ``dataset.texts`` order."""

    def __init__(self, dataset: VideoRetrievalDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.texts)

    def __getitem__(self, index: int) -> dict:
        text, video_index = self.dataset.texts[index]
        return {"text": text, "index": index, "video_index": video_index, "num_skipped": 0}


class Sentences(Dataset):
    """Plain sentences, one item each, in order: what ``clipvip encode --texts`` and search queries encode.

    Items ``{"text", "index", "num_skipped": 0}``; the collator (it needs the tokenizer) is the
    caller's :class:`RetrievalCollator`.
    """

    collator = None

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index], "index": index, "num_skipped": 0}


def scan_readable(dataset, decode: bool = False) -> list[str]:
    """Drop the unreadable videos of an evaluation dataset (see ``VideoRetrievalDataset.scan_readable``)."""
    if isinstance(dataset, (VideoOnlyView, TextOnlyView)):
        dataset = dataset.dataset
    return dataset.scan_readable(decode=decode)


def unreadable_reason(error: BaseException) -> str:
    """One line saying why a clip cannot be read (our errors already name the file and the cause)."""
    text = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())  # decoder messages may span lines; logs and results keep one


def _naming(path: str, reason: str) -> str:
    """``reason``, led by ``path`` unless it names the file already (our decode errors do)."""
    return reason if path in reason else f"{path}: {reason}"


def _preview(ids: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------
def collate_frames(frames: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Per-clip frames -> one tensor ``[B, ...]`` where all have one size, else the list itself.

    A batch of loose files can mix resolutions (preprocessed sets are all one size): such a
    batch stays a list of uint8 tensors, which :class:`~clipvip.data.transforms.VideoTransform`
    transforms size by size into one model input.
    """
    first = frames[0].shape
    if all(f.shape == first for f in frames):
        return torch.stack(list(frames))  # (B, ...)
    return list(frames)


def tokenize(tokenizer, texts: list[str], max_txt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])``, padded to ``L = max_txt_len``, truncated."""
    enc = tokenizer(list(texts), max_length=max_txt_len, padding="max_length", truncation=True,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class RetrievalCollator:
    """Items of a retrieval dataset or its views -> one batch dict.

    Keys, each present when the items carry it:
    ``video`` uint8 [B, T, H, W, 3] (a list of [T, H, W, 3] where clips differ in size: :func:`collate_frames`);
    ``text_input_ids``, ``text_input_mask`` [B, L] long;
    ``clip_ids`` list[str]; ``indices`` [B] long (dataset index of each item: clip, video or text);
    ``video_indices`` [B] long (text view: the target video); ``durations`` list[float | None]
    (:class:`VideoFiles`); ``num_skipped`` int (clips replaced
    to build this batch; the training loop sums it over steps, and so over workers); ``load_s``
    float (seconds spent loading the items, their ``load_s``, and collating them); ``bad_samples``
    (which, when any: :mod:`clipvip.data.bad_samples`).
    """

    def __init__(self, tokenizer, max_txt_len: int = 50):
        self.tokenizer = tokenizer
        self.max_txt_len = int(max_txt_len)

    def __call__(self, items: list[dict]) -> dict:
        started = time.perf_counter()
        batch: dict[str, Any] = {}
        first = items[0]
        if "video" in first:
            batch["video"] = collate_frames([it["video"] for it in items])  # (B, T, H, W, 3) uint8
        if "text" in first:
            if self.tokenizer is None:
                raise ValueError("RetrievalCollator needs a tokenizer for items with text")
            batch["text_input_ids"], batch["text_input_mask"] = tokenize(
                self.tokenizer, [it["text"] for it in items], self.max_txt_len)  # (B, L) each
        if "clip_id" in first:
            batch["clip_ids"] = [it["clip_id"] for it in items]
        batch["indices"] = torch.tensor([it["index"] for it in items], dtype=torch.long)  # (B,)
        if "video_index" in first:
            batch["video_indices"] = torch.tensor([it["video_index"] for it in items], dtype=torch.long)
        if "duration" in first:  # VideoFiles: seconds, or None where the container does not say
            batch["durations"] = [it["duration"] for it in items]
        batch["num_skipped"] = int(sum(it.get("num_skipped", 0) for it in items))
        batch["load_s"] = loading_seconds(items, started)
        return carry_from_items(batch, items)


def loading_seconds(items: list[dict], collate_started: float) -> float:
    """The seconds the items took to load (their ``load_s``) plus their collation so far."""
    return sum(float(it.get("load_s", 0.0)) for it in items) + time.perf_counter() - collate_started
