"""``python -m clipvip <command>``: the project's command-line entry point."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from .cli import run_main

USAGE = """usage: python -m clipvip <command> [options]

commands:
  config --config FILE [--key value ...]   print the resolved config (defaults <- file <- overrides)
  encode --config CFG --videos DIR --out OUT   video (or --texts) features, resumable
  index --config CFG --weights CKPT --videos DIR --out IDX   build (or --add to) a search index
  search IDX "query" [-k K] [--json]       search an index (--queries FILE, --like VIDEO)
  serve IDX [--port P]                     web page and JSON API over an index
"""


def _config(argv: Sequence[str]) -> int:
    from .config import load_config

    print(json.dumps(load_config(None, argv).to_dict(), indent=2, sort_keys=True))
    return 0


def _search(name: str):
    def run(argv: Sequence[str]) -> int:
        from .search.cli import COMMANDS as SEARCH_COMMANDS

        return SEARCH_COMMANDS[name](argv)

    return run


COMMANDS = {"config": _config, **{name: _search(name) for name in ("encode", "index", "search", "serve")}}


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
