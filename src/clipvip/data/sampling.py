"""Which frames of a clip to decode (DESIGN §2): pure functions of the frame count and an RNG.

Two schemes, as in the original datasets:

* ``sample_rate == 0`` (every official config): ``n`` frames spread uniformly over the clip,
  ``np.linspace(start, end, n)`` truncated to int. At training time with jitter, ``start`` and
  ``end`` move by up to one sampling interval ``int(F / (n - 1))``.
* ``sample_rate > 0``: MMAction2's ``SampleFrames`` (``clip_len = num_frms``,
  ``frame_interval = sample_rate``, ``num_clips = n_clips``, out-of-bound indices looped).

Deliberate differences from the original, all in cases where it returns unusable indices:

* uniform jitter: ``start``/``end`` are clamped to ``[0, F-1]`` and ``end >= start`` is kept
  (with ``n == 2`` the original can draw ``start == F`` or ``end == -1``; with tiny ``F`` it can
  draw ``start > end`` and return the frames in reverse order);
* ``n == 1`` (a ZeroDivisionError there): frame 0, or a random frame with jitter;
* ``sample_rate > 0``: evaluation uses MMAction's deterministic test-mode offsets without
  per-frame jitter; the original always ran the training-mode random sampler with jitter, so
  its evaluation was not repeatable. At training, per-frame jitter follows ``jitter``
  (``sample_jitter`` in the configs).
"""
from __future__ import annotations

import random
from typing import Union

import numpy as np

RNG = Union[random.Random, np.random.Generator, np.random.RandomState, None]


def _randint(rng: RNG, low: int, high: int) -> int:
    """A uniform integer in ``[low, high]`` (both inclusive) from any supported RNG."""
    if high < low:
        raise ValueError(f"empty range [{low}, {high}]")
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    if isinstance(rng, np.random.RandomState):
        # NumPy's legacy RNG, what the original drew from (``np.random.randint``): its ``high`` is
        # exclusive, unlike ``random.randint``'s, so it must not fall through to the line below.
        return int(rng.randint(low, high + 1))
    # None: the global `random` module, which torch's DataLoader reseeds in every worker
    # (numpy's global RNG would give every worker the same draws).
    return (rng or random).randint(low, high)


def _randints(rng: RNG, high_exclusive: int, size: int) -> np.ndarray:
    """``size`` uniform integers in ``[0, high_exclusive)``."""
    if isinstance(rng, np.random.RandomState):
        # One vector draw, as the original's ``np.random.randint(high, size=size)``, so a
        # RandomState seeded like the original's global RNG gives its indices exactly.
        return rng.randint(high_exclusive, size=size).astype(np.int64)
    return np.array([_randint(rng, 0, high_exclusive - 1) for _ in range(size)], dtype=np.int64)


def _check(num_total: int, n_clips: int, num_frms: int, sample_rate: int) -> None:
    if num_total < 1:
        raise ValueError(f"num_total must be >= 1, got {num_total}")
    if n_clips < 1 or num_frms < 1:
        raise ValueError(f"n_clips and num_frms must be >= 1, got {n_clips} and {num_frms}")
    if sample_rate < 0:
        raise ValueError(f"sample_rate must be >= 0, got {sample_rate}")


def _uniform(num_total: int, n: int, training: bool, jitter: bool, rng: RNG) -> np.ndarray:
    last = num_total - 1
    if not (training and jitter):
        start, end = 0, last
    else:
        # The original's interval: the spacing of n frames over F, truncated.
        interval = int(num_total / (n - 1)) if n > 1 else last
        start = min(_randint(rng, 0, interval), last)
        end = max(_randint(rng, last - interval, last), 0)
        end = max(end, start)  # keep frames in time order (see the module docstring)
    # np.linspace + astype(int) exactly as the original, so the indices match it bit for bit
    # (truncation, not rounding: linspace(0, 15, 8) -> 0 2 4 6 8 10 12 15).
    return np.linspace(start, end, n).astype(np.int64)


def _mmaction_offsets(num_total: int, clip_len: int, interval: int, num_clips: int,
                      training: bool, rng: RNG) -> np.ndarray:
    span = clip_len * interval  # frames covered by one clip
    if not training:
        # Test mode: clips centred in num_clips equal segments, deterministic.
        avg = (num_total - span + 1) / float(num_clips)
        if num_total > span - 1:
            return (np.arange(num_clips) * avg + avg / 2.0).astype(np.int64)
        return np.zeros(num_clips, dtype=np.int64)
    avg = (num_total - span + 1) // num_clips
    if avg > 0:
        # One random offset inside each of num_clips equal segments.
        return np.arange(num_clips) * avg + _randints(rng, avg, num_clips)
    if num_total > max(num_clips, span):
        return np.sort(_randints(rng, num_total - span + 1, num_clips))
    if avg == 0:
        ratio = (num_total - span + 1.0) / num_clips
        return np.around(np.arange(num_clips) * ratio).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def _mmaction(num_total: int, n_clips: int, num_frms: int, sample_rate: int,
              training: bool, jitter: bool, rng: RNG) -> np.ndarray:
    offsets = _mmaction_offsets(num_total, num_frms, sample_rate, n_clips, training, rng)
    inds = offsets[:, None] + np.arange(num_frms)[None, :] * sample_rate  # (n_clips, num_frms)
    inds = inds.reshape(-1)
    if training and jitter:
        inds = inds + _randints(rng, sample_rate, inds.size)
    return np.mod(inds, num_total)  # out_of_bound_opt "loop"


def sample_frame_indices(num_total: int, n_clips: int, num_frms: int, sample_rate: int = 0,
                         training: bool = False, jitter: bool = False, rng: RNG = None) -> list[int]:
    """``n_clips * num_frms`` frame indices in ``[0, num_total)``, clip after clip.

    ``rng``: a ``random.Random``, a ``numpy.random.Generator``, a ``numpy.random.RandomState``
    (NumPy's legacy RNG: the same draws, in the same order, as the original's global
    ``np.random``), or None for the global ``random`` module. Evaluation (``training=False``)
    never draws from it.
    Clips shorter than ``n`` frames repeat frames; ``num_total == 1`` gives all zeros.
    """
    _check(num_total, n_clips, num_frms, sample_rate)
    if sample_rate == 0:
        inds = _uniform(num_total, n_clips * num_frms, training, jitter, rng)
    else:
        inds = _mmaction(num_total, n_clips, num_frms, sample_rate, training, jitter, rng)
    return [int(i) for i in inds]


def middle_frame_index(num_total: int) -> int:
    """The frame the "videoframe" format pairs with its caption: ``int(F / 2)`` as the original."""
    if num_total < 1:
        raise ValueError(f"num_total must be >= 1, got {num_total}")
    return num_total // 2
