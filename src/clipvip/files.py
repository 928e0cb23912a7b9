"""Writing files so that a reader or a crash never sees half of one: write a sibling, then rename.

The one implementation behind every file this project writes for later reading (checkpoints and
training states, configs, results, tokenizer files, metrics logs, search indexes). A reader sees
the old file or the new one; a crash leaves at most a ``.tmp-<pid>-<name>`` sibling, which the
next writer of that name removes.
"""
from __future__ import annotations

import contextlib
import json
import os
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


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write (by any means: a file, a database); on a
    normal exit it is flushed to disk and renamed over ``path``, on an error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_sibling(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(binary_file)``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str, obj: Any, **dump_options: Any) -> None:
    """``obj`` as JSON (``json.dumps(obj, **dump_options)``) and a final newline, atomically."""
    atomic_write_text(path, json.dumps(obj, **dump_options) + "\n")
