"""Endless, resumable streams of training batches.

A stream is an iterator of batch dicts that knows its position (``state_dict()``) and can be put
back there (``load_state_dict()``), so that a resumed run sees exactly the batches an
uninterrupted run would have seen. Two things make that exact:

- :class:`ResumableSampler` shuffles by ``(seed, epoch)`` only, shards over ranks like
  ``DistributedSampler`` and can start at any batch of an epoch without reading the ones before;
- every item comes with its own seed ``(seed, epoch, rank, position)``, from which the dataset
  draws its caption choice, frame jitter and replacement picks — not from a worker's RNG
  stream, whose state a restart would lose.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.loader import _collate_fn, _loader_kwargs


def item_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers; the same on every machine."""
    return int(np.random.SeedSequence([int(p) % (2 ** 32) for p in parts]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """Yields ``(index, seed)`` pairs of this rank's share of an epoch, from any batch on.

    Every rank gets ``ceil(n / world)`` positions of the epoch's permutation (the permutation is
    padded with its own head, as ``DistributedSampler`` does) and runs
    ``batches_per_epoch`` full batches of it, so all ranks take the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(n / world_size)
        # Full batches only (contrastive batches should not shrink), but at least one.
        self.batches_per_epoch = max(self.per_rank // batch_size, 1)
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_indices(self, epoch: int) -> list[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, epoch))).tolist()
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.rank_indices(self.epoch)
        end = min(self.batches_per_epoch * self.batch_size, len(indices))
        for position in range(self.start_batch * self.batch_size, end):
            yield indices[position], item_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(min(self.batches_per_epoch * self.batch_size, self.per_rank) - self.start_batch * self.batch_size, 0)


class LoaderStream:
    """Batches of one dataset, epoch after epoch, without end."""

    def __init__(self, dataset: Dataset, cfg: Mapping, rank: int, world_size: int, *, batch_size: int | None = None,
                 collate_fn: Callable | None = None, seed: int | None = None):
        self.dataset = dataset
        self.batch_size = int(batch_size or cfg.get("train_batch_size", 16))
        self.sampler = ResumableSampler(len(dataset), self.batch_size, int(cfg.get("seed", 42) if seed is None else seed),
                                        rank, world_size)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=False,
                                 collate_fn=_collate_fn(dataset, collate_fn), **_loader_kwargs(cfg, None, True))
        self.epoch, self.batch = 0, 0
        self._iterator = None

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> "LoaderStream":
        return self

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self.sampler.set_position(self.epoch, self.batch)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.batch, self._iterator = int(state["epoch"]), int(state["batch"]), None


class MixedStream:
    """Several training sets mixed by ``ratio``: one set per micro-batch, the same on every process.

    The set of micro-batch ``k`` is drawn from a RNG seeded by ``(seed, k)``, so every rank picks
    the same one without talking to the others, and a resumed run picks the same sequence.
    """

    def __init__(self, streams: Mapping[str, LoaderStream], ratios: Mapping[str, float], seed: int):
        if not streams:
            raise ValueError("no training set")
        self.streams = dict(streams)
        self.names = list(self.streams)
        self.weights = [float(ratios.get(name, 1)) for name in self.names]
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"training-set ratios must be >= 0 with a positive sum, got {self.weights}")
        self.seed = seed
        self.micro = 0
        self.last_source = self.names[0]

    @property
    def epoch(self) -> int:
        return self.streams[self.names[0]].epoch

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.streams.values())

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> dict:
        rng = random.Random(item_seed(self.seed, self.micro, 7))
        self.last_source = rng.choices(self.names, weights=self.weights)[0]
        self.micro += 1
        batch = next(self.streams[self.last_source])
        batch["source"] = self.last_source
        return batch

    def state_dict(self) -> dict:
        return {"micro": self.micro, "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.micro = int(state["micro"])
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
