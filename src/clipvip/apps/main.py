"""``python -m clipvip <command>``: every app behind one command (``clipvip/__main__.py`` calls it).

A command's module is imported (by name, through importlib) when the command runs, so
``clipvip search`` does not pay for the training apps' imports (torch.distributed, the loaders).
"""
from __future__ import annotations

import difflib
import importlib
import json
import platform
import sys
from typing import Callable, Sequence

import torch
import transformers

from clipvip import __version__
from clipvip.apps.cli import OVERRIDES_HELP, prog_name, run_main, wants_help
from clipvip.config import load_config
from clipvip.errors import ClipvipError

USAGE = """usage: {prog} <command> [options]    ({prog} <command> --help for a command's options)
       {prog} --version

training and evaluation:
  retrieval --config FILE [--is_train] [--key value ...]   fine-tune or evaluate text-to-video retrieval
  pretrain --config FILE [--key value ...]   post-pretrain with Omnisource Cross-modal Learning
  config --config FILE [--key value ...]     print the resolved config (defaults <- file <- overrides)
search:
  encode --config CFG --videos DIR --out OUT   video (or --texts) features, resumable
  index --config CFG --weights CKPT --videos DIR --out IDX   build (or --add to) a search index
  search IDX "query" [-k K] [--json]         search an index (--queries FILE, --like VIDEO)
  serve IDX [--port P]                       web page and JSON API over an index
tools:
  bench [--mode encode|train|both|data|e2e]  throughput and peak memory, one JSON object on stdout
  demo [--out DIR] [--quick]                 fine-tune and evaluate on a synthetic benchmark, no downloads
  synthetic --out DIR                        draw that synthetic benchmark (videos and annotations)
  shard --out DIR --txt ANN --vis VIDEOS     pack a dataset into WebDataset tar shards (docs/shards.md)
  convert --config CFG --weights CKPT --out DIR   a checkpoint as a Hugging Face model folder (docs/hf.md)

config keys: docs/config.md; a first run without data or weights: docs/first-run.md
"""


def _config(argv: Sequence[str]) -> int:
    if wants_help(argv):
        print(f"usage: {prog_name('config')} [--config FILE] [--key value ...]\n\n"
              f"Print the resolved config as JSON: defaults <- FILE <- command-line overrides.\n\n{OVERRIDES_HELP}")
        return 0
    print(json.dumps(load_config(None, argv).to_dict(), indent=2, sort_keys=True))
    return 0


def _app(module: str, function: str = "main") -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    return run


def _search(name: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        return importlib.import_module("clipvip.apps.search.cli").COMMANDS[name](argv)

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "retrieval": _app("clipvip.apps.retrieval"),
    "pretrain": _app("clipvip.apps.pretrain"),
    "config": _config,
    **{name: _search(name) for name in ("encode", "index", "search", "serve")},
    "bench": _app("clipvip.apps.bench"),
    "demo": _app("clipvip.apps.demo"),
    "synthetic": _app("clipvip.apps.synthetic"),
    "shard": _app("clipvip.apps.shard"),
    "convert": _app("clipvip.apps.convert"),
}


def version() -> str:
    return (f"clipvip {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()})")


def main(argv: Sequence[str]) -> int:
    prog = prog_name()
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
