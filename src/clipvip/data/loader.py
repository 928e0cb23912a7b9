"""DataLoaders for training and evaluation, and the multi-source mixer of pretraining.

Training (:func:`build_train_loader`): a ``DistributedSampler`` (also for one process, so that
``loader.sampler.set_epoch(epoch)`` reshuffles every epoch the same way everywhere), the last
incomplete batch dropped (contrastive losses want full batches, and every rank must run the same
number of steps), ``n_workers`` workers with persistent workers and prefetching, pinned memory
when ``pin_mem`` is set and CUDA is there.

Evaluation (:func:`build_eval_loader`): dataset order, never shuffled, never padded. With several
processes each rank reads ONE CONTIGUOUS block of the dataset (:class:`ContiguousShardSampler`;
block sizes differ by at most one, a rank may get none). Concatenating every rank's outputs in
rank order (``clipvip.distributed.all_gather_variable``) therefore gives the dataset order back,
and every batch also carries its dataset ``indices`` for evaluators that prefer to check or
scatter. Unlike the original's DistributedSampler, no sample is duplicated to even out ranks,
so no feature has to be trimmed.

Workers: :class:`WorkerInit` seeds ``random``, ``numpy`` and the dataset's own RNG in each worker
from torch's per-worker seed (derived from the loader's seeded generator, hence reproducible,
different per worker, per rank), and asks the dataset to drop handles it inherited (LMDB) so
the worker opens its own on first access.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from ..logging_utils import get_logger

LOGGER = get_logger(__name__)


def _rank_world(dist_env=None, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Rank and world size: explicit arguments, else ``dist_env``, else ``clipvip.distributed``."""
    if rank is not None or world_size is not None:
        return int(rank or 0), int(world_size or 1)
    if dist_env is None:
        from ..distributed import get_env

        dist_env = get_env()
    return int(dist_env.rank), int(dist_env.world_size)


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (seed, rank, ...), well mixed, the same everywhere."""
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


def _collate_fn(dataset: Dataset, collate_fn: Callable | None) -> Callable:
    if collate_fn is not None:
        return collate_fn
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        if getattr(candidate, "collator", None) is not None:
            return candidate.collator
    raise ValueError("no collate_fn given and the dataset has no collator (build it with a tokenizer)")


def _loader_kwargs(cfg: Mapping, n_workers: int | None, persistent: bool) -> dict:
    workers = int(cfg.get("n_workers", 0) if n_workers is None else n_workers)
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        # Pinned memory only helps host->GPU copies; without CUDA torch warns and ignores it.
        "pin_memory": bool(cfg.get("pin_mem", 0)) and torch.cuda.is_available(),
    }
    if workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=2, worker_init_fn=WorkerInit())
    return kwargs


def build_train_loader(dataset: Dataset, cfg: Mapping, dist_env=None, epoch_seed: int | None = None, *,
                       batch_size: int | None = None, collate_fn: Callable | None = None,
                       n_workers: int | None = None, rank: int | None = None,
                       world_size: int | None = None) -> DataLoader:
    """A shuffling, sharded training loader. Call ``loader.sampler.set_epoch(e)`` each epoch.

    ``epoch_seed`` (default ``cfg.seed``) seeds the shuffle, which is the same on every rank,
    and the workers' RNGs, which differ per rank and per worker.
    """
    rank, world = _rank_world(dist_env, rank, world_size)
    seed = int(cfg.get("seed", 42) if epoch_seed is None else epoch_seed)
    batch_size = int(batch_size or cfg.get("train_batch_size", 16))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    kwargs = _loader_kwargs(cfg, n_workers, persistent=True)
    if kwargs["num_workers"] == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(_derived_seed(seed, rank))  # the in-process RNG, distinct per rank
    generator = torch.Generator().manual_seed(_derived_seed(seed, rank, 1))
    # Drop the last short batch unless it is the only one (tiny sets in tests and demos).
    drop_last = len(sampler) >= batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=_collate_fn(dataset, collate_fn), generator=generator, **kwargs)


def build_eval_loader(dataset: Dataset, cfg: Mapping, dist_env=None, *, batch_size: int | None = None,
                      collate_fn: Callable | None = None, n_workers: int | None = None,
                      rank: int | None = None, world_size: int | None = None,
                      persistent_workers: bool = True) -> DataLoader:
    """An ordered, unpadded evaluation loader over this rank's contiguous block of ``dataset``.

    Pass a view (``dataset.video_view()`` / ``dataset.text_view()``) to iterate videos or texts.
    """
    rank, world = _rank_world(dist_env, rank, world_size)
    batch_size = int(batch_size or cfg.get("test_batch_size", 16))
    sampler = ContiguousShardSampler(len(dataset), rank, world)
    kwargs = _loader_kwargs(cfg, n_workers, persistent=persistent_workers)
    generator = torch.Generator().manual_seed(_derived_seed(int(cfg.get("seed", 42)), rank, 2))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                      collate_fn=_collate_fn(dataset, collate_fn), generator=generator, **kwargs)


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle a training loader for ``epoch`` (no-op for loaders without a sampler epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class MultiSourceLoader:
    """Mixes several training loaders by ratio, one source per step, the same on every rank.

    ``loaders``: ``{name: loader}`` or ``{name: (loader, ratio)}`` (ratio default 1, the
    dataset's ``ratio`` key). Iterating yields ``(name, batch)`` forever. The source of a step is
    a pure function of ``(seed, step // accum_steps)``, so every process draws the same source
    without communicating (the original broadcast rank 0's ``random.choice``), and a source keeps
    its turn across the micro-steps of one gradient accumulation. A source that runs out starts
    its next epoch (``set_epoch`` on its sampler) and goes on.
    """

    def __init__(self, loaders: Mapping[str, Any], seed: int = 0, accum_steps: int = 1,
                 start_step: int = 0, start_epoch: int = 0):
        if not loaders:
            raise ValueError("MultiSourceLoader needs at least one loader")
        self.names: list[str] = []
        self.loaders: dict[str, Any] = {}
        ratios = []
        for name, value in loaders.items():
            loader, ratio = value if isinstance(value, tuple) else (value, 1)
            if not ratio > 0:
                raise ValueError(f"source '{name}': ratio must be > 0, got {ratio}")
            self.names.append(name)
            self.loaders[name] = loader
            ratios.append(float(ratio))
        self.ratios = ratios
        self._cumulative = np.cumsum(ratios) / sum(ratios)
        self.seed = int(seed)
        self.accum_steps = max(1, int(accum_steps))
        self.step = int(start_step)  # micro-steps yielded so far (resume by passing it back)
        self.epochs = {name: int(start_epoch) for name in self.names}
        self._iters: dict[str, Iterator] = {}

    @property
    def batches_per_epoch(self) -> float:
        """``sum(len(dataset) * ratio / batch_size)`` over sources, as the original counted an epoch."""
        total = 0.0
        for name, ratio in zip(self.names, self.ratios):
            loader = self.loaders[name]
            dataset, bs = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
            total += (len(dataset) / bs if dataset is not None and bs else len(loader)) * ratio
        return total

    def source_at(self, step: int) -> str:
        """The source every rank uses at micro-step ``step``."""
        group = step // self.accum_steps
        u = np.random.default_rng([self.seed % (2 ** 32), group]).random()
        k = int(np.searchsorted(self._cumulative, u, side="right"))
        return self.names[min(k, len(self.names) - 1)]  # min(): guards u against rounding of the last sum

    def _next(self, name: str):
        if name not in self._iters:
            set_epoch(self.loaders[name], self.epochs[name])
            self._iters[name] = iter(self.loaders[name])
        try:
            return next(self._iters[name])
        except StopIteration:
            self.epochs[name] += 1
            set_epoch(self.loaders[name], self.epochs[name])
            self._iters[name] = iter(self.loaders[name])
            try:
                return next(self._iters[name])
            except StopIteration:
                raise RuntimeError(f"source '{name}' yields no batch (empty dataset or batch too large)") from None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            name = self.source_at(self.step)
            batch = self._next(name)
            self.step += 1
            yield name, batch
