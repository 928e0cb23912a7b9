"""Small file-system helpers of the search app: atomic writes and a writer lock."""
from __future__ import annotations

import contextlib
import io
import os
from typing import Callable, Iterator

import numpy as np


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, then rename it into place.

    A reader sees the old file or the new one, never half of one; a crash leaves at most a
    ``.tmp-*`` file behind, which the next writer ignores.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


@contextlib.contextmanager
def writer_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` held while one process rewrites the folder.

    Two ``clipvip index --add`` runs on one index then take turns instead of one losing the
    other's videos. Readers take no lock: they only ever see complete, renamed files.
    """
    import fcntl

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
