"""Writing files so that a reader or a crash never sees half of one: write a sibling, then rename.

The one implementation behind every file this project writes for later reading (checkpoints and
training states, configs, results, tokenizer files, metrics logs, search indexes, converted model
folders). A reader sees the old file or the new one; a crash leaves at most a ``.tmp-<pid>-<name>``
sibling, which the next writer of that name removes.

Whoever writes the temporary file, what lands under the final name has the mode the process's
umask gives a new file (0644 under the usual 022), like a file opened for writing. Libraries
that write through a private temporary file of their own create it 0600 (safetensors' writer
does, so a converted folder's ``model.safetensors`` came out unreadable to the group while its
``config.json`` beside it did not).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import IO, Any, Callable, Iterator


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


def temporary_sibling(path: str) -> str:
    """The temporary name ``path`` is written under before the rename (same folder, same disk)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{os.getpid()}-{name}")


def current_umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way to read it is to set it: for a moment another thread's new file
    # would get mode 0666 & ~022, which is the usual mode anyway.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: str) -> None:
    """Give the regular file ``path`` the mode a file newly opened for writing gets (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write (by any means: a file, a database); on a
    normal exit it is flushed to disk, given the umask's mode and renamed over ``path``, on an
    error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_sibling(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        give_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(path: str, replace: bool = False) -> Iterator[str]:
    """Yield an empty temporary sibling folder of ``path`` to fill; on a normal exit every file in
    it gets the umask's mode, is flushed to disk, and the folder is renamed to ``path``; on an
    error it is removed and ``path`` is left as it was.

    ``path`` must not exist, or be an empty folder, unless ``replace``: then the folder there is
    moved aside only once the new one is complete, removed after the rename, and put back if the
    new one cannot take its place.
    """
    staging = temporary_sibling(path)
    previous = staging + ".previous"
    for leftover in (staging, previous):  # of an interrupted write by a process of the same pid
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        for root, _, names in os.walk(staging):
            for name in names:
                file = os.path.join(root, name)
                give_umask_mode(file)
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if replace and os.path.isdir(path) and os.listdir(path):
            os.replace(path, previous)
        elif os.path.isdir(path):
            os.rmdir(path)  # empty
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.isdir(previous) and not os.path.exists(path):
            os.replace(previous, path)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(binary_file)``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any, **dump_options: Any) -> None:
    """``obj`` as JSON (``json.dumps(obj, **dump_options)``) and a final newline, atomically."""
    atomic_write_text(path, json.dumps(obj, **dump_options) + "\n")
