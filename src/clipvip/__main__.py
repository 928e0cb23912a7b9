"""``python -m clipvip <command>``: the project's command-line entry point."""
from __future__ import annotations

import difflib
import json
import platform
import sys
from typing import Sequence

from .cli import prog_name, run_main
from .errors import ClipvipError

USAGE = """usage: {prog} <command> [options]    ({prog} <command> --help for a command's options)
       {prog} --version

commands:
  config --config FILE [--key value ...]   print the resolved config (defaults <- file <- overrides)
  encode --config CFG --videos DIR --out OUT   video (or --texts) features, resumable
  index --config CFG --weights CKPT --videos DIR --out IDX   build (or --add to) a search index
  search IDX "query" [-k K] [--json]       search an index (--queries FILE, --like VIDEO)
  serve IDX [--port P]                     web page and JSON API over an index

training and evaluation: python -m clipvip.retrieval --help, python -m clipvip.pretrain --help
config keys: docs/config.md; a first run without data or weights: docs/first-run.md
"""


def _config(argv: Sequence[str]) -> int:
    from .cli import OVERRIDES_HELP, wants_help
    from .config import load_config

    if wants_help(argv):
        print(f"usage: {prog_name('clipvip')} config [--config FILE] [--key value ...]\n\n"
              f"Print the resolved config as JSON: defaults <- FILE <- command-line overrides.\n\n{OVERRIDES_HELP}")
        return 0
    print(json.dumps(load_config(None, argv).to_dict(), indent=2, sort_keys=True))
    return 0


def _search(name: str):
    def run(argv: Sequence[str]) -> int:
        from .search.cli import COMMANDS as SEARCH_COMMANDS

        return SEARCH_COMMANDS[name](argv)

    return run


COMMANDS = {"config": _config, **{name: _search(name) for name in ("encode", "index", "search", "serve")}}


def version() -> str:
    import torch
    import transformers

    from . import __version__

    return (f"clipvip {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()})")


def main(argv: Sequence[str]) -> int:
    prog = prog_name("clipvip")
    if not argv:
        print(USAGE.format(prog=prog), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE.format(prog=prog))
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    if argv[0] not in COMMANDS:
        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ClipvipError(f"unknown command '{argv[0]}'{hint}; commands: {', '.join(COMMANDS)} "
                           f"({prog} --help)")
    return COMMANDS[argv[0]](argv[1:])


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
