"""A video search index on disk: FAISS vectors plus a SQLite sidecar, replaced atomically.

Layout of an index folder ``IDX``:

    IDX/index.sqlite        the sidecar: table ``videos`` (row, id, path, duration) where ``row``
                            is the vector's position in the FAISS index, and table ``meta``: the
                            FAISS file's name, its type and parameters, the dimension, the config
                            that built it (JSON, paths absolute), the weights path, the model and
                            config fingerprints, versions, times
    IDX/vectors-<tag>.faiss the FAISS index (inner product of unit vectors = cosine similarity)
    IDX/skipped.tsv         path <TAB> reason of the videos the last build could not read
    IDX/.lock               taken by writers, so two ``--add`` runs take turns

Writing (a new index or ``--add``): the new FAISS file gets a new name and is renamed into
place complete; then a new sidecar, naming that file, is written beside the old one and renamed
over it. The rename of the sidecar is the commit: a reader (or a crash) sees the old sidecar
with the old vectors or the new sidecar with the new ones, never a mix. The old FAISS file is
deleted afterwards; a reader that opened the old sidecar a moment before retries once.

Index types (``IndexSpec.kind``):

* ``flat`` (default): exact search, ``IndexFlatIP``. Right up to a few hundred thousand clips
  (a query scans every vector: 1M x 512 floats is ~2 GB and ~0.1-0.3 s per query on a CPU).
* ``ivf``: ``IndexIVFFlat`` over an inner-product coarse quantiser, trained with k-means on the
  vectors of the first build. ``nlist`` lists (default ``4 * sqrt(N)``, at most N; FAISS wants
  about 39 training vectors per list); a query visits ``nprobe`` lists (default 16: more is
  slower and closer to exact). Videos added later go into the lists trained at first; rebuild
  when the collection has grown several times over.
* ``hnsw``: ``IndexHNSWFlat``, a graph with ``hnsw_m`` links per node (default 32: more is
  more memory and better recall), built with ``ef_construction`` (default 200) and searched
  with ``ef_search`` candidates (default 128, raised to k when k is larger). No training;
  adding is cheap; memory is the vectors plus ~``2 * hnsw_m`` ints per vector.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence
from urllib.request import pathname2url

import numpy as np

from clipvip.apps.search.errors import CorruptIndexError, FaissMissingError, IndexNotFoundError, SearchError
from clipvip.apps.search.storage import writer_lock
from clipvip.files import atomic_path, atomic_write, atomic_write_text

FORMAT_VERSION = 1
SIDECAR = "index.sqlite"
INDEX_KINDS = ("flat", "ivf", "hnsw")
REQUIRED_META = ("format_version", "faiss_file", "dim", "count", "spec", "config", "model_fingerprint",
                 "config_fingerprint")


def faiss_module():
    """``import faiss``, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise FaissMissingError() from None
    return faiss


@dataclass
class IndexSpec:
    """Which FAISS index to build and how to search it (module docstring)."""

    kind: str = "flat"
    nlist: int = 0          # ivf: number of lists; 0 = 4 * sqrt(N), at most N
    nprobe: int = 16        # ivf: lists visited per query
    hnsw_m: int = 32        # hnsw: links per node
    ef_construction: int = 200  # hnsw: candidates while building
    ef_search: int = 128    # hnsw: candidates while searching

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise SearchError(f"unknown index type '{self.kind}'; valid types: {', '.join(INDEX_KINDS)}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise SearchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.nlist) < 0:
            raise SearchError(f"nlist must be >= 0, got {self.nlist}")

    @classmethod
    def from_dict(cls, values: Mapping) -> "IndexSpec":
        known = {k: values[k] for k in asdict(cls()) if k in values}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


def build_faiss(spec: IndexSpec, vectors: np.ndarray):
    """A new FAISS index of ``spec`` holding ``vectors`` [N, D] (float32 unit vectors), rows in order."""
    faiss = faiss_module()
    n, dim = vectors.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(spec.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(spec.ef_construction)
    else:
        if n == 0:
            raise SearchError("an ivf index is trained on the videos of its first build: there are none")
        nlist = int(spec.nlist) or int(round(4 * math.sqrt(n)))
        nlist = max(1, min(nlist, n))
        spec.nlist = nlist
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)  # faiss's Python wrapper keeps `quantizer` alive with `index`
    if n:
        index.add(vectors)
    return index


def _set_search_params(index, spec: IndexSpec, k: int) -> None:
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None:
        ivf.nprobe = int(spec.nprobe)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(int(spec.ef_search), int(k))


@dataclass(frozen=True)
class Record:
    row: int
    id: str
    path: str
    duration: float | None


class VideoIndex:
    """An open index: the FAISS vectors in memory, the sidecar for ids and paths.

    Thread-safe: searches and look-ups may come from several threads (the HTTP server).
    """

    def __init__(self, path: str, meta: dict, index, conn: sqlite3.Connection):
        self.path = path
        self.meta = meta
        self.spec = IndexSpec.from_dict(meta["spec"])
        self.faiss_index = index
        self._conn = conn
        self._lock = threading.Lock()
        self._direct_map = False

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> "VideoIndex":
        """Open ``path`` (an index folder); a missing or corrupt index is a one-line error."""
        faiss = faiss_module()
        if not os.path.isdir(path):
            raise IndexNotFoundError(f"no index at {path} (build one with: clipvip index --config CFG "
                                     f"--weights CKPT --videos DIR --out {path})")
        sidecar = os.path.join(path, SIDECAR)
        if not os.path.isfile(sidecar):
            raise IndexNotFoundError(f"{path} is not a search index: it holds no {SIDECAR}")
        for attempt in range(2):
            conn, meta = _read_sidecar(sidecar)
            faiss_path = os.path.join(path, meta["faiss_file"])
            if os.path.isfile(faiss_path):
                break
            conn.close()
            if attempt == 0:  # a writer may have just replaced both: read the new sidecar
                time.sleep(0.2)
                continue
            raise CorruptIndexError(f"{path}: the sidecar names {meta['faiss_file']}, which is missing")
        try:
            index = faiss.read_index(faiss_path)
        except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with a C++ message
            conn.close()
            raise CorruptIndexError(f"{faiss_path}: cannot read the FAISS index: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if index.d != meta["dim"] or index.ntotal != meta["count"]:
            conn.close()
            raise CorruptIndexError(f"{path}: the FAISS file holds {index.ntotal} vectors of dimension {index.d}, "
                                    f"the sidecar lists {meta['count']} of dimension {meta['dim']}")
        return cls(path, meta, index, conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "VideoIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(args)).fetchall()
            except sqlite3.DatabaseError as e:
                raise CorruptIndexError(f"{self.path}: corrupt sidecar {SIDECAR}: {e}") from None

    def ids(self) -> set[str]:
        return {row[0] for row in self._query("SELECT id FROM videos")}

    def records(self, rows: Sequence[int]) -> dict[int, Record]:
        rows = [int(r) for r in rows]
        out: dict[int, Record] = {}
        for start in range(0, len(rows), 500):  # SQLite limits the number of parameters
            part = rows[start:start + 500]
            marks = ",".join("?" * len(part))
            for row, vid, path, duration in self._query(
                    f"SELECT row, id, path, duration FROM videos WHERE row IN ({marks})", part):
                out[row] = Record(row, vid, path, duration)
        return out

    def record(self, video_id: str) -> Record | None:
        found = self._query("SELECT row, id, path, duration FROM videos WHERE id = ?", [video_id])
        return Record(*found[0]) if found else None

    def vector(self, row: int) -> np.ndarray:
        """The stored unit vector [dim] at ``row``."""
        faiss = faiss_module()
        with self._lock:
            if not self._direct_map:  # IVF lists need a row -> list map to look a vector up
                ivf = faiss.try_extract_index_ivf(self.faiss_index) if hasattr(faiss, "try_extract_index_ivf") else None
                if ivf is not None:
                    ivf.make_direct_map()
                self._direct_map = True
            return np.asarray(self.faiss_index.reconstruct(int(row)), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, spec: IndexSpec | None = None) -> list[list[tuple[Record, float]]]:
        """The ``k`` best ``(record, score)`` per query vector of ``queries`` [Q, dim], best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(f"query vectors of shape {queries.shape} for an index of dimension {self.dim}")
        k = max(1, min(int(k), len(self)))
        if len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        with self._lock:
            _set_search_params(self.faiss_index, spec or self.spec, k)
            scores, rows = self.faiss_index.search(queries, k)  # [Q, k] each, best first
        records = self.records(sorted({int(r) for r in rows.ravel() if r >= 0}))
        return [[(records[int(r)], float(s)) for s, r in zip(score_row, row_row) if r >= 0]
                for score_row, row_row in zip(scores, rows)]


def _read_sidecar(sidecar: str) -> tuple[sqlite3.Connection, dict]:
    uri = f"file:{pathname2url(os.path.abspath(sidecar))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        conn.execute("SELECT row, id, path, duration FROM videos LIMIT 1").fetchall()
    except sqlite3.Error as e:
        raise CorruptIndexError(f"{sidecar}: corrupt sidecar: {e}") from None
    missing = [key for key in REQUIRED_META if key not in rows]
    if missing:
        conn.close()
        raise CorruptIndexError(f"{sidecar}: corrupt sidecar: no {', '.join(missing)} in its meta table")
    try:
        meta = {key: json.loads(value) for key, value in rows.items()}
    except (TypeError, json.JSONDecodeError) as e:
        conn.close()
        raise CorruptIndexError(f"{sidecar}: corrupt sidecar: a meta value is not JSON: {e}") from None
    if meta["format_version"] != FORMAT_VERSION:
        conn.close()
        raise CorruptIndexError(f"{sidecar}: index format {meta['format_version']} is not "
                                f"{FORMAT_VERSION}, the one this clipvip reads; rebuild the index")
    return conn, meta


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE videos (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, path TEXT NOT NULL,
                     duration REAL, added TEXT NOT NULL);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_index(path: str, vectors: np.ndarray, records: Sequence[tuple[str, str, float | None]],
                meta: Mapping, spec: IndexSpec, base: VideoIndex | None = None,
                skipped: Sequence[tuple[str, str]] = ()) -> int:
    """Write (``base`` None) or extend (``base``: the open index, read under :func:`index_writer`) an index.

    ``vectors`` [n, dim] and ``records`` (id, path, duration) are the new videos, in order;
    ``meta``: the model description (config, weights, fingerprints, dim). Returns the new count.
    The caller holds :func:`index_writer` for ``path``.
    """
    faiss = faiss_module()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(records), -1) if len(records) else \
        np.zeros((0, int(meta["dim"])), np.float32)
    if base is None:
        index = build_faiss(spec, vectors)
        start = 0
    else:
        index = base.faiss_index
        start = index.ntotal
        if len(records):
            index.add(vectors)
    tag = uuid.uuid4().hex[:12]
    faiss_file = f"vectors-{tag}.faiss"
    os.makedirs(path, exist_ok=True)
    data = faiss.serialize_index(index)  # uint8 numpy array
    atomic_write(os.path.join(path, faiss_file), lambda f: f.write(memoryview(data)))

    sidecar = os.path.join(path, SIDECAR)
    with atomic_path(sidecar) as tmp:  # the rename of the sidecar is the commit
        if base is not None:
            shutil.copyfile(sidecar, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as conn:
            if base is None:
                conn.executescript(_SCHEMA)
            now = _now()
            conn.executemany("INSERT INTO videos (row, id, path, duration, added) VALUES (?, ?, ?, ?, ?)",
                             [(start + k, vid, vpath, dur, now) for k, (vid, vpath, dur) in enumerate(records)])
            values = dict(meta)
            values.update(format_version=FORMAT_VERSION, faiss_file=faiss_file, count=int(index.ntotal),
                          spec=spec.to_dict(), updated=now, faiss_version=getattr(faiss, "__version__", ""))
            if base is None:
                values["created"] = now
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])
            conn.commit()
    write_skipped(path, skipped)
    _remove_unreferenced(path, keep=faiss_file)
    return int(index.ntotal)


def write_skipped(path: str, skipped: Sequence[tuple[str, str]]) -> None:
    """``IDX/skipped.tsv``: the videos the last build could not read, with the reason."""
    atomic_write_text(os.path.join(path, "skipped.tsv"),
                      "".join(f"{p}\t{' '.join(str(r).split())}\n" for p, r in skipped))


def remove_strays(path: str) -> None:
    """Remove what an interrupted write left in index folder ``path``: FAISS files its sidecar
    does not name, temporary files. The caller holds :func:`index_writer`; an unreadable sidecar
    leaves everything as it is."""
    try:
        conn, meta = _read_sidecar(os.path.join(path, SIDECAR))
    except SearchError:
        return
    conn.close()
    _remove_unreferenced(path, keep=meta["faiss_file"])


def _remove_unreferenced(path: str, keep: str) -> None:
    for name in os.listdir(path):
        stale = (name.startswith("vectors-") and name.endswith(".faiss") and name != keep) or name.startswith(".tmp-")
        if stale:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, name))


def index_writer(path: str):
    """The lock a writer of index ``path`` holds from reading the old index to the commit."""
    return writer_lock(path)
