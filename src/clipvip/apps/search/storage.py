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
    path = os.path.join(folder, ".lock")
    while True:
        os.makedirs(folder, exist_ok=True)
        f = open(path, "a+b")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        # A writer whose build failed removes what it made, its .lock (and folder) too: a process
        # that waited on that file holds a lock nobody else sees, so it takes the lock again.
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
