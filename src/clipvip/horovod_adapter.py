"""Horovod behind the few calls :mod:`clipvip.distributed` makes: the only file importing horovod.

Horovod is optional (its PyPI release needs a patched build for torch >= 2.1, DESIGN §6), so it is
imported inside each function, never at module import. Nothing here carries autograd: the
gradient of the gathered features is handled by ``clipvip.distributed`` for every backend alike.
Horovod raises ``ValueError`` on a non-contiguous tensor (a transposed view, the expanded gradient
of a ``sum``), so every tensor is made contiguous before it is handed over.
"""
from __future__ import annotations

from typing import Any

import torch


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as err:  # a clear message instead of a bare ModuleNotFoundError
        raise ImportError(
            "backend 'horovod' needs horovod built with PyTorch support "
            "(HOROVOD_WITH_PYTORCH=1 pip install horovod); or launch with torchrun instead"
        ) from err
    return hvd


def init() -> tuple[int, int, int]:
    """``hvd.init()``; returns ``(rank, world_size, local_rank)``."""
    hvd = _hvd()
    hvd.init()
    return hvd.rank(), hvd.size(), hvd.local_rank()


def allgather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along dim 0 in rank order (first dims may differ)."""
    return _hvd().allgather(x.detach().contiguous())  # horovod refuses strided tensors


def allreduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A new tensor: the sum of ``x`` over ranks."""
    hvd = _hvd()
    return hvd.allreduce(x.detach().contiguous(), op=hvd.Sum)  # e.g. an expanded gradient


def broadcast_object(obj: Any, src: int = 0) -> Any:
    return _hvd().broadcast_object(obj, root_rank=src)


def allgather_object(obj: Any) -> list:
    return _hvd().allgather_object(obj)


def barrier() -> None:
    # An allreduce completes only once every rank has reached it: a barrier on any horovod version.
    allreduce_sum(torch.zeros(1))


def shutdown() -> None:
    _hvd().shutdown()
