"""File-system helpers of the search app: a NumPy array written atomically, and a writer lock."""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

import numpy as np

from clipvip.files import atomic_write


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


@contextlib.contextmanager
def writer_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` held while one process rewrites the folder.

    Two ``clipvip index --add`` runs on one index then take turns instead of one losing the
    other's videos. Readers take no lock: they only ever see complete, renamed files.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
