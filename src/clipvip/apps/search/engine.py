"""An open index with the model that built it: text-to-video and video-to-video queries.

The sidecar remembers the resolved config and the weights that built the index, so
``SearchEngine.open(IDX)`` needs nothing else; ``config`` / ``weights`` override them (files
moved to another machine). Either way the model must be the one that built the index: the
feature dimension, the weights' fingerprint and the config's fingerprint are checked, and a
mismatch is an :class:`IndexMismatchError` rather than silently meaningless scores.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from clipvip import __version__
from clipvip.data.sampling import middle_frame_index
from clipvip.data.video import load_sampled_frames
from clipvip.apps.search.encode import Encoder, VideoItem, probe_videos, resolve_config
from clipvip.apps.search.errors import EmptyQueryError, IndexMismatchError, SearchError
from clipvip.apps.search.index import (SIDECAR, IndexSpec, VideoIndex, index_writer, remove_strays, write_index,
                                       write_skipped)

THUMBNAIL_WIDTH = 320
THUMBNAIL_CACHE = 1024


def check_compatible(index: VideoIndex, encoder: Encoder) -> None:
    """Raise :class:`IndexMismatchError` unless ``encoder`` is the model that built ``index``."""
    meta, name = index.meta, index.path
    if encoder.dim != index.dim:
        raise IndexMismatchError(f"the model gives {encoder.dim}-dimensional features but {name} holds "
                                 f"{index.dim}-dimensional vectors: use the model that built the index")
    if encoder.model_fingerprint != meta["model_fingerprint"]:
        raise IndexMismatchError(
            f"the model's weights are not those that built {name} (fingerprint "
            f"{encoder.model_fingerprint[:12]} != {meta['model_fingerprint'][:12]}); use the weights it was "
            f"built with ({meta.get('weights_path') or 'see its sidecar'}) or rebuild the index")
    if encoder.config_fingerprint != meta["config_fingerprint"]:
        raise IndexMismatchError(
            f"the config reads videos or text differently from the one that built {name} (fingerprint "
            f"{encoder.config_fingerprint[:12]} != {meta['config_fingerprint'][:12]}: test_n_clips, "
            "test_num_frms, sample_rate, input_res, max_txt_len or the vision settings differ)")


def _hit(record, score: float) -> dict:
    return {"id": record.id, "path": record.path, "score": score}


class SearchEngine:
    """Queries against one index; safe to share between threads (one model call at a time)."""

    def __init__(self, index: VideoIndex, encoder: Encoder, spec: IndexSpec | None = None):
        check_compatible(index, encoder)
        self.index = index
        self.encoder = encoder
        self.spec = spec or index.spec
        # One lock around the model: torch modules are not made for concurrent forward calls
        # from several threads, and a CPU model already uses every core for one query.
        self._model_lock = threading.Lock()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, config: str | None = None, weights: str | None = None,
             overrides: Sequence[str] = (), device: str | None = None,
             nprobe: int | None = None, ef_search: int | None = None) -> "SearchEngine":
        """Open index ``path`` and load its model once (the stored config/weights unless overridden)."""
        index = VideoIndex.open(path)
        try:
            stored = index.meta["config"]
            cfg = resolve_config(config if config else stored, weights or index.meta.get("weights_path"),
                                 overrides)
            ckpt = cfg.e2e_weights_path
            if ckpt and not os.path.exists(ckpt):
                raise SearchError(f"the weights {ckpt} that built {path} are not there; pass --weights CKPT "
                                  "(and --config CFG if the config moved too)")
            encoder = Encoder(cfg, device)
            spec = IndexSpec.from_dict({**index.spec.to_dict(),
                                        **({"nprobe": nprobe} if nprobe else {}),
                                        **({"ef_search": ef_search} if ef_search else {})})
            return cls(index, encoder, spec)
        except BaseException:
            index.close()
            raise

    def close(self) -> None:
        self.index.close()

    # -- queries ----------------------------------------------------------------------------
    def _check_k(self, k: int) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise SearchError(f"k must be a whole number, got {k!r}") from None
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        return k

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        texts = [str(q).strip() for q in queries]
        if not texts or any(not t for t in texts):
            raise EmptyQueryError("empty query: describe the video you are looking for in a few words")
        with self._model_lock:
            return self.encoder.encode_texts(texts)

    def search_texts(self, queries: Sequence[str], k: int = 10) -> list[list[dict]]:
        """For each query the ``k`` best ``{"id", "path", "score"}``, best first."""
        k = self._check_k(k)
        vectors = self.encode_queries(queries)  # [Q, dim]
        return [[_hit(r, s) for r, s in hits] for hits in self.index.search(vectors, k, self.spec)]

    def search_text(self, query: str, k: int = 10) -> list[dict]:
        return self.search_texts([query], k)[0]

    def like_vector(self, video: str) -> np.ndarray:
        """The vector of ``video``: a video file (encoded now) or the id of an indexed video."""
        if os.path.isfile(video):
            with self._model_lock:
                return self.encoder.encode_video_file(video)
        record = self.index.record(video)
        if record is None:
            raise SearchError(f"--like {video}: neither a video file nor the id of a video in {self.index.path}")
        return self.index.vector(record.row)

    def search_like(self, video: str, k: int = 10) -> list[dict]:
        """The ``k`` videos closest to ``video`` (itself first when it is in the index)."""
        k = self._check_k(k)
        vector = self.like_vector(video)[None]  # [1, dim]
        return [_hit(r, s) for r, s in self.index.search(vector, k, self.spec)[0]]

    # -- for the web page -------------------------------------------------------------------
    def thumbnail(self, video_id: str, width: int = THUMBNAIL_WIDTH) -> bytes | None:
        """JPEG of the middle frame of an indexed video (None for an unknown id); cached."""
        with self._thumb_lock:
            if video_id in self._thumbs:
                self._thumbs.move_to_end(video_id)
                return self._thumbs[video_id]
        record = self.index.record(video_id)
        if record is None:
            return None
        from PIL import Image

        frames, _ = load_sampled_frames(record.path, lambda n: [middle_frame_index(n)],
                                        backend=self.encoder.reader.backend)  # (1, H, W, 3) uint8
        image = Image.fromarray(frames[0].numpy())
        image.thumbnail((width, width))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[video_id] = data
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return data


# ---------------------------------------------------------------------------------------------
# Building and extending an index
# ---------------------------------------------------------------------------------------------
@dataclass
class IndexSummary:
    added: int          # videos encoded and added by this run
    already: int        # videos of the folder already in the index (``--add``)
    skipped: list       # (path, reason) of the videos that could not be read
    total: int          # vectors in the index afterwards


@contextlib.contextmanager
def _undone_on_failure(path: str, existed: bool, before: set[str]) -> Iterator[None]:
    """A build that fails leaves ``path`` as it found it (``existed``, holding ``before``).

    Where there is an index (the one there before, or a new one committed just before the
    failure) only the strays of the unfinished write go; elsewhere the folder this build made is
    removed, or, in a folder that was there, what this build put in it.
    """
    try:
        yield
    except BaseException:
        if os.path.isfile(os.path.join(path, SIDECAR)):
            remove_strays(path)
        elif not existed:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for name in set(os.listdir(path)) - before:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, name))
        raise


def index_videos(path: str, videos: Sequence[VideoItem], *, config: str | None = None,
                 weights: str | None = None, overrides: Sequence[str] = (), add: bool = False,
                 overwrite: bool = False, spec: IndexSpec | None = None, batch_size: int | None = None,
                 workers: int = 0, device: str | None = None) -> IndexSummary:
    """``clipvip index``: encode ``videos`` and write index ``path`` (or append to it with ``add``).

    With ``add`` the config and weights default to those stored in the index, videos whose id
    is already there are skipped, and the model must match the index. Unreadable videos are
    skipped and listed (``IDX/skipped.tsv``), never fatal. The inputs are checked before the
    model loads: the config, then each new video's header (:func:`probe_videos`), so a folder of
    nothing readable is an error in milliseconds. A failed build leaves no trace (no folder holding
    only ``.lock``); an index that was there stays as it was.
    """
    existed = os.path.isdir(path)
    before = set(os.listdir(path)) if existed else set()
    with index_writer(path), _undone_on_failure(path, existed, before):
        exists = os.path.isfile(os.path.join(path, SIDECAR))
        if exists and not (add or overwrite):
            raise SearchError(f"{path} already holds an index: --add appends new videos, --overwrite rebuilds it")
        base = VideoIndex.open(path) if (add and exists) else None
        try:
            if base is not None:
                cfg = resolve_config(config or base.meta["config"], weights or base.meta.get("weights_path"),
                                     overrides)
                spec = base.spec
                present = base.ids()
            else:
                if not config:
                    raise SearchError("--config is needed to build a new index")
                cfg = resolve_config(config, weights, overrides)
                spec = spec or IndexSpec()
                present = set()
            todo, unreadable = probe_videos([v for v in videos if v.id not in present])
            skipped = [(v.path, reason) for v, reason in unreadable]
            if base is None and not todo:
                _no_readable_video(videos, skipped)
            vectors, records = [], []
            if todo:
                encoder = Encoder(cfg, device)
                if base is not None:
                    check_compatible(base, encoder)
                for batch in encoder.iter_videos(todo, batch_size, workers):
                    vectors.append(batch.features)
                    records += [(v.id, v.path, d) for v, d in zip(batch.items, batch.durations)]
                    skipped += [(v.path, reason) for v, reason in batch.failed]
                if base is None and not records:
                    _no_readable_video(videos, skipped)
            if base is not None and not records:  # nothing new: leave the index files as they are
                total = len(base)
                write_skipped(path, skipped)
            else:
                meta = {"config": cfg.to_dict(), "config_path": cfg.config,
                        "weights_path": cfg.e2e_weights_path, **encoder.describe(),
                        "clipvip_version": __version__}
                total = write_index(path, np.concatenate(vectors), records, meta, spec, base, skipped)
        finally:
            if base is not None:
                base.close()
    already = len(videos) - len(todo) - len(unreadable)
    return IndexSummary(added=len(records), already=already, skipped=skipped, total=total)


def _no_readable_video(videos: Sequence[VideoItem], skipped: Sequence[tuple[str, str]]) -> None:
    first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    raise SearchError(f"no readable video to index: {len(videos)} found, {len(skipped)} unreadable{first}")
