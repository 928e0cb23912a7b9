"""Training from WebDataset tar shards (``vis_format: "webdataset"``), streamed and exactly resumable.

A shard is a tar file in video2dataset's member naming: per sample ``KEY.mp4`` (any video
extension), ``KEY.txt`` (the caption or subtitle) and ``KEY.json`` (metadata). The tar is read as a
stream by webdataset's tar expander and key grouping (one pass, front to back, from a local file,
``http(s)://``, ``s3://``, ``gs://`` or an opted-in ``pipe:`` command); videos are decoded from the
member's bytes in memory.

How an epoch is read (every process derives all of it from ``(seed, epoch)`` and the shard index,
so nothing is exchanged between processes):

1. **Readers.** A reader is one DataLoader worker of one rank (or the rank itself with
   ``n_workers 0``): ``R = world_size * n_workers`` of them, numbered ``rank * n_workers + worker``
   (ranks are global, so nodes are covered). No two readers read one shard.
2. **Shards to readers.** The shards are shuffled by ``(seed, epoch)`` and dealt, in that order,
   each to the reader holding the fewest samples so far; so readers' totals differ by at most
   one shard.
3. **Sample order.** Each reader streams its shards in order and emits samples in the order of a
   shuffle buffer of ``shuffle_buffer`` samples (webdataset's algorithm: keep a buffer, emit a
   random one of it per sample read), seeded by ``(seed, epoch, reader)``. The buffer is
   simulated on sample *positions* first (the "plan"; counts suffice), and the reader keeps the
   raw bytes of at most ``shuffle_buffer`` samples in memory while it emits in plan order: the
   same order and the same memory as a real buffer, but the plan tells, for any point of the
   epoch, which samples are still to come.
4. **Equal steps.** Every reader emits exactly ``Q = total // (R * batch)`` full batches per
   epoch, so every rank takes ``n_workers * Q`` steps and none waits at an epoch end. A reader
   with more samples than ``Q * batch`` leaves its surplus for other epochs (the deal changes
   every epoch); one with fewer (or with unreadable samples) starts its plan again for the rest.
5. **Exact resume.** Each batch carries its reader's cursor (plan positions used so far). The
   stream keeps the cursor of the last batch it handed out per reader; the training state saves
   them. On resume a reader starts reading at the first shard holding a sample it has not
   emitted yet, passes over (without decoding) what it had emitted, and continues the plan where
   the cursor says: the batches an uninterrupted run would have seen, in the same order.
   Workers are started afresh per epoch (and on resume), each told its reader and cursor.

Bad data: a member that cannot be used (no video member, undecodable video, no text) is skipped,
counted in the batch's ``num_skipped`` and named in its ``bad_samples``; the missing samples of a
shard that cannot be opened, or ends early (truncated), are skipped the same way, named by the
shard. The training process warns once per run about each and lists them at its end
(:mod:`clipvip.data.bad_samples`). A shard list that matches nothing is a one-line error when the
stream is built, before training starts.

Epoch length: from the shard index (``shards.json`` beside the shards, written by
``clipvip shard``, or ``shard_index`` in the dataset entry); without one each shard is counted once
(read through) and the counts are cached in ``$CLIPVIP_CACHE_DIR`` (default
``~/.cache/clipvip/shard-index``).
"""
from __future__ import annotations

import bisect
import dataclasses
import glob
import hashlib
import heapq
import io
import json
import os
import random
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipvip.errors import ConfigError, DataError
from clipvip.logging_utils import get_logger
from clipvip.data.annotations import DatasetEntry
from clipvip.data.loader import LoaderSettings, derived_seed, loader_kwargs
from clipvip.data.pretrain_dataset import VID_TXT_MODES, PretrainCollator
from clipvip.data.bad_samples import BadSample, carry
from clipvip.data.retrieval_dataset import (BAD_SAMPLE_ERRORS, ClipReader, DatasetSettings, RetrievalCollator,
                                            unreadable_reason)
from clipvip.data.shard_index import INDEX_NAME, ShardInfo, is_remote, read_index, write_index
from clipvip.data.video import VideoBytes

LOGGER = get_logger(__name__)

VIDEO_EXTENSIONS = ("mp4", "avi", "mkv", "webm", "mov", "m4v")  # a member "KEY.<ext>" holds the video
PIPE_ENV = "CLIPVIP_ALLOW_PIPE"  # pipe: URLs run a shell command: allowed only when this is set to 1
CACHE_ENV = "CLIPVIP_CACHE_DIR"
_SHARD_ORDER_SALT = 31  # derived_seed(seed, epoch, salt): the shard deal of an epoch
_PLAN_SALT = 37  # derived_seed(seed, epoch, salt, reader): a reader's buffer order
_ITEM_SALT = 41  # derived_seed(seed, epoch, salt, reader, cursor): caption choice and jitter of one sample


def is_sharded(entry: Mapping | DatasetEntry) -> bool:
    """Whether a dataset entry is read from WebDataset shards."""
    return (entry.vis_format if isinstance(entry, DatasetEntry) else entry["vis_format"]) == "webdataset"


# ----------------------------------------------------------------------------------------------
# Shard lists, opening, samples
# ----------------------------------------------------------------------------------------------
def expand_shards(spec: str | Sequence[str], name: str = "shards") -> list[str]:
    """The shard URLs of a ``shards`` value: a brace pattern (``DIR/{00000..00099}.tar``), a glob, a
    ``.txt`` file with one URL per line, or a list of any of these. Local files must exist."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items or not all(isinstance(s, str) and s.strip() for s in items):
        raise ConfigError(f"{name}: 'shards' must be a pattern, a .txt list of URLs, or a list of them")
    urls: list[str] = []
    for item in items:
        item = item.strip()
        if not is_remote(item) and item.endswith(".txt"):
            if not os.path.isfile(item):
                raise ConfigError(f"{name}: shard list {item} not found")
            with open(item, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
            folder = os.path.dirname(os.path.abspath(item))
            urls.extend(u if is_remote(u) or os.path.isabs(u) else os.path.join(folder, u) for u in lines)
            continue
        for url in expand_urls(item):
            if not is_remote(url) and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    for url in urls:
        check_url_allowed(url, name)
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.isfile(_local_path(u))]
    if not urls or (local and len(missing) == len(urls)):
        raise ConfigError(f"{name}: shards {spec!r} match no file")
    if missing:
        raise ConfigError(f"{name}: {len(missing)} of {len(urls)} shards not found (first: {missing[0]})")
    return urls


def check_url_allowed(url: str, name: str = "shards") -> None:
    if url.startswith("pipe:") and os.environ.get(PIPE_ENV, "") != "1":
        raise ConfigError(f"{name}: {url[:60]!r} is a pipe: URL, which runs a shell command; set {PIPE_ENV}=1 "
                          "in the environment to allow it (a config file alone cannot)")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if url.startswith("file:") else url


class _CommandStream(io.RawIOBase):
    """stdout of a command as a binary stream; a non-zero exit is an error at the end of the data."""

    def __init__(self, argv: list[str] | str, what: str):
        self.what = what
        shell = isinstance(argv, str)
        self.process = subprocess.Popen(argv, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.process.stdout.readinto(buffer)
        if n == 0:
            code = self.process.wait()
            if code != 0:
                message = self.process.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise OSError(f"{self.what} exited with status {code}: {message[-1] if message else ''}")
        return n

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        super().close()


def open_shard(url: str):
    """A readable binary stream of the shard at ``url``.

    Local paths and ``file:``; ``http(s)://`` through urllib (no subprocess); ``s3://`` through
    ``aws s3 cp URL -`` and ``gs://`` through ``gsutil cat URL`` (argument lists, no shell: a URL
    cannot inject a command); ``pipe:CMD`` runs CMD in a shell, only where allowed (``CLIPVIP_ALLOW_PIPE``).
    """
    check_url_allowed(url)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)
    if url.startswith("s3://"):
        return io.BufferedReader(_CommandStream(["aws", "s3", "cp", url, "-"], "aws s3 cp"), 1 << 20)
    if url.startswith("gs://"):
        return io.BufferedReader(_CommandStream(["gsutil", "cat", url], "gsutil cat"), 1 << 20)
    if url.startswith("pipe:"):
        return io.BufferedReader(_CommandStream(url[len("pipe:"):], "the pipe: command"), 1 << 20)
    if is_remote(url):
        raise DataError(f"cannot open shard {url}: unsupported URL scheme")
    return open(_local_path(url), "rb")


class _ShardErrors:
    """webdataset's error handler for one shard: remember the first error and stop that shard."""

    def __init__(self):
        self.error: BaseException | None = None

    def __call__(self, exn: BaseException) -> bool:
        if self.error is None:
            self.error = exn
        return False  # stop reading this shard; what was read stays


def iter_shard_samples(url: str, errors: _ShardErrors | None = None) -> Iterator[dict]:
    """Samples of one shard, in tar order: ``{"__key__", "__url__", "<ext>": bytes, ...}``.

    A shard that cannot be opened or ends early (truncated, corrupt header) stops yielding where
    it failed; the error is kept in ``errors`` (a fresh handler when None, then it is raised at
    the end as a :class:`DataError`).
    """
    raise_at_end = errors is None
    errors = errors or _ShardErrors()
    try:
        stream = open_shard(url)
    except (OSError, ValueError) as e:  # urllib's URLError is an OSError
        errors(e)
    else:
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=errors)
            yield from group_by_keys(files, handler=errors)
        finally:
            stream.close()
    if raise_at_end and errors.error is not None:
        raise DataError(f"shard {url}: {_one_line(errors.error)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------------------
# The index: samples per shard
# ----------------------------------------------------------------------------------------------
def count_shard(url: str) -> int:
    """Samples in one shard (read through once); a shard that cannot be read completely is an error."""
    return sum(1 for _ in iter_shard_samples(url))


def count_readable(url: str) -> tuple[int, str]:
    """``(samples readable in one shard, "" or why it ended early)``: the count a reader will see."""
    errors = _ShardErrors()
    n = sum(1 for _ in iter_shard_samples(url, errors))
    return n, "" if errors.error is None else f"shard {url}: {_one_line(errors.error)}"


def _cache_path(urls: Sequence[str]) -> str:
    h = hashlib.sha1()
    for url in urls:
        h.update(url.encode("utf-8"))
        if not is_remote(url):  # a rewritten local shard gets counted again
            st = os.stat(_local_path(url))
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(b"\n")
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clipvip")
    return os.path.join(root, "shard-index", h.hexdigest() + ".json")


def shard_counts(urls: Sequence[str], index_path: str = "", name: str = "shards") -> list[int]:
    """Samples in each of ``urls``: from ``index_path``, else ``shards.json`` beside the first
    local shard, else the cache, else counted once (and cached)."""
    candidates = [index_path] if index_path else []
    if not index_path and not is_remote(urls[0]):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(_local_path(urls[0]))), INDEX_NAME))
    if not index_path:
        candidates.append(_cache_path(urls))
    for path in candidates:
        if not os.path.isfile(path):
            if path == index_path:
                raise ConfigError(f"{name}: shard_index {path} not found")
            continue
        known = {_normal(s.url): s.samples for s in read_index(path)}
        counts = [known.get(_normal(u)) for u in urls]
        if None not in counts:
            return counts
        if path == index_path:
            first = urls[counts.index(None)]
            raise ConfigError(f"{name}: shard {first} is not in the shard index {path}")
    LOGGER.info("[%s] no shard index for %d shards: counting their samples once (cached in %s)",
                name, len(urls), os.path.dirname(_cache_path(urls)))
    counts = []
    for url in urls:
        n, problem = count_readable(url)
        if problem:  # counted as far as it reads; the reader will skip the same way
            LOGGER.warning("[%s] %s", name, problem)
        counts.append(n)
    write_index(_cache_path(urls), [ShardInfo(u, c) for u, c in zip(urls, counts)])
    return counts


def _normal(url: str) -> str:
    return url if is_remote(url) else os.path.normpath(os.path.abspath(_local_path(url)))


# ----------------------------------------------------------------------------------------------
# The epoch's plan: shards to readers, sample order, quota
# ----------------------------------------------------------------------------------------------
def deal_shards(counts: Sequence[int], n_readers: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard numbers of each reader, in reading order: shuffled by (seed, epoch), each to the
    reader with the fewest samples so far (the lowest-numbered among equals)."""
    order = np.random.default_rng(derived_seed(seed, epoch, _SHARD_ORDER_SALT)).permutation(len(counts))
    heap = [(0, r) for r in range(n_readers)]  # (samples so far, reader): the smallest pops first
    dealt: list[list[int]] = [[] for _ in range(n_readers)]
    for shard in order.tolist():
        load, reader = heapq.heappop(heap)
        dealt[reader].append(shard)
        heapq.heappush(heap, (load + int(counts[shard]), reader))
    return dealt


def buffer_plan(n: int, buffer_size: int, seed: int) -> list[int]:
    """The order in which a shuffle buffer of ``buffer_size`` emits stream positions ``0..n-1``.

    webdataset's buffer: read samples into the buffer until it holds ``buffer_size``, then per
    sample read emit a uniformly chosen one; at the end emit the rest in random order.
    """
    rng = random.Random(seed)
    buffer: list[int] = []
    plan: list[int] = []
    for position in range(n):
        buffer.append(position)
        if len(buffer) >= max(buffer_size, 1):
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            plan.append(buffer.pop())
    rng.shuffle(buffer)
    plan.extend(buffer)
    return plan


@dataclass(frozen=True)
class ShardSet:
    """The shards of one dataset entry and their sample counts (index order)."""

    name: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def bases(self) -> list[int]:
        """Global number of each shard's first sample (the ``index`` of items)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()

    @classmethod
    def from_entry(cls, entry: DatasetEntry) -> "ShardSet":
        urls = expand_shards(entry.shards, entry.name)
        counts = shard_counts(urls, entry.shard_index, entry.name)
        if sum(counts) == 0:
            raise ConfigError(f"{entry.name}: the {len(urls)} shards hold no sample")
        empty = [u for u, c in zip(urls, counts) if c == 0]
        if empty:  # a shard whose every clip failed to pack: nothing to deal out
            LOGGER.warning("[%s] %d empty shards left out (first: %s)", entry.name, len(empty), empty[0])
        kept = [(u, int(c)) for u, c in zip(urls, counts) if c > 0]
        return cls(entry.name, tuple(u for u, _ in kept), tuple(c for _, c in kept))


@dataclass(frozen=True)
class EpochLayout:
    """What every process knows about an epoch: the deal and the per-reader quota."""

    dealt: list[list[int]]
    batches_per_reader: int

    @classmethod
    def make(cls, shards: ShardSet, n_readers: int, batch_size: int, seed: int, epoch: int) -> "EpochLayout":
        if len(shards.urls) < n_readers:
            raise ConfigError(f"{shards.name}: {len(shards.urls)} shards for {n_readers} readers (processes x "
                              "n_workers): each reader needs a shard of its own; lower n_workers or write more, "
                              "smaller shards (clipvip shard --samples_per_shard)")
        quota = shards.total // (n_readers * batch_size)
        if quota < 1:
            raise ConfigError(f"{shards.name}: {shards.total} samples are less than one batch of {batch_size} "
                              f"for each of {n_readers} readers")
        return cls(deal_shards(shards.counts, n_readers, seed, epoch), quota)


# ----------------------------------------------------------------------------------------------
# One reader's samples in plan order
# ----------------------------------------------------------------------------------------------
_MISSING = object()


class PlanReader:
    """Raw samples of one reader's shards, in the order of its plan, from plan position ``start`` on.

    ``shards``: ``[(url, count)]`` in reading order; stream position ``p`` is sample ``p - base``
    of the shard whose range holds it. Reading starts at the shard of the lowest position still to
    be emitted; positions read before their turn wait in memory (at most the buffer's worth).
    ``take()`` returns ``(stream position, sample dict or None, why it is missing)``.
    """

    def __init__(self, name: str, shards: Sequence[tuple[str, int]], plan: Sequence[int], start: int):
        self.name = name
        self.shards = list(shards)
        self.starts = np.concatenate([[0], np.cumsum([c for _, c in self.shards])]).astype(int).tolist()
        self.plan = plan
        self.first = self.cursor = start
        self.rank = np.empty(len(plan), dtype=np.int64)  # plan position of each stream position
        self.rank[np.asarray(plan, dtype=np.int64)] = np.arange(len(plan))
        lowest = min(plan[start:]) if start < len(plan) else len(plan)
        self.shard = max(bisect.bisect_right(self.starts, lowest) - 1, 0)  # the first shard to read
        self.position = self.starts[self.shard]  # next stream position to read
        self.pending: dict[int, Any] = {}
        self.reasons: dict[int, str] = {}
        self._samples: Iterator[dict] | None = None
        self._errors: _ShardErrors | None = None

    def take(self) -> tuple[int, dict | None, str]:
        want = self.plan[self.cursor]
        self.cursor += 1
        while want not in self.pending:
            self._read_one()
        sample = self.pending.pop(want)
        if sample is _MISSING:
            return want, None, self.reasons.pop(want, "missing")
        return want, sample, ""

    def _read_one(self) -> None:
        url, count = self.shards[self.shard]
        end = self.starts[self.shard + 1]
        if self._samples is None:
            self._errors = _ShardErrors()
            self._samples = iter_shard_samples(url, self._errors)
            self._in_shard = 0
        sample = next(self._samples, None) if self.position < end else None
        if sample is not None:
            self._keep(self.position, sample)
            self.position += 1
            self._in_shard += 1
            return
        # The shard is done: normally, early (truncated / unreadable), or with samples to spare.
        if self.position < end:
            why = (f"shard {url} unreadable after {self._in_shard} of {count} samples: {_one_line(self._errors.error)}"
                   if self._errors.error is not None else
                   f"shard {url} holds {self._in_shard} samples, its index says {count}")
            # Each missing sample is a bad sample named by this shard: warned about once per run.
            LOGGER.debug("[%s] %s; the rest of it is skipped", self.name, why)
            for p in range(self.position, end):
                self._keep(p, _MISSING, why)
            self.position = end
        elif next(self._samples, None) is not None:
            LOGGER.warning("[%s] shard %s holds more samples than its index says (%d); the extra ones are not used",
                           self.name, url, count)
        self._samples.close()
        self._samples = None
        self.shard += 1

    def _keep(self, position: int, sample: Any, why: str = "") -> None:
        if self.rank[position] >= self.first:  # still to be emitted (read once: sequential)
            self.pending[position] = sample
            if why:
                self.reasons[position] = why
        # else: emitted before this reader was (re)started: passed over, never decoded


# ----------------------------------------------------------------------------------------------
# Samples -> items
# ----------------------------------------------------------------------------------------------
def _text_of(sample: dict, field: str, meta: dict | None) -> Any:
    """The text member ``KEY.<field>``, else the field of ``KEY.json``; None where neither exists."""
    if not field:
        return None
    if field in sample and field != "json":
        return sample[field].decode("utf-8")
    if meta is not None:
        return meta.get(field)
    return None


def _pick_text(value: Any, rng: random.Random, what: str) -> str:
    if isinstance(value, list):  # several captions: one per example, drawn afresh
        value = [v for v in value if isinstance(v, str) and v.strip()]
        if not value:
            raise DataError(f"no non-empty {what}")
        value = value[rng.randrange(len(value))]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"no {what}" if value is None else f"empty {what}")
    return value


class SampleDecoder:
    """A raw shard sample -> a training item of a retrieval set or of a pretraining set.

    Retrieval: ``{"video", "text", "clip_id", "index"}``. Pretraining (``kind == "pretrain"``):
    the text made by ``vid_txt`` from the subtitle (``text_field``) and the auxiliary caption
    (``caption_field``); with ``caption_field`` set also the middle frame ``image`` and its
    ``caption`` for the frame-caption loss terms.
    """

    def __init__(self, entry: DatasetEntry, reader: ClipReader, kind: str):
        self.kind, self.reader = kind, reader
        self.text_field, self.caption_field = entry.text_field, entry.caption_field
        self.video_field = entry.video_field
        if kind == "pretrain":
            if entry.vid_txt not in VID_TXT_MODES:
                raise ConfigError(f"{entry.name}: unknown vid_txt '{entry.vid_txt}' (valid: {', '.join(VID_TXT_MODES)})")
            needs_caption, self.make_text = VID_TXT_MODES[entry.vid_txt]
            if needs_caption and not self.caption_field:
                raise ConfigError(f"{entry.name}: vid_txt '{entry.vid_txt}' needs 'caption_field' (the auxiliary "
                                  "caption's member or KEY.json field)")
        if not self.text_field:
            raise ConfigError(f"{entry.name}: 'text_field' is empty")

    def video_member(self, sample: dict) -> str:
        names = [self.video_field] if self.video_field else VIDEO_EXTENSIONS
        for ext in names:
            if ext in sample:
                return ext
        raise DataError(f"no video member ({'/'.join('KEY.' + n for n in names)})")

    def __call__(self, sample: dict, index: int, rng: random.Random) -> dict:
        meta = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"KEY.json is not JSON: {e}") from None
            if not isinstance(meta, dict):
                raise DataError("KEY.json is not an object")
        ext = self.video_member(sample)
        clip_id = meta.get("clip_id") if meta and isinstance(meta.get("clip_id"), str) else sample["__key__"]
        text = _pick_text(_text_of(sample, self.text_field, meta), rng, f"text '{self.text_field}'")
        caption = None
        if self.caption_field:
            caption = _pick_text(_text_of(sample, self.caption_field, meta), rng, f"caption '{self.caption_field}'")
        if self.kind == "pretrain":
            text = self.make_text(caption, text, rng)
        with_middle = self.kind == "pretrain" and caption is not None
        source = VideoBytes(sample[ext], f"{sample['__url__']}:{sample['__key__']}.{ext}")
        video, image = self.reader.read_frames(source, rng, with_middle=with_middle)  # uint8 (T, H, W, 3), (H, W, 3)
        item = {"video": video, "text": text, "clip_id": clip_id, "index": index}
        if with_middle:
            item["image"], item["caption"] = image, caption
        return item


# ----------------------------------------------------------------------------------------------
# The streamed dataset and the stream
# ----------------------------------------------------------------------------------------------
@dataclass
class ReaderStart:
    """Where a reader starts in an epoch: plan positions used, batches emitted."""

    cursor: int = 0
    batches: int = 0


class ShardDataset(IterableDataset):
    """An epoch of batches from shards, for one rank; each DataLoader worker is one reader.

    Set ``epoch``, ``starts`` (per reader of this rank) and ``rotation`` (the reader the first
    worker plays: a resumed epoch goes on with the reader whose turn it is) before each
    ``iter(DataLoader)``; workers are started per iteration, so they see the values.
    Batches: the collator's dict plus ``num_skipped`` (``bad_samples`` when any) and
    ``stream_reader``/``stream_cursor``.
    """

    def __init__(self, shards: ShardSet, decoder: SampleDecoder, collator: Callable, *, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world_size: int, n_workers: int):
        self.shards, self.decoder, self.collator = shards, decoder, collator
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.readers_per_rank = max(n_workers, 1)
        self.n_readers = world_size * self.readers_per_rank
        self.bases = shards.bases
        self.epoch, self.rotation = 0, 0
        self.starts = [ReaderStart() for _ in range(self.readers_per_rank)]

    def layout(self, epoch: int) -> EpochLayout:
        return EpochLayout.make(self.shards, self.n_readers, self.batch_size, self.seed, epoch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.rotation) % self.readers_per_rank
        yield from self.reader_batches(local, self.layout(self.epoch))

    def reader_batches(self, local: int, layout: EpochLayout) -> Iterator[dict]:
        """The rest of this epoch's batches of reader ``local`` of this rank."""
        reader = self.rank * self.readers_per_rank + local
        mine = layout.dealt[reader]
        shards = [(self.shards.urls[s], self.shards.counts[s]) for s in mine]
        bases = [self.bases[s] for s in mine]
        offsets = np.concatenate([[0], np.cumsum([c for _, c in shards])]).astype(int).tolist()
        n = offsets[-1]
        plan = buffer_plan(n, self.shuffle_buffer, derived_seed(self.seed, self.epoch, _PLAN_SALT, reader))
        start = self.starts[local]
        cursor, done = start.cursor, start.batches
        plan_reader, pass_ = None, -1
        good_in_pass, whole_pass = 0, False
        while done < layout.batches_per_reader:
            started = time.perf_counter()  # this reader's seconds for the batch: the loader's throughput
            items, bad = [], []
            while len(items) < self.batch_size:
                if cursor // n != pass_:  # a new pass over the plan (the first, or a repeat of it)
                    if whole_pass and good_in_pass == 0:
                        raise DataError(f"[{self.shards.name}] no readable sample in the {len(mine)} shards of reader "
                                        f"{reader} (first: {shards[0][0]})")
                    pass_, good_in_pass, whole_pass = cursor // n, 0, cursor % n == 0
                    if pass_ > 0 and cursor % n == 0:
                        LOGGER.info("[%s] reader %d used its %d samples; repeating some to fill its %d batches",
                                    self.shards.name, reader, n, layout.batches_per_reader)
                    plan_reader = PlanReader(self.shards.name, shards, plan, cursor % n)
                position, sample, why = plan_reader.take()
                seed = derived_seed(self.seed, self.epoch, _ITEM_SALT, reader, cursor)
                cursor += 1
                shard_no = bisect.bisect_right(offsets, position) - 1
                index = bases[shard_no] + position - offsets[shard_no]
                try:
                    if sample is None:
                        raise DataError(why)
                    item = self.decoder(sample, index, random.Random(seed))
                except BAD_SAMPLE_ERRORS as e:
                    # A sample the shard's end took with it is named by its shard: the shard is what to repair.
                    name = f"{sample['__url__']}:{sample['__key__']}" if sample is not None else shards[shard_no][0]
                    bad.append(BadSample(self.shards.name, name, unreadable_reason(e)))  # warned once per run
                    continue
                good_in_pass += 1
                items.append(item)
            batch = carry(self.collator(items), bad)
            done += 1
            batch["num_skipped"], batch["load_s"] = len(bad), time.perf_counter() - started
            batch["stream_reader"], batch["stream_cursor"] = local, cursor
            yield batch


def _as_is(batch: dict) -> dict:  # the dataset collates; DataLoader(batch_size=None) passes batches on
    return batch


class ShardStream:
    """Batches from shards, epoch after epoch, without end; the same interface as ``LoaderStream``.

    ``state_dict()``: epoch, batches handed out in it, and each reader's cursor after its last
    batch handed out; ``load_state_dict()`` makes the next batch the one an uninterrupted run
    would have handed out next.
    """

    def __init__(self, dataset: ShardDataset, settings: LoaderSettings):
        self.dataset = dataset
        layout = dataset.layout(0)  # every epoch has the same quota; this also checks shards >= readers
        kwargs = loader_kwargs(settings, None, persistent=False)  # started per epoch: they must see its position
        self.loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, **kwargs)
        self.epoch, self.batch = 0, 0
        self.cursors = [ReaderStart() for _ in range(dataset.readers_per_rank)]
        self.batches_per_epoch = dataset.readers_per_rank * layout.batches_per_reader
        self._iterator = None
        LOGGER.info("[%s] %d samples in %d shards for %d readers: %d batches of %d per reader and epoch "
                    "(%d per process), shuffle buffer %d", dataset.shards.name, dataset.shards.total,
                    len(dataset.shards.urls), dataset.n_readers, layout.batches_per_reader, dataset.batch_size,
                    self.batches_per_epoch, dataset.shuffle_buffer)

    @classmethod
    def from_config(cls, cfg: Mapping, entry: Mapping, tokenizer, rank: int, world_size: int,
                    kind: str = "retrieval", loader: LoaderSettings | None = None) -> "ShardStream":
        """The stream of config ``entry`` (``vis_format`` "webdataset") for a retrieval or pretraining
        run; ``loader``: the loader settings (default: the config's)."""
        dataset_entry = DatasetEntry.from_config(entry)
        settings = DatasetSettings.from_config(cfg)
        loader = loader or LoaderSettings.from_config(cfg)
        collator = (PretrainCollator if kind == "pretrain" else RetrievalCollator)(tokenizer, settings.max_txt_len)
        shards = ShardSet.from_entry(dataset_entry)
        if loader.workers_chosen:  # n_workers -1: no more readers than the shards can keep busy
            readers = max(min(loader.n_workers, len(shards.urls) // world_size), 1)
            loader = dataclasses.replace(loader, n_workers=readers)
        dataset = ShardDataset(shards, SampleDecoder(dataset_entry, ClipReader.from_config(cfg, True), kind),
                               collator, batch_size=loader.train_batch_size, shuffle_buffer=dataset_entry.shuffle_buffer,
                               seed=loader.seed, rank=rank, world_size=world_size, n_workers=loader.n_workers)
        return cls(dataset, loader)

    @property
    def num_examples(self) -> int:
        return self.dataset.shards.total

    @property
    def workers(self) -> int:
        """Processes reading shards (the main process itself without workers)."""
        return max(self.loader.num_workers, 1)

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
            self.cursors = [ReaderStart() for _ in self.cursors]
        if self._iterator is None:
            self.dataset.epoch = self.epoch
            self.dataset.rotation = self.batch % self.dataset.readers_per_rank
            self.dataset.starts = [ReaderStart(c.cursor, c.batches) for c in self.cursors]
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:  # every reader owes its quota: ending early is a bug, not an epoch end
            raise DataError(f"[{self.dataset.shards.name}] the shard readers ended after {self.batch} of "
                            f"{self.batches_per_epoch} batches of epoch {self.epoch}") from None
        local = batch.pop("stream_reader")
        self.cursors[local] = ReaderStart(batch.pop("stream_cursor"), self.cursors[local].batches + 1)
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self._iterator = None  # the epoch's workers end here
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "readers": len(self.cursors),
                "cursors": [[c.cursor, c.batches] for c in self.cursors]}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state.get("readers", -1)) != len(self.cursors):
            raise ConfigError(f"the training state was saved with {state.get('readers')} shard readers per process "
                              f"(n_workers), this run has {len(self.cursors)}: resume with --n_workers "
                              f"{state.get('readers')} (n_workers -1 takes the count from this machine's CPUs)")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.cursors = [ReaderStart(int(c), int(b)) for c, b in state["cursors"]]
        self._iterator = None
