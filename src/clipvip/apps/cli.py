"""Shared command-line plumbing: user errors become one line on stderr, never a traceback.

Also what the apps' ``--help`` texts have in common: the program name as the user typed it, the
``--key value`` override rules, and an argparse formatter that shows only defaults worth reading.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from clipvip.config import Config, load_config
from clipvip.errors import ClipvipError, ConfigError
from clipvip.logging_utils import process_rank

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# How any config key is set from the command line (clipvip.config._split_overrides), for the apps' help.
OVERRIDES_HELP = """\
Every key of the config is also an option: --key value, typed from its default (--learning_rate
1e-5, --is_train 0); a list takes several words (--input_res 224 224; one number means square),
a nested key a dot (--clip_vision_additional_config.add_cls_num 0), a path none to unset it
(--e2e_weights_path none). The command line wins over the file.
  all keys, their defaults and meaning:   docs/config.md
  the config a command line resolves to:  python -m clipvip config --config FILE [--key value ...]
  a first run without data or weights:    docs/first-run.md"""


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`ClipvipError` prints ``error: <message>`` and exits 2, Ctrl-C
    prints the interrupt's own message (training: where the state was saved) and exits 130.

    In a job of several processes the interrupt line comes from rank 0 alone, and an error of
    another rank names it (``error (rank 3): ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except ClipvipError as e:
        rank = process_rank()
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        if process_rank() == 0:
            print(str(e) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def prog_name(command: str | None = None) -> str:
    """The program as it was started: ``clipvip bench`` (console script) or ``python -m clipvip bench``.

    argparse's own default is the basename of ``sys.argv[0]``, which under ``python -m`` is the
    package's ``__main__.py``, a command that does not exist.
    """
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    base = "python -m clipvip" if not script or script.endswith(".py") or script in ("-m", "-c") else script
    return f"{base} {command}" if command else base


def wants_help(argv: Sequence[str]) -> bool:
    return any(word in ("-h", "--help") for word in argv)


def require_config(argv: Sequence[str], prog: str) -> None:
    """The training apps need a config file: defaults alone describe no data to train or evaluate on."""
    if not any(word == "--config" or word.startswith("--config=") for word in argv):
        raise ConfigError(f"--config is required: a JSON config file (the official ones are in configs/, "
                          f"small ones in configs/demo/); {prog} --help says more")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's own line breaks (layouts, examples) and appends
    ``(default: X)`` only where there is a default to read: not after None, False or a help text
    that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Identity, not ==: a default of 0 is worth showing, and 0 == False.
        if "%(default)" in text or "default:" in text or any(
                action.default is empty for empty in (None, False, argparse.SUPPRESS)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


def run_config_app(argv: Sequence[str], command: str, help_text: str, run: Callable[[Config], object],
                   implied: Sequence[str] = ()) -> int:
    """``main`` of the apps that run from a config (retrieval, pretrain): ``--help`` prints
    ``help_text`` (with ``{prog}`` and ``{overrides}`` filled in), ``--config`` is required, then
    ``run(load_config(None, [*implied, *argv]))``; ``implied`` words come first so that the
    command line can still override them."""
    prog = prog_name(command)
    if wants_help(argv):
        print(help_text.format(prog=prog, overrides=OVERRIDES_HELP))
        return 0
    require_config(argv, prog)
    run(load_config(None, [*implied, *argv]))
    return 0
