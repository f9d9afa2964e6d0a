"""``xlio cleanup``: remove the namespaces of runs whose owner died."""

from __future__ import annotations

import argparse
from typing import Any

from xlio.commands.common import (
    emit,
    tap_ready,
)

NAME = "cleanup"


def add_parser(sub: Any) -> None:
    cl = sub.add_parser(
        "cleanup", help="remove xlio- namespaces whose owner died (a run killed by SIGKILL)"
    )
    cl.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(a: argparse.Namespace) -> int:
    from xlio.backends.netns import reap_orphans

    tap_ready()
    removed = reap_orphans()
    return emit(
        a,
        {"removed": removed},
        lambda: (
            "\n".join(f"removed {n} (its owner is dead)" for n in removed)
            or "nothing to remove: every xlio- namespace has a live owner"
        ),
    )
