"""``xlio profile``: run a command natively and record its events per CPU second
(:mod:`xlio.profile`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xlio.commands.common import (
    envelope,
)
from xlio.measure import (
    UsageError,
)
from xlio.options import (
    writable_file,
)

NAME = "profile"


def add_parser(sub: Any) -> None:
    pf = sub.add_parser(
        "profile",
        help="run a command natively and record its paging, scheduling, timer and block "
        "events per CPU second",
    )
    pf.add_argument("-o", "--output", type=writable_file, default=None, metavar="FILE.toml",
                    help="write the profile here (default: stdout)")  # fmt: skip
    pf.add_argument("--no-perf", action="store_true", help="read only getrusage and /proc")
    pf.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pf.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")


def run(a: argparse.Namespace) -> int:
    from xlio.profile import CommandFailed, profile, to_toml

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    try:
        p = profile(cmd, use_perf=False if a.no_perf else None)
    except CommandFailed as e:
        raise UsageError(f"{e}; no profile written") from None
    text = to_toml(p)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
    if a.json:
        print(json.dumps(envelope("profile", p.as_dict()), indent=1))
    elif not a.output:
        sys.stdout.write(text)
    else:
        print(f"xlio profile: {a.output}: {p.run['cpu_seconds']:.2f} CPU s "
              f"({p.provenance['counters']})", file=sys.stderr)  # fmt: skip
    return 0
