"""Shared command-line plumbing: user errors become one line on stderr, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from .errors import ClipvipError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`ClipvipError` prints ``error: <message>`` and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except ClipvipError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
