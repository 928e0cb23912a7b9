"""Retrieval metrics: similarity, dual-softmax re-ranking, ranks and recalls (pure numpy).

Conventions (DESIGN §5):

- ``sim = T·Vᵀ`` [N_text, N_video]. Text-to-video ranks videos in the rows of ``sim``;
  video-to-text ranks texts in the rows of ``simᵀ``. A metric function always receives a
  ``[queries, gallery]`` matrix.
- Ranks are 1-based and **pessimistic**: rank = 1 + the number of non-target gallery items scoring
  at least as high as the target. Two identical videos therefore both get rank 2 — neither is
  credited. (The original counted each tied position as a separate rank entry.)
- Several acceptable targets for one query (a video with several captions, video-to-text): the
  query's rank is that of its best-scoring target, i.e. 1 + the number of *wrong* items scoring at
  least as high as the best target. This is the usual multi-caption rule (COCO/Flickr image-to-
  text: the first correct caption in the ranking); the original code only evaluated one caption
  per video (a square ``sim`` with targets on the diagonal), where both rules agree.
- DSL (dual softmax): ``sim ⊙ softmax(100·sim, axis=0)`` on ``sim = T·Vᵀ`` — the prior is
  normalised over the texts — and both directions are ranked on that one re-scored matrix (its
  transpose for video-to-text), exactly as the original evaluation does (DESIGN §5). It is
  transductive: a query's DSL scores depend on every other test query, so DSL numbers are
  reported apart from the plain ones.
- A video without a caption stays in the gallery of text-to-video and is no video-to-text query.
  So a query's plain rank depends only on its own score row, never on the order of the test items
  or on which other queries are there (tests/test_eval_protocol.py): the gallery of text-to-video
  is every test video, whatever captions are missing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RECALLS = (1, 5, 10)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def similarity_chunked(text_feats, video_feats, chunk: int = 4096) -> np.ndarray:
    """``text_feats [Nt, P] · video_feats [Nv, P]ᵀ`` -> float32 [Nt, Nv], ``chunk`` text rows at a time.

    Inputs are numpy arrays or torch tensors (any float dtype). Beyond the result only one
    ``[chunk, P]`` float32 slice of the texts and a float32 copy of the videos are held.
    """
    texts = _as_numpy(text_feats)
    videos = np.ascontiguousarray(_as_numpy(video_feats), dtype=np.float32).T  # [P, Nv]
    if texts.ndim != 2 or videos.ndim != 2 or texts.shape[1] != videos.shape[0]:
        raise ValueError(f"feature shapes do not match: texts {texts.shape}, videos {videos.T.shape}")
    sim = np.empty((texts.shape[0], videos.shape[1]), dtype=np.float32)
    for start in range(0, texts.shape[0], max(1, chunk)):
        stop = min(start + max(1, chunk), texts.shape[0])
        np.matmul(texts[start:stop].astype(np.float32, copy=False), videos, out=sim[start:stop])
    return sim


def dsl(sim, temperature: float = 100.0, axis: int = 0) -> np.ndarray:
    """Dual-softmax re-scoring: ``sim * softmax(temperature * sim, axis)`` (a new float32 array).

    ``axis=0`` is the query axis of a ``[queries, gallery]`` matrix (see the module docstring).
    Works in place in the result: one extra matrix of ``sim``'s size.
    """
    sim = _as_numpy(sim).astype(np.float32, copy=False)
    out = sim * np.float32(temperature)  # [Nq, Ng], the only new matrix
    out -= out.max(axis=axis, keepdims=True)  # stable softmax
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    out *= sim
    return out


def _normalise_targets(targets, n_queries: int) -> list[np.ndarray]:
    """One int64 array of acceptable gallery indices per query."""
    if isinstance(targets, np.ndarray) and targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        groups = [targets[i: i + 1] for i in range(len(targets))]
    else:
        groups = [np.atleast_1d(np.asarray(t, dtype=np.int64)) for t in targets]
    if len(groups) != n_queries:
        raise ValueError(f"{len(groups)} targets for {n_queries} queries")
    for i, group in enumerate(groups):
        if group.size == 0:
            raise ValueError(f"query {i} has no target")
    return [g.astype(np.int64, copy=False) for g in groups]


def retrieval_ranks(sim, targets, chunk: int = 4096) -> np.ndarray:
    """Pessimistic 1-based rank of each query's (best) target: int64 [Nq].

    ``sim`` [Nq, Ng]; ``targets``: per query a gallery index, or a sequence of acceptable indices.
    Works ``chunk`` queries at a time (one boolean [chunk, Ng] mask besides ``sim``).
    """
    sim = _as_numpy(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim should be [queries, gallery], got shape {sim.shape}")
    n_queries, n_gallery = sim.shape
    groups = _normalise_targets(targets, n_queries)
    for i, group in enumerate(groups):
        if group.min() < 0 or group.max() >= n_gallery:
            raise ValueError(f"query {i}: target {group.tolist()} outside a gallery of {n_gallery}")
    ranks = np.empty(n_queries, dtype=np.int64)
    step = max(1, chunk)
    for start in range(0, n_queries, step):
        stop = min(start + step, n_queries)
        block = sim[start:stop]  # [c, Ng]
        is_target = np.zeros(block.shape, dtype=bool)
        rows = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups[start:stop])])
        cols = np.concatenate(groups[start:stop])
        is_target[rows, cols] = True
        best = np.full(stop - start, -np.inf, dtype=np.float64)  # [c]: best target score per query
        np.maximum.at(best, rows, block[rows, cols])
        ranks[start:stop] = 1 + ((block >= best[:, None]) & ~is_target).sum(axis=1)
    return ranks


def metrics_from_ranks(ranks) -> dict[str, float]:
    """``{"R1", "R5", "R10"}`` in percent, ``"MdR"`` and ``"MnR"`` (1-based) from ranks [Nq]."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries to evaluate")
    out = {f"R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALLS}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sim, targets, chunk: int = 4096) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank for ``sim`` [Nq, Ng] and each query's target(s).

    ``targets``: per query the gallery index of its match, or a list of acceptable indices (the
    best-scoring one counts). Ties are pessimistic (module docstring).
    """
    return metrics_from_ranks(retrieval_ranks(sim, targets, chunk))


def video_to_text_targets(text_to_video: Sequence[int], n_videos: int) -> list[list[int]]:
    """For each video the indices of its captions (empty for a video without one), from each
    caption's video index."""
    groups: list[list[int]] = [[] for _ in range(n_videos)]
    for text_index, video_index in enumerate(text_to_video):
        if not 0 <= int(video_index) < n_videos:
            raise ValueError(f"text {text_index} points at video {video_index}; there are {n_videos}")
        groups[int(video_index)].append(text_index)
    return groups


def query_ranks(text_feats, video_feats, text_to_video: Sequence[int], chunk: int = 4096) -> dict[str, np.ndarray]:
    """Every query's pessimistic rank, both directions, plain and DSL, for features [Nt, P] and [Nv, P].

    ``text_to_video[i]`` is the index (row of ``video_feats``) of text i's video; each video may
    have several texts or none. ``"t2v"``, ``"t2v_dsl"``: int64 [Nt], one per text, against every
    video. ``"v2t"``, ``"v2t_dsl"``: one per video that has a caption, in video order
    (``np.unique(text_to_video)``), its best caption against every text.
    """
    sim = similarity_chunked(text_feats, video_feats, chunk)  # [Nt, Nv]
    t2v_targets = np.asarray(text_to_video, dtype=np.int64)
    if t2v_targets.shape != (sim.shape[0],):
        raise ValueError(f"text_to_video has {t2v_targets.size} entries for {sim.shape[0]} texts")
    groups = video_to_text_targets(t2v_targets, sim.shape[1])
    queries = np.flatnonzero([len(g) > 0 for g in groups])  # the videos with a caption
    v2t_targets = [groups[v] for v in queries]

    def v2t_rows(matrix):  # [Nv_queries, Nt]: a copy only where some video has no caption
        return matrix.T if len(queries) == sim.shape[1] else matrix.T[queries]

    # DSL: one re-scored matrix, prior over the texts, ranked both ways (module docstring).
    rescored = dsl(sim, axis=0)
    return {"t2v": retrieval_ranks(sim, t2v_targets, chunk), "v2t": retrieval_ranks(v2t_rows(sim), v2t_targets, chunk),
            "t2v_dsl": retrieval_ranks(rescored, t2v_targets, chunk),
            "v2t_dsl": retrieval_ranks(v2t_rows(rescored), v2t_targets, chunk)}


def evaluate_retrieval(text_feats, video_feats, text_to_video: Sequence[int],
                       chunk: int = 4096) -> dict[str, dict[str, float]]:
    """Both directions, plain and DSL, for features [Nt, P] and [Nv, P] (see :func:`query_ranks`).

    Every text is a t2v query; every video with a caption a v2t query (its best caption counts).
    Returns ``{"t2v": m, "v2t": m, "t2v_dsl": m, "v2t_dsl": m}`` with ``m`` as :func:`retrieval_metrics`.
    """
    return {direction: metrics_from_ranks(ranks)
            for direction, ranks in query_ranks(text_feats, video_feats, text_to_video, chunk).items()}
