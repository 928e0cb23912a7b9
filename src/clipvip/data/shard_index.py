"""The shard index: how many samples each WebDataset tar shard holds (``shards.json``).

A streamed epoch must know its length before it starts (every rank takes the same number of
steps, the schedule counts steps), and a tar stream says nothing about its length until it has
been read to the end. The index holds the per-shard counts:

    {"format": "clipvip.shards/1",
     "samples": 12345,
     "shards": [{"url": "00000.tar", "samples": 1000, "bytes": 734003200}, ...]}

``url`` is relative to the folder of the index file unless it is absolute or a URL
(``http://``, ``s3://`` ...). ``clipvip shard`` writes it beside the shards it packs; for shards
from another writer (video2dataset) the reader counts each shard once and writes the index
(:mod:`clipvip.data.shards`). Written atomically, so a reader never sees half an index.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

from clipvip.errors import DataError
from clipvip.files import atomic_write_json

INDEX_FORMAT = "clipvip.shards/1"
INDEX_NAME = "shards.json"  # the index's file name beside the shards


@dataclass(frozen=True)
class ShardInfo:
    url: str  # as written in the index: relative to the index's folder, absolute, or a URL
    samples: int  # complete samples (a key with its video member) in the shard
    bytes: int = 0  # size of the tar file; 0 where unknown (a stream)


def is_remote(url: str) -> bool:
    """A URL with a scheme other than ``file:`` (http, https, s3, gs, pipe)."""
    head = url.split(":", 1)[0]
    return ":" in url and len(head) > 1 and head.isalpha() and head != "file"


def resolve_url(url: str, folder: str) -> str:
    """``url`` of an index in ``folder`` as something the opener takes."""
    if is_remote(url) or os.path.isabs(url) or url.startswith("file:"):
        return url
    return os.path.join(folder, url)


def read_index(path: str) -> list[ShardInfo]:
    """The shards of the index at ``path`` (urls resolved against its folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read shard index {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"shard index {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(values, dict) or values.get("format") != INDEX_FORMAT or not isinstance(values.get("shards"), list):
        raise DataError(f"shard index {path}: not a {INDEX_FORMAT} index (needs 'format' and a 'shards' list)")
    folder = os.path.dirname(os.path.abspath(path))
    shards = []
    for i, item in enumerate(values["shards"]):
        if not (isinstance(item, dict) and isinstance(item.get("url"), str)
                and isinstance(item.get("samples"), int) and item["samples"] >= 0):
            raise DataError(f"shard index {path}: shards[{i}] needs a 'url' string and a 'samples' count >= 0")
        shards.append(ShardInfo(resolve_url(item["url"], folder), int(item["samples"]), int(item.get("bytes") or 0)))
    return shards


def write_index(path: str, shards: Iterable[ShardInfo]) -> None:
    """Write the index of ``shards`` to ``path``; local urls below its folder are stored relative."""
    folder = os.path.dirname(os.path.abspath(path))
    entries = []
    for shard in shards:
        url = shard.url
        if not is_remote(url) and not url.startswith("file:"):
            absolute = os.path.abspath(url)
            if os.path.commonpath([absolute, folder]) == folder:
                url = os.path.relpath(absolute, folder)
        entries.append({"url": url, "samples": int(shard.samples), "bytes": int(shard.bytes)})
    atomic_write_json(path, {"format": INDEX_FORMAT, "samples": sum(e["samples"] for e in entries),
                             "shards": entries})
