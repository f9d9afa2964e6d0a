"""The ``xlio`` command line: the parser assembled from the commands
(:mod:`xlio.commands`, each declaring its own arguments) and the dispatch.

A user's mistake (unknown name, bad number) is one line on stderr and exit
status 2; everything else lives in sans-IO modules. The process's entry
point, with its signal handling, is :mod:`xlio.__main__`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from xlio import __version__
from xlio.commands import COMMANDS
from xlio.measure import UsageError
from xlio.options import Parser

RUN = {c.NAME: c.run for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="xlio", description="Cross-layer paravirtual I/O for nested VMX")
    parser.add_argument("--version", action="version", version=f"xlio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = "xlio"
    try:
        a = build_parser().parse_args(argv)  # a stop while the parser is built is a stop too
        command = f"xlio {a.command}"
        return RUN[a.command](a)
    except UsageError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during a tap run
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `xlio ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
