"""The ``clipvip`` logger: INFO to stderr by default, a file handler added by the apps."""
from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("clipvip")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _install_default_handler() -> None:
    # Like transformers: the library's own logger talks at INFO unless the user configures it.
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(os.environ.get("CLIPVIP_LOG_LEVEL", "INFO").upper())
        LOGGER.propagate = False


_install_default_handler()


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
