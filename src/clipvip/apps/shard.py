"""``clipvip shard``: pack a retrieval or HD-VILA pretraining set into WebDataset tar shards.

The output is what video2dataset writes, so that one reader (``vis_format: "webdataset"``,
:mod:`clipvip.data.shards`) reads ours and theirs alike (docs/shards.md):

    DIR/00000.tar, 00001.tar, ...   per sample KEY.mp4 (or KEY.avi ...), KEY.txt, KEY.json
    DIR/shards.json                 the shard index (clipvip.data.shard_index): samples and bytes per shard
    DIR/failed.txt                  clip id <TAB> path <TAB> reason, for every clip left out
    DIR/.parts/NNNNN.json           per shard: the fingerprint of its inputs, its counts and failures

KEY is the zero-padded global sample number, ``f"{shard:05d}{i:04d}"``: sample ``g`` of the input
(annotation order) is sample ``i = g % N`` of shard ``g // N``, so a clip that fails leaves a gap
in the keys and every shard is a function of its own slice of the input alone. That makes the
work parallel (one shard per task), resumable (a shard whose part file holds the fingerprint of
its slice and options, beside a tar of the size recorded, is complete and skipped) and
deterministic (fixed member order, mtime 0, uid/gid 0, single-threaded x264), so a rerun, a run
with another worker count and a run on another machine with the same libraries agree byte for
byte.

A shard is written as ``.tmp-<pid>-NNNNN.tar`` and renamed when complete; its part file is
written after the rename and removed before a rewrite, so a kill -9 at any point leaves either a
complete shard with its part file or a shard that the next run redoes. A rerun after the input
changed redoes exactly the shards whose slice (clip ids, paths, texts, the source files' size and
mtime) or options changed, and removes shards of ours past the new end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
from fractions import Fraction
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipvip.apps.cli import HelpFormatter, prog_name
from clipvip.config import load_config
from clipvip.data.annotations import ANNOTATION_RULES, DatasetEntry, hdvila_video_path, load_annotations, select_rule
from clipvip.data.pretrain_dataset import LazyLmdb, PretrainDataset, _is_lmdb, _load_caption_file
from clipvip.data.reencode import DEFAULT_CRF, DEFAULT_KERNEL, RESIZE_KERNELS, images_to_mp4_bytes, reencode_to_bytes
from clipvip.data.shard_index import INDEX_NAME, ShardInfo, is_remote, write_index
from clipvip.data.shards import count_readable, expand_shards
from clipvip.data.video import VideoDecodeError, count_folder_frames, frame_path, load_sampled_frames
from clipvip.errors import ConfigError, DataError
from clipvip.files import atomic_path, atomic_write_json, atomic_write_text
from clipvip.logging_utils import get_logger

LOGGER = get_logger(__name__)

KINDS = ("retrieval", "pretrain")
PARTS_DIR = ".parts"  # per-shard part files and the lock, beside the shards
PART_FORMAT = "clipvip.shard-part/1"
FAILED_NAME = "failed.txt"
TAR_MTIME = 0  # fixed member metadata: the same input gives the same bytes on every machine


# ----------------------------------------------------------------------------------------------
# What is packed
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackOptions:
    """How samples become tar members; every field is part of each shard's fingerprint."""

    samples_per_shard: int = 1000
    reencode: bool = False  # re-encode videos to height x width at fps, else copy their bytes
    fps: float = 3.0  # re-encoding rate; also the nominal rate of frame folders turned into mp4
    height: int = 240
    width: int = 320
    crf: int = DEFAULT_CRF
    kernel: str = DEFAULT_KERNEL
    backend: Optional[str] = None  # decoder of the check of copied videos (None: the default)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One clip ready to pack: its video (a file, or a frame folder) and the texts of its members."""

    clip_id: str
    path: str  # video file, or frame folder
    text: str  # KEY.txt
    meta: dict  # KEY.json besides "key" and "clip_id"
    frame_root: Optional[str] = None  # frame folders: the folder the clip id is relative to
    num_frame: Optional[int] = None  # frame folders: frames announced by the annotation


class RetrievalSource:
    """The records of a retrieval annotation file (MSR-VTT, DiDeMo, LSMDC, ActivityNet layouts)."""

    kind = "retrieval"

    def __init__(self, entry: DatasetEntry, rule: Optional[str] = None):
        self.entry = entry
        self.rule = select_rule(entry, rule)
        self.records = load_annotations(entry.txt, entry, self.rule)
        self.where = entry.txt

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, g: int) -> Sample:
        record = self.records[g]
        if not record.texts:
            raise DataError("the record has no non-empty caption")
        frame_root = self.entry.vis if record.is_frame_folder else None
        # DiDeMo's sentences are already one paragraph here (the rule merged them), as training reads them.
        return Sample(record.clip_id, record.path, record.texts[0], {"captions": list(record.texts)},
                      frame_root, record.num_frame)

    def describe(self, g: int) -> tuple[str, str]:
        return self.records[g].clip_id, self.records[g].path

    def close(self) -> None:
        pass


class PretrainSource:
    """An HD-VILA-style set: subtitles (LMDB + ``<txt>.jsonl`` list, or inline text), optional captions.

    The clip list is read here; subtitles and captions are looked up per sample, in the worker
    that packs it (an LMDB is opened lazily by the process reading it and pickles as its path).
    """

    kind = "pretrain"

    def __init__(self, entry: DatasetEntry):
        self.vis = entry.vis
        txt = entry.txt
        self.subtitles: Optional[LazyLmdb] = None
        if _is_lmdb(txt):
            self.subtitles = LazyLmdb(txt)
            self.where = txt + ".jsonl"
            self.clip_ids, self.inline = PretrainDataset._read_clip_list(self.where, with_text=False)
        else:
            self.where = txt
            self.clip_ids, self.inline = PretrainDataset._read_clip_list(txt, with_text=True)
        cap = entry.vid_cap_path
        self.captions = (LazyLmdb(cap) if _is_lmdb(cap) else _load_caption_file(cap)) if cap else None

    def __len__(self) -> int:
        return len(self.clip_ids)

    def sample(self, g: int) -> Sample:
        clip_id = self.clip_ids[g]
        if self.subtitles is not None:
            subtitle = self.subtitles.get(clip_id)
            if subtitle is None:
                raise DataError(f"no subtitle in {self.subtitles.path}")
        else:
            subtitle = self.inline[g]
        meta: dict[str, Any] = {"subtitle": subtitle}
        caption = self.captions.get(clip_id) if self.captions is not None else None
        if caption is not None and caption.strip():
            meta["caption"] = caption
        return Sample(clip_id, hdvila_video_path(self.vis, clip_id), subtitle, meta)

    def describe(self, g: int) -> tuple[str, str]:
        return self.clip_ids[g], hdvila_video_path(self.vis, self.clip_ids[g])

    def close(self) -> None:
        """Close this process's LMDB handles (a reader in the same process may open them afresh)."""
        for store in (self.subtitles, self.captions):
            if store is not None:
                store.close()


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """File and key names of a set of ``total`` samples in shards of ``per_shard``."""

    out: str
    total: int
    per_shard: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.total / self.per_shard)

    @property
    def shard_digits(self) -> int:
        return max(5, len(str(self.num_shards - 1)))

    @property
    def sample_digits(self) -> int:
        return max(4, len(str(self.per_shard - 1)))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.per_shard, min(self.total, (shard + 1) * self.per_shard))

    def key(self, g: int) -> str:
        # No dot: webdataset splits a member name into key and field at the first dot.
        shard, i = divmod(g, self.per_shard)
        return f"{shard:0{self.shard_digits}d}{i:0{self.sample_digits}d}"

    def tar_path(self, shard: int) -> str:
        return os.path.join(self.out, f"{shard:0{self.shard_digits}d}.tar")

    def part_path(self, shard: int) -> str:
        return os.path.join(self.out, PARTS_DIR, f"{shard:0{self.shard_digits}d}.json")


@dataclasses.dataclass(frozen=True)
class ShardResult:
    shard: int
    samples: int  # packed
    bytes: int  # size of the tar
    failed: list  # [[g, clip_id, path, reason], ...]
    skipped: bool  # already complete from an earlier run
    planned: int  # samples of the input in this shard (packed + failed)


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------
def _stat(sample: Sample) -> Optional[list[int]]:
    """What says a source changed: size and mtime of the file (of the folder, for frame folders)."""
    try:
        st = os.stat(sample.path)
    except OSError:
        return None
    return [st.st_size if not sample.frame_root else 0, st.st_mtime_ns]


def _one_line(e: BaseException) -> str:
    """The reason column of failed.txt (the path is a column of its own)."""
    text = (e.reason if isinstance(e, VideoDecodeError) and e.reason else str(e)) or type(e).__name__
    if not isinstance(e, DataError):
        text = f"{type(e).__name__}: {text}"
    return re.sub(r"\s+", " ", text).strip()


def _frame_images(sample: Sample) -> Iterator[np.ndarray]:
    """The jpgs of a frame folder in order, as ``[H, W, 3]`` uint8, clamped where the annotation's
    ``num_frame`` promises more than the folder holds (as reading them for training does)."""
    present = None
    for i in range(sample.num_frame):
        path = frame_path(sample.frame_root, sample.clip_id, i)
        if not os.path.isfile(path):
            if present is None:
                present = count_folder_frames(sample.frame_root, sample.clip_id)
            if i < present:
                raise DataError(f"frame file missing: {path}")
            return
        with Image.open(path) as image:
            yield np.asarray(image.convert("RGB"))


def video_member(sample: Sample, opts: PackOptions) -> tuple[str, bytes]:
    """``(member suffix, bytes)`` of a sample's video; raises when it cannot be read.

    Copied videos are checked by opening them with the decoder (a frame count > 0) and decoding
    their first frame: cheap, and it catches what is not a video at all (random bytes, a file cut
    before its index). Re-encoded videos and frame folders are decoded in full, so any frame that
    fails to decode is caught.
    """
    if sample.frame_root is not None:
        size = (opts.height, opts.width) if opts.reencode else (0, 0)
        data, _ = images_to_mp4_bytes(_frame_images(sample), Fraction(opts.fps), *size, opts.crf, opts.kernel)
        return "mp4", data
    if not os.path.isfile(sample.path):
        raise DataError("no such file")
    if os.path.getsize(sample.path) == 0:
        raise DataError("empty file")  # before any decoder sees it: some crash on empty input
    if opts.reencode:
        data, _ = reencode_to_bytes(sample.path, opts.fps, opts.height, opts.width, opts.crf, opts.kernel)
        return "mp4", data
    load_sampled_frames(sample.path, lambda n: [0], opts.backend)
    with open(sample.path, "rb") as f:
        data = f.read()
    suffix = os.path.splitext(sample.path)[1].lower().lstrip(".")
    return suffix or "mp4", data


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _read_part(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            part = json.load(f)
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("format") == PART_FORMAT else None


def pack_shard(source, layout: Layout, opts: PackOptions, shard: int) -> ShardResult:
    """Write shard ``shard`` of ``source`` (or find it complete from an earlier run)."""
    indices = layout.shard_range(shard)
    planned: list[tuple[int, Optional[Sample], str]] = []  # (g, sample or None, reason it failed)
    for g in indices:
        try:
            planned.append((g, source.sample(g), ""))
        except Exception as e:  # noqa: BLE001 - a bad record is one line of failed.txt, not the end
            planned.append((g, None, _one_line(e)))
    fingerprint = hashlib.sha256(json.dumps({
        "kind": source.kind, "options": dataclasses.asdict(opts), "key_digits": [layout.shard_digits,
                                                                                  layout.sample_digits],
        "samples": [[g, reason] if s is None else [g, dataclasses.asdict(s), _stat(s)] for g, s, reason in planned],
    }, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    tar_path, part_path = layout.tar_path(shard), layout.part_path(shard)
    part = _read_part(part_path)
    if (part is not None and part.get("fingerprint") == fingerprint and os.path.isfile(tar_path)
            and os.path.getsize(tar_path) == part.get("bytes")):
        return ShardResult(shard, int(part["samples"]), int(part["bytes"]), part["failed"], True, len(indices))

    # The old part file goes first: a tar renamed into place without its part file is redone.
    with contextlib.suppress(FileNotFoundError):
        os.remove(part_path)
    failed, packed = [], 0
    with atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for g, sample, reason in planned:
                if sample is not None:
                    try:
                        suffix, data = video_member(sample, opts)
                    except Exception as e:  # noqa: BLE001 - an unreadable clip is left out and listed
                        reason = _one_line(e)
                if reason:
                    failed.append([g, *source.describe(g), reason])
                    continue
                key = layout.key(g)
                _add_member(tar, f"{key}.{suffix}", data)
                _add_member(tar, f"{key}.txt", sample.text.encode("utf-8"))
                meta = {"key": key, "clip_id": sample.clip_id, **sample.meta}
                _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
                packed += 1
    size = os.path.getsize(tar_path)
    atomic_write_json(part_path, {"format": PART_FORMAT, "fingerprint": fingerprint, "samples": packed,
                                  "bytes": size, "failed": failed}, sort_keys=True)
    return ShardResult(shard, packed, size, failed, False, len(indices))


# Worker processes get the source once (inherited through fork, or pickled once per worker
# under spawn), then only shard numbers travel.
_WORKER: dict[str, Any] = {}


def _init_worker(source, layout: Layout, opts: PackOptions) -> None:
    _WORKER.update(source=source, layout=layout, opts=opts)


def _pack_in_worker(shard: int) -> ShardResult:
    return pack_shard(_WORKER["source"], _WORKER["layout"], _WORKER["opts"], shard)


# ----------------------------------------------------------------------------------------------
# The whole set
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackSummary:
    out: str
    samples: int
    shards: int
    written: int  # shards written by this run
    complete: int  # shards found complete from an earlier run
    failed: int

    def line(self) -> str:
        failed = (f"{self.failed} clip(s) left out, listed in {os.path.join(self.out, FAILED_NAME)}"
                  if self.failed else "none failed")
        return (f"packed {self.samples} clips into {self.shards} shards in {self.out} "
                f"({self.written} written, {self.complete} already complete); {failed}; "
                f"index {os.path.join(self.out, INDEX_NAME)}")


@contextlib.contextmanager
def _locked(out: str) -> Iterator[None]:
    """One packer per folder: a second one would remove the first one's temporary files."""
    parts = os.path.join(out, PARTS_DIR)
    try:
        os.makedirs(parts, exist_ok=True)
        handle = open(os.path.join(parts, "lock"), "w")
    except OSError as e:
        raise DataError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"another clipvip shard is writing {out}") from None
        yield
    finally:
        handle.close()  # releases the lock (so does the process's death: kill -9 leaves no stale lock)


_OUR_TAR = re.compile(r"(\d{5,})\.tar$")
_OUR_TMP = re.compile(r"\.tmp-\d+-(\d{5,}\.tar|\d{5,}\.json)$")


def _clean(layout: Layout) -> None:
    """Remove what a killed run left (temporary files) and shards of ours past the end of the set."""
    parts = os.path.join(layout.out, PARTS_DIR)
    for folder in (layout.out, parts):
        for name in os.listdir(folder):
            if _OUR_TMP.match(name):
                os.remove(os.path.join(folder, name))
    for name in os.listdir(layout.out):
        match = _OUR_TAR.match(name)
        if match and int(match.group(1)) >= layout.num_shards:
            part = os.path.join(parts, f"{match.group(1)}.json")
            if os.path.isfile(part):  # ours; a tar without our part file is not touched
                os.remove(os.path.join(layout.out, name))
                os.remove(part)


def pack(source, out: str, opts: PackOptions, workers: int = 1, progress: bool = True) -> PackSummary:
    """Pack every sample of ``source`` into shards under ``out``; see the module docstring."""
    if opts.samples_per_shard <= 0:
        raise ConfigError(f"--samples_per_shard must be positive, got {opts.samples_per_shard}")
    if len(source) == 0:
        raise DataError(f"no clips listed in {source.where}")
    out = os.path.abspath(out)
    layout = Layout(out, len(source), opts.samples_per_shard)
    with _locked(out):
        _clean(layout)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, INDEX_NAME))  # an index of another set must not outlive it
        results = []
        shards = range(layout.num_shards)
        bar = tqdm(total=layout.total, unit="clip", desc="shards", disable=not progress, dynamic_ncols=True)
        try:
            if workers > 1 and layout.num_shards > 1:
                # fork where there is one: the workers inherit the clip list (100M ids at HD-VILA
                # scale) instead of each unpickling a copy, as spawn and forkserver would have them do.
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                with multiprocessing.get_context(method).Pool(min(workers, layout.num_shards), _init_worker,
                                                              (source, layout, opts)) as pool:
                    for result in pool.imap_unordered(_pack_in_worker, shards):
                        results.append(result)
                        bar.update(result.planned)
            else:
                for shard in shards:
                    results.append(pack_shard(source, layout, opts, shard))
                    bar.update(results[-1].planned)
        except OSError as e:  # disk full, folder removed under us: one line, the next run resumes
            raise DataError(f"writing shards in {out}: {e.strerror or e}") from None
        finally:
            bar.close()
            source.close()
        results.sort(key=lambda r: r.shard)
        failed = [row for r in results for row in r.failed]
        atomic_write_text(os.path.join(out, FAILED_NAME),
                          "".join(f"{clip_id}\t{path}\t{reason}\n" for _, clip_id, path, reason in failed))
        write_index(os.path.join(out, INDEX_NAME),
                    [ShardInfo(layout.tar_path(r.shard), r.samples, r.bytes) for r in results])
    return PackSummary(out, sum(r.samples for r in results), layout.num_shards,
                       sum(not r.skipped for r in results), sum(r.skipped for r in results), len(failed))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
HELP = """\
Pack a dataset into WebDataset tar shards as video2dataset writes them (docs/shards.md):
DIR/00000.tar ... with KEY.mp4 (or the source's extension), KEY.txt, KEY.json per clip, the
shard index DIR/shards.json and DIR/failed.txt (clip id, path, reason of every clip left out).

  retrieval: KEY.txt the first caption, KEY.json {"key", "clip_id", "captions"}; read back with
             "text_field": "captions"
  pretrain:  KEY.txt the subtitle, KEY.json {"key", "clip_id", "subtitle", "caption"?}; read back
             with "text_field": "txt", "caption_field": "caption"

Videos are copied as they are (checked by opening them and decoding the first frame) or, with
--reencode, re-encoded to --size at --fps (every frame decoded). Frame folders (vis_format
"frame") become H.264 mp4s, one jpg per frame, labelled --fps frames per second. A rerun resumes:
complete shards are kept, changed ones redone. The same input gives the same bytes.

examples:
  {prog} --out shards/msrvtt --txt data/msrvtt/train.jsonl --vis data/msrvtt/videos --workers 8
  {prog} --out shards/hdvila --kind pretrain --txt data/hdvila/subtitles --vis data/hdvila/videos \\
      --vid_cap_path data/hdvila/captions --reencode --fps 3 --size 240x320
  {prog} --out shards/msrvtt_train --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json --dataset msrvtt-9k
"""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW (e.g. 240x320), got {text!r}") from None
    if h <= 0 or w <= 0 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"size must be HxW with even positive values (H.264 4:2:0), got {text}")
    return h, w


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name("shard"), formatter_class=HelpFormatter,
                                description=HELP.replace("{prog}", prog_name("shard")))
    p.add_argument("--out", help="output folder of the shards (required when packing)")
    p.add_argument("--index", metavar="SHARDS",
                   help="write the shard index of existing shards (another writer's, e.g. video2dataset) instead of "
                        "packing: SHARDS as a training set's 'shards' ('DIR/{00000..00099}.tar', a glob, a .txt); "
                        "counted with --workers processes, written to shards.json beside the first shard or to --out")
    p.add_argument("--kind", choices=KINDS, default="retrieval",
                   help="retrieval annotations, or the HD-VILA pretraining layout")
    data = p.add_argument_group("the dataset: as paths, or as an entry of a run config")
    data.add_argument("--txt", help="annotation file (.jsonl/.json); pretrain: the subtitles LMDB "
                                    "(clips listed in <txt>.jsonl) or a .jsonl with inline text")
    data.add_argument("--vis", help="video folder (frame-folder root for vis_format frame)")
    data.add_argument("--vid_cap_path", help="pretrain: auxiliary captions, LMDB or json list")
    data.add_argument("--vis_format", default="video", choices=("video", "frame", "videoframe"),
                      help="frame: ActivityNet-style folders of jpgs")
    data.add_argument("--name", help="the dataset's name (the annotation rule is chosen by it: "
                                                 "'didemo', 'lsmdc' in it)")
    data.add_argument("--rule", choices=list(ANNOTATION_RULES), help="force an annotation rule (retrieval)")
    data.add_argument("--config", help="a run config: take the dataset entry --dataset from it "
                                       "(paths joined to blob_mount_dir as training does)")
    data.add_argument("--dataset", help="name of an entry of the config's train/val/inference_datasets")
    pack_opts = p.add_argument_group("packing")
    pack_opts.add_argument("--samples_per_shard", type=_positive(int), default=1000, help="clips per tar file")
    pack_opts.add_argument("--reencode", action="store_true", help="re-encode videos to --size at --fps (H.264)")
    pack_opts.add_argument("--fps", type=_positive(float), default=3.0,
                           help="frame rate of --reencode, and of frame folders turned into videos")
    pack_opts.add_argument("--size", type=_parse_size, default=(240, 320), metavar="HxW",
                           help="frame size of --reencode (frame folders too when --reencode is given; default: 240x320)")
    pack_opts.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 quality of encoded videos")
    pack_opts.add_argument("--resize_kernel", choices=sorted(RESIZE_KERNELS), default=DEFAULT_KERNEL,
                           help="libswscale kernel of --size")
    pack_opts.add_argument("--video_backend", choices=("decord", "pyav"),
                           help="decoder that checks copied videos (default: the library's)")
    pack_opts.add_argument("--workers", type=_positive(int), default=os.cpu_count() or 1,
                           help="processes, one shard at a time each")
    pack_opts.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _entry_from_config(path: str, name: str) -> dict:
    cfg = load_config(path, [])
    entries = [e for key in ("train_datasets", "val_datasets", "inference_datasets") for e in cfg[key]]
    for entry in entries:
        if entry["name"] == name:
            return dict(entry)
    names = ", ".join(sorted({str(e["name"]) for e in entries if e["name"]})) or "none has a name"
    raise ConfigError(f"{path}: no dataset entry named '{name}' (entries: {names})")


def dataset_entry(args: argparse.Namespace) -> DatasetEntry:
    """The dataset entry the command line describes, checked for what packing needs."""
    if args.config or args.dataset:
        if not (args.config and args.dataset):
            raise ConfigError("--config and --dataset go together: the config file and the name of its dataset entry")
        if args.txt or args.vis:
            raise ConfigError("give the dataset either as --config/--dataset or as --txt/--vis, not both")
        values = _entry_from_config(args.config, args.dataset)
    else:
        if not (args.txt and args.vis):
            raise ConfigError("--txt and --vis are required (or --config CFG --dataset NAME)")
        values = {"name": args.name or "", "txt": args.txt, "vis": args.vis, "vis_format": args.vis_format,
                  "vid_cap_path": args.vid_cap_path or ""}
    entry = DatasetEntry.from_config(values)
    if not os.path.isdir(entry.vis):
        raise DataError(f"video folder not found: {entry.vis}")
    if args.kind == "pretrain":
        if entry.vis_format == "frame":
            raise ConfigError("pretraining sets are videos: vis_format 'frame' is for --kind retrieval")
        if args.rule:
            raise ConfigError("--rule is for --kind retrieval (pretraining clips are at {vis}/{video}/{clip_id})")
        if not os.path.exists(entry.txt):
            raise DataError(f"subtitles not found: {entry.txt}")
    elif _is_lmdb(entry.txt) and os.path.isdir(entry.txt):
        raise ConfigError(f"{entry.txt} looks like a subtitles LMDB: pack pretraining sets with --kind pretrain")
    return entry


def write_shard_index(spec: str, out: str | None, workers: int, progress: bool) -> str:
    """Count the samples of every shard of ``spec`` (in parallel) and write their ``shards.json``."""
    urls = expand_shards(spec, "--index")
    folder = out or (os.path.dirname(os.path.abspath(urls[0])) if not is_remote(urls[0]) else None)
    if folder is None:
        raise ConfigError("--index of remote shards needs --out (the folder to write shards.json to)")
    os.makedirs(folder, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(min(workers, len(urls))) as pool:
        counted = list(tqdm(pool.imap(count_readable, urls), total=len(urls), desc="counting", unit="shard",
                            disable=not progress))
    for _, problem in counted:
        if problem:  # indexed as far as it reads: the reader skips the rest the same way
            LOGGER.warning("%s", problem)
    counts = [n for n, _ in counted]
    sizes = [0 if is_remote(u) else os.path.getsize(u) for u in urls]
    path = os.path.join(folder, INDEX_NAME)
    write_index(path, [ShardInfo(u, c, b) for u, c, b in zip(urls, counts, sizes)])
    return path


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.index:
        path = write_shard_index(args.index, args.out, args.workers, not args.no_progress)
        print(f"shard index written: {path}")
        return 0
    if not args.out:
        raise ConfigError("--out is required: the output folder of the shards")
    entry = dataset_entry(args)
    source = RetrievalSource(entry, args.rule) if args.kind == "retrieval" else PretrainSource(entry)
    opts = PackOptions(samples_per_shard=args.samples_per_shard, reencode=args.reencode, fps=args.fps,
                       height=args.size[0], width=args.size[1], crf=args.crf, kernel=args.resize_kernel,
                       backend=args.video_backend)
    summary = pack(source, args.out, opts, workers=args.workers, progress=not args.no_progress)
    print(summary.line())
    return 0
