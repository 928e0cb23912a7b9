"""Video search: encode a collection, index it with FAISS, query it in words or by example.

An application on top of the library (it never runs inside ``clipvip.model`` or ``clipvip.data``):

    from clipvip.apps.search import SearchEngine, index_videos, list_videos
    index_videos("my.idx", list_videos("videos/"), config="cfg.json", weights="model_best.pt")
    engine = SearchEngine.open("my.idx")          # the model that built it, loaded once
    engine.search_text("a red circle moves to the left", k=5)   # [{"id", "path", "score"}, ...]

FAISS (``faiss-cpu``) is optional: ``pip install 'clipvip[search]'``. The command-line front is
``clipvip encode | index | search | serve`` (:mod:`clipvip.apps.search.cli`); docs/search.md has the
details.
"""
from clipvip.apps.search.encode import Encoder, VideoItem, encode_to_folder, list_videos, read_features, read_video_list
from clipvip.apps.search.engine import IndexSummary, SearchEngine, check_compatible, index_videos
from clipvip.apps.search.errors import (CorruptIndexError, EmptyQueryError, FaissMissingError, IndexMismatchError,
                     IndexNotFoundError, SearchError)
from clipvip.apps.search.index import INDEX_KINDS, IndexSpec, VideoIndex

__all__ = [
    "Encoder", "VideoItem", "encode_to_folder", "list_videos", "read_features", "read_video_list",
    "IndexSummary", "SearchEngine", "check_compatible", "index_videos",
    "CorruptIndexError", "EmptyQueryError", "FaissMissingError", "IndexMismatchError", "IndexNotFoundError",
    "SearchError", "INDEX_KINDS", "IndexSpec", "VideoIndex",
]
