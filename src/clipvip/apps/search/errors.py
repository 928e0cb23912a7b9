"""Errors of the search app: each prints as one line through ``clipvip.apps.cli.run_main``."""
from __future__ import annotations

from clipvip.errors import ClipvipError


class SearchError(ClipvipError):
    """Base class of the search app's user errors."""


class FaissMissingError(SearchError):
    """The optional ``faiss`` package is not installed."""

    def __init__(self) -> None:
        super().__init__("video search needs FAISS, which is not installed: "
                         "pip install faiss-cpu (or pip install 'clipvip[search]'; faiss-gpu works too)")


class IndexNotFoundError(SearchError):
    """The index folder does not exist or holds no sidecar."""


class CorruptIndexError(SearchError):
    """The sidecar or the FAISS file cannot be read, or they disagree with each other."""


class IndexMismatchError(SearchError):
    """The model (or an encode folder) does not match the index: dimension or fingerprint."""


class EmptyQueryError(SearchError):
    """A text query is empty (or a queries file holds no query)."""
