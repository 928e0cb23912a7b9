"""DataLoaders: resumable training streams, ordered evaluation loaders, the multi-source mixer.

Training (:class:`LoaderStream`): an endless stream of batches with a position
(``state_dict()``/``load_state_dict()``) so a resumed run sees exactly the batches an uninterrupted
run would have seen. :class:`ResumableSampler` shuffles by ``(seed, epoch)`` only, shards over
ranks like ``DistributedSampler`` (every rank runs the same number of full batches) and starts at
any batch without reading the ones before; every item comes with its own seed
``(seed, epoch, rank, position)`` from which the dataset draws its caption choice, frame jitter
and replacement picks (``dataset[(index, seed)]``), not from a worker's RNG stream whose state a
restart would lose. ``n_workers`` workers (-1: from the CPUs per process on this machine,
:func:`default_workers`), persistent (``persistent_workers``), each ``prefetch_factor`` batches
ahead; pinned memory when ``pin_mem`` is set and CUDA is there. Batches hold uint8 frames
(``video`` [B, T, H, W, 3]), made model input where the model is
(:class:`clipvip.data.transforms.VideoTransform`), and ``load_s``: the seconds the worker spent
producing the batch (the run's loader throughput, :class:`clipvip.engine.logger.Throughput`).
:class:`MixedStream` mixes several streams by ``ratio``, one source per optimizer step, the same
on every process (pretraining, as the original's MetaLoader).
Every loader takes its batch sizes, workers and seed from :class:`LoaderSettings`
(``LoaderSettings.from_config(cfg)``). On CUDA the trainer wraps the stream in
:class:`DevicePrefetcher`, which copies the next batch to the GPU on a side stream while the
current step computes (``prefetch_to_device``).

Evaluation (:func:`build_eval_loader`): dataset order, never shuffled, never padded. With several
processes each rank (given as a plain number: loaders know nothing of process groups) reads ONE
CONTIGUOUS block of the dataset (:class:`ContiguousShardSampler`; block sizes differ by at most
one, a rank may get none). Concatenating every rank's outputs in rank order (what
``clipvip.engine.encode`` does) therefore gives the dataset order back, and every batch also
carries its dataset ``indices`` for evaluators that prefer to check or scatter. Unlike the original's DistributedSampler, no sample is duplicated to even out ranks,
so no feature has to be trimmed.

Workers: :class:`WorkerInit` seeds ``random``, ``numpy`` and the dataset's own RNG in each worker
from torch's per-worker seed, and asks the dataset to drop handles it inherited (LMDB) so the
worker opens its own on first access.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from clipvip.distributed import local_world_size
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger(__name__)

# The batch entries the model reads (retrieval and pretraining); the rest stays on the host.
MODEL_INPUTS = ("video", "text_input_ids", "text_input_mask", "image", "caption_ids", "caption_masks")
# Those of them that hold frames: uint8 until the model's side transforms them (VideoTransform).
FRAME_INPUTS = ("video", "image")


@dataclass(frozen=True)
class LoaderSettings:
    """What every loader of a run shares: batch sizes, workers, pinned memory, the data-order seed.

    ``train_pair_field``: the record field naming a partner clip (``LoaderStream``), or "".
    """

    train_batch_size: int  # per process
    test_batch_size: int  # per process
    n_workers: int  # resolved: the config's, or default_workers() where it says -1
    pin_memory: bool  # asked for; used only where CUDA is there
    seed: int
    train_pair_field: str
    persistent_workers: bool = True  # training loaders keep their workers from epoch to epoch
    prefetch_factor: int = 2  # batches each worker prepares ahead
    workers_chosen: bool = False  # n_workers came from default_workers(): a reader may lower it (shards)

    def shared_by(self, loaders: int) -> "LoaderSettings":
        """The settings of one of ``loaders`` loaders that run side by side (pretraining's mixed
        sets): workers chosen from the CPUs (-1) are divided among them; a given count stays each's."""
        if not self.workers_chosen or loaders <= 1:
            return self
        return replace(self, n_workers=max(self.n_workers // loaders, 1))

    @classmethod
    def from_config(cls, cfg: Mapping) -> "LoaderSettings":
        asked = int(cfg.n_workers)
        if asked < -1:
            raise ConfigError(f"n_workers {asked}: give 0 or more workers, or -1 to choose from the CPUs")
        return cls(train_batch_size=int(cfg.train_batch_size), test_batch_size=int(cfg.test_batch_size),
                   n_workers=default_workers() if asked == -1 else asked, pin_memory=bool(cfg.pin_mem),
                   seed=int(cfg.seed), train_pair_field=str(cfg.train_pair_field or ""),
                   persistent_workers=bool(cfg.persistent_workers), prefetch_factor=max(int(cfg.prefetch_factor), 1),
                   workers_chosen=asked == -1)


def default_workers(cpus: int | None = None, processes: int | None = None) -> int:
    """DataLoader workers per process for ``n_workers: -1``: the CPUs this process may run on, shared
    by the training processes of this machine (one per GPU), less one each for the process itself
    (it runs the step, pins memory and feeds the GPU); at least 1.

    ``cpus``: default ``os.sched_getaffinity`` (what a container or ``taskset`` allows, not the
    machine's count); ``processes``: default the launcher's local world size
    (:func:`clipvip.distributed.local_world_size`). 16 cores and one GPU: 15 workers; 96 cores and
    8 GPUs: 11 per process.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(int(processes if processes is not None else local_world_size()), 1)
    return max(int(cpus) // processes - 1, 1)


def derived_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from several integers (seed, epoch, rank, ...); the same everywhere."""
    return int(np.random.SeedSequence([int(p) % (2 ** 32) for p in parts]).generate_state(1)[0])


class WorkerInit:
    """``worker_init_fn``: seed the worker, reset the dataset's per-worker state."""

    def __call__(self, worker_id: int) -> None:
        # torch gives every worker seed = base_seed + worker_id, base_seed drawn from the loader's
        # generator; the Python and numpy RNGs are ours to seed.
        seed = torch.initial_seed() % (2 ** 32)
        random.seed(seed)
        np.random.seed(seed)
        dataset = get_worker_info().dataset
        if hasattr(dataset, "init_worker"):
            dataset.init_worker(worker_id, seed)


class ContiguousShardSampler(Sampler[int]):
    """Indices ``[start, end)`` of this rank's contiguous block of ``range(n)``; no padding."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.start, self.end = shard_range(n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start

    def set_epoch(self, epoch: int) -> None:  # evaluation order never changes
        pass


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, end)`` of rank's block: blocks in rank order, sizes differing by at most one."""
    return rank * n // world_size, (rank + 1) * n // world_size


def collate_fn_for(dataset: Dataset, collate_fn: Callable | None) -> Callable:
    if collate_fn is not None:
        return collate_fn
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        if getattr(candidate, "collator", None) is not None:
            return candidate.collator
    raise ValueError("no collate_fn given and the dataset has no collator (build it with a tokenizer)")


def loader_kwargs(settings: LoaderSettings, n_workers: int | None, persistent: bool) -> dict:
    """DataLoader keywords: ``n_workers`` workers (None: the settings'), persistent or not."""
    workers = int(settings.n_workers if n_workers is None else n_workers)
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        # Pinned memory only helps host->GPU copies; without CUDA torch warns and ignores it. The
        # frames are uint8 at their decoded size: the pinned copy is a quarter of float32's bytes.
        "pin_memory": settings.pin_memory and torch.cuda.is_available(),
    }
    if workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=settings.prefetch_factor,
                      worker_init_fn=WorkerInit())
    return kwargs


def build_eval_loader(dataset: Dataset, settings: LoaderSettings, *, rank: int = 0, world_size: int = 1,
                      batch_size: int | None = None, collate_fn: Callable | None = None,
                      n_workers: int | None = None, persistent_workers: bool = True) -> DataLoader:
    """An ordered, unpadded evaluation loader over ``rank``'s contiguous block of ``dataset``.

    Pass a view (``dataset.video_view()`` / ``dataset.text_view()``) to iterate videos or texts.
    ``batch_size`` / ``n_workers``: None takes the settings' ``test_batch_size`` / ``n_workers``.
    """
    batch_size = int(batch_size or settings.test_batch_size)
    sampler = ContiguousShardSampler(len(dataset), rank, world_size)
    kwargs = loader_kwargs(settings, n_workers, persistent=persistent_workers)
    generator = torch.Generator().manual_seed(derived_seed(settings.seed, rank, 2))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                      collate_fn=collate_fn_for(dataset, collate_fn), generator=generator, **kwargs)


# ----------------------------------------------------------------------------------------------
# Training: endless, resumable streams of batches
# ----------------------------------------------------------------------------------------------
class ResumableSampler(Sampler):
    """Yields ``(index, seed)`` pairs of this rank's share of an epoch, from any batch on.

    Every rank gets ``ceil(n / world)`` positions of the epoch's permutation (the permutation is
    padded with its own head, as ``DistributedSampler`` does) and runs
    ``batches_per_epoch`` full batches of it, so all ranks take the same number of steps.

    ``partners`` (``train_pair_field``): for each index the index of its partner, or -1. Then the
    permutation shuffles *groups* (a partner pair, or a lone index), the groups are dealt to the
    ranks, and partners come out next to each other, so they share a batch (a batch boundary cuts
    at most one pair): each is the other's hard negative.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 partners: list[int] | None = None):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.groups = partner_groups(partners) if partners is not None else None
        self.per_rank = math.ceil(n / world_size)
        # Full batches only (contrastive batches should not shrink), but at least one.
        self.batches_per_epoch = max(self.per_rank // batch_size, 1)
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_indices(self, epoch: int) -> list[int]:
        if self.groups is not None:
            return self._rank_group_indices(epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch))).tolist()
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank::self.world_size]

    def _rank_group_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        shares: list[list[int]] = [[] for _ in range(self.world_size)]
        for g in order:  # each group to the rank holding the fewest indices so far (the same everywhere)
            min(shares, key=len).extend(self.groups[g])
        mine = shares[self.rank]
        # Shares may still differ by one: cut or pad (with its own head) to per_rank.
        return (mine * math.ceil(self.per_rank / max(len(mine), 1)))[:self.per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.rank_indices(self.epoch)
        end = min(self.batches_per_epoch * self.batch_size, len(indices))
        for position in range(self.start_batch * self.batch_size, end):
            yield indices[position], derived_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(min(self.batches_per_epoch * self.batch_size, self.per_rank) - self.start_batch * self.batch_size, 0)


def partner_groups(partners: list[int]) -> list[tuple[int, ...]]:
    """``[(i, partner), ..., (j,), ...]``: mutual partner pairs, and every other index alone."""
    groups: list[tuple[int, ...]] = []
    for i, j in enumerate(partners):
        if 0 <= j < len(partners) and j != i and partners[j] == i:
            if i < j:
                groups.append((i, j))
        else:
            groups.append((i,))
    return groups


class LoaderStream:
    """Batches of one dataset, epoch after epoch, without end.

    With ``train_pair_field`` set, the dataset's ``partners(field)`` (index of each item's partner
    or -1) makes the sampler keep partners in one batch (see :class:`ResumableSampler`).
    ``batch_size`` / ``seed``: None takes the settings' ``train_batch_size`` / ``seed``.
    """

    def __init__(self, dataset: Dataset, settings: LoaderSettings, rank: int, world_size: int, *,
                 batch_size: int | None = None, collate_fn: Callable | None = None, seed: int | None = None):
        self.dataset = dataset
        self.batch_size = int(batch_size or settings.train_batch_size)
        pair_field = settings.train_pair_field
        if pair_field and not hasattr(dataset, "partners"):
            raise ConfigError(f"train_pair_field '{pair_field}': {type(dataset).__name__} has no partners()")
        partners = dataset.partners(pair_field) if pair_field else None
        self.sampler = ResumableSampler(len(dataset), self.batch_size, settings.seed if seed is None else int(seed),
                                        rank, world_size, partners=partners)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=False,
                                 collate_fn=collate_fn_for(dataset, collate_fn),
                                 **loader_kwargs(settings, None, settings.persistent_workers))
        self.epoch, self.batch = 0, 0
        self._iterator = None

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    @property
    def workers(self) -> int:
        """Processes loading batches (the main process itself without workers)."""
        return max(self.loader.num_workers, 1)

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
    """Several training sets mixed by ``ratio``: one set per optimizer step, the same on every process.

    The set of optimizer step ``k`` (micro-batches ``k*accumulation ... (k+1)*accumulation - 1``)
    is drawn from a RNG seeded by ``(seed, k)``: every rank picks the same one without talking to
    the others (the original broadcast rank 0's choice), and a resumed run picks the same sequence.
    """

    def __init__(self, streams: Mapping[str, LoaderStream], ratios: Mapping[str, float], seed: int,
                 accumulation: int = 1):
        if not streams:
            raise ValueError("no training set")
        self.streams = dict(streams)
        self.names = list(self.streams)
        self.weights = [float(ratios[name]) for name in self.names]
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"training-set ratios must be >= 0 with a positive sum, got {self.weights}")
        self.seed = seed
        self.accumulation = max(int(accumulation), 1)
        self.micro = 0
        self.last_source = self.names[0]

    @property
    def epoch(self) -> int:
        return self.streams[self.names[0]].epoch

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.streams.values())

    @property
    def workers(self) -> int:
        """Every set's workers: each set's pool prepares its batches while another set is read."""
        return sum(s.workers for s in self.streams.values())

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> dict:
        self.last_source = self.source_at(self.micro)
        self.micro += 1
        batch = next(self.streams[self.last_source])
        batch["source"] = self.last_source
        return batch

    def source_at(self, micro: int) -> str:
        """The set every rank reads at micro-batch ``micro``."""
        rng = random.Random(derived_seed(self.seed, micro // self.accumulation, 7))
        return rng.choices(self.names, weights=self.weights)[0]

    def state_dict(self) -> dict:
        return {"micro": self.micro, "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.micro = int(state["micro"])
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)


def to_device(value, device: torch.device):
    """A tensor, or a list of tensors (frames of mixed sizes), on ``device`` (non-blocking: the
    copy of pinned memory does not wait for the host)."""
    if isinstance(value, (list, tuple)):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class DevicePrefetcher:
    """Copies the next batch to the GPU on a side stream while the current one is computed on.

    Wraps an iterator of batch dicts: a training stream (:class:`LoaderStream`,
    :class:`MixedStream`) or an evaluation loader. ``next()`` hands out a batch whose ``keys``
    tensors (or lists of tensors: frames of mixed sizes) are already on ``device`` and queues the
    copy of the following one on its own CUDA stream: the host-to-device transfer (uint8 frames at
    their decoded size: 2.8 MB per 12-frame 240x320 clip, against 7.2 MB of float32 input at
    224 px) runs on the copy engine beside the compute instead of ahead of it on the compute
    stream. The frames stay uint8: the step transforms them on the compute stream
    (:class:`clipvip.data.transforms.VideoTransform`), one micro-batch at a time. With pinned
    memory (``pin_mem``) the copy does not block the host either; the price is one more batch on
    the device (88 MB for 32 such clips). Other entries (``num_skipped``, ``indices``, ids,
    ``source``, ``load_s``) stay where they are: reading them must not wait for the device.

    For a stream with a position, ``state_dict()`` is the position after the batches handed out;
    the batch in flight is not counted, so a saved state resumes exactly where the uninterrupted
    run would continue (that batch is read again). On a device other than CUDA nothing is
    prefetched: the tensors are moved when handed out.
    """

    def __init__(self, batches, device: torch.device | str, keys: tuple[str, ...] = MODEL_INPUTS):
        # A stream is its own iterator (and keeps its position); a DataLoader gives a new one.
        self.stream = batches if hasattr(batches, "__next__") else iter(batches)
        self.device, self.keys = torch.device(device), tuple(keys)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: tuple[dict, Any] | None = None  # (batch being copied, stream position before it)
        self._exhausted = False

    @property
    def epoch(self) -> int:
        return self.stream.epoch  # may already count the batch in flight

    @property
    def num_examples(self) -> int:
        return self.stream.num_examples

    @property
    def workers(self) -> int:
        return self.stream.workers

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def _move(self, batch: dict) -> dict:
        return {k: to_device(v, self.device) if k in self.keys and _tensors(v) else v for k, v in batch.items()}

    def _fetch(self) -> tuple[dict, Any] | None:
        """The next batch with its copy queued, or None at the end of the batches."""
        position = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
        try:
            batch = next(self.stream)
        except StopIteration:
            self._exhausted = True
            return None
        with torch.cuda.stream(self.copy_stream):
            return self._move(batch), position

    def __next__(self) -> dict:
        if self.copy_stream is None:
            return self._move(next(self.stream))
        if self._ahead is None and not self._exhausted:
            self._ahead = self._fetch()
        if self._ahead is None:
            raise StopIteration
        batch = self._ahead[0]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)  # the compute stream waits for this batch's copy, the host does not
        for key in self.keys:
            for value in _tensors(batch.get(key)):
                if value.device.type == "cuda":
                    value.record_stream(compute)  # allocated on the copy stream, freed after the compute used it
        self._ahead = self._fetch()  # queued after the wait above: overlaps this batch's compute
        return batch

    def state_dict(self) -> dict:
        return self._ahead[1] if self._ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.stream.load_state_dict(state)
        self._ahead, self._exhausted = None, False
