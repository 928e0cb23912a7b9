"""Tiny WebDataset shards written with the standard tarfile module, in video2dataset's member naming."""
from __future__ import annotations

import io
import json
import os
import tarfile


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(out: str, samples: list[dict], sizes: list[int]) -> list[str]:
    """``samples``: ``{"clip_id", "video": path, "captions": [...]}``; ``sizes``: samples per shard.

    Shard k is ``out/{k:05d}.tar``; sample i of it has key ``f"{k:05d}{i:04d}"`` and members
    ``KEY.mp4``, ``KEY.txt`` (first caption) and ``KEY.json`` (``{"key", "clip_id", "captions"}``).
    Returns the shard paths. No index is written (see write_index).
    """
    assert sum(sizes) <= len(samples)
    os.makedirs(out, exist_ok=True)
    paths, it = [], iter(samples)
    for k, size in enumerate(sizes):
        path = os.path.join(out, f"{k:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(size):
                sample = next(it)
                key = f"{k:05d}{i:04d}"
                with open(sample["video"], "rb") as f:
                    add_member(tar, f"{key}.mp4", f.read())
                add_member(tar, f"{key}.txt", sample["captions"][0].encode())
                meta = {"key": key, "clip_id": sample["clip_id"], "captions": sample["captions"]}
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def synthetic_samples(paths: dict) -> list[dict]:
    """The synthetic benchmark's training clips (``clipvip.apps.synthetic.generate``'s paths) as samples."""
    samples = []
    with open(paths["train"]) as f:
        for line in f:
            record = json.loads(line)
            captions = record["text"] if isinstance(record["text"], list) else [record["text"]]
            samples.append({"clip_id": record["clip_id"], "captions": captions,
                            "video": os.path.join(paths["videos"], record["clip_id"] + ".mp4")})
    return samples
