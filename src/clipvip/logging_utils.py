"""The ``clipvip`` logger: INFO to stderr by default, a file handler added by the apps.

In a job of several processes (torchrun, accelerate, horovodrun) :func:`set_rank` makes the
processes other than rank 0 say only warnings and errors, each line naming its rank: otherwise
every INFO line of a run would be printed once per process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

LOGGER = logging.getLogger("clipvip")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONSOLE: logging.Handler | None = None  # the stderr handler installed below, if it was
_RANK = 0


def _install_default_handler() -> None:
    # Like transformers: the library's own logger talks at INFO unless the user configures it.
    global _CONSOLE
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(os.environ.get("CLIPVIP_LOG_LEVEL", "INFO").upper())
        LOGGER.propagate = False
        _CONSOLE = handler


_install_default_handler()


class _RankFilter(logging.Filter):
    """On a process other than rank 0: warnings and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RANK == 0 or record.levelno >= logging.WARNING


_RANK_FILTER = _RankFilter()


def set_rank(rank: int) -> None:
    """This process's rank in its job: rank 0 logs as usual; any other logs warnings and errors
    only, as ``... WARNING [rank 3] clipvip.train: ...``."""
    global _RANK
    _RANK = int(rank)
    if _CONSOLE is None:  # the user configured the logger: theirs to format
        return
    name = "%(name)s" if _RANK == 0 else f"[rank {_RANK}] %(name)s"
    _CONSOLE.setFormatter(logging.Formatter(_FORMAT.replace("%(name)s", name), "%H:%M:%S"))
    if _RANK_FILTER not in _CONSOLE.filters:
        _CONSOLE.addFilter(_RANK_FILTER)


def process_rank() -> int:
    """The rank :func:`set_rank` was told (0 before it was, or in a job of one process)."""
    return _RANK


def get_logger(name: str) -> logging.Logger:
    """A child of the ``clipvip`` logger (``clipvip.<name>``)."""
    return LOGGER.getChild(name.removeprefix("clipvip."))


def add_log_file(path: str) -> logging.Handler:
    """Also write the ``clipvip`` log to ``path`` (the run's ``log/log.txt``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    LOGGER.addHandler(handler)
    return handler


@contextlib.contextmanager
def log_file(path: str | None) -> Iterator[None]:
    """The ``clipvip`` log also goes to ``path`` inside the block (None: nowhere else)."""
    handler = add_log_file(path) if path else None
    try:
        yield
    finally:
        if handler is not None:
            LOGGER.removeHandler(handler)
            handler.close()


def write_to_log_file(path: str, logger: logging.Logger, level: int, message: str,
                      exc_info: BaseException | None = None) -> None:
    """Append one record of ``logger`` to the log file ``path`` alone, not to the console: the way
    a failure that the command line reports on stderr also ends up in the run's ``log/log.txt``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    try:
        exc = (type(exc_info), exc_info, exc_info.__traceback__) if exc_info is not None else None
        handler.handle(logger.makeRecord(logger.name, level, "", 0, message, (), exc))
    finally:
        handler.close()
