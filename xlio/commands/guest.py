"""``xlio guest``: a real Linux guest under QEMU whose NIC ``xlio serve --vhost-user`` serves."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xlio.measure import UsageError
from xlio.options import command_text, existing_socket, seconds_in

NAME = "guest"


def add_parser(sub: Any) -> None:
    g = sub.add_parser(
        "guest",
        help="boot a real Linux guest (QEMU, TCG) on a vhost-user socket and run a command",
        description="Boots Debian's kernel with a busybox initramfs (built once, cached in "
        "~/.cache/xlio/guest) under QEMU's TCG; its virtio-net NIC is served over vhost-user "
        "by `xlio serve --vhost-user SOCKET`. The guest brings eth0 up at 198.18.0.2/24, runs "
        "CMD in busybox's shell, prints its output and powers off; the exit status is CMD's "
        "(124 on a timeout).",
    )
    g.add_argument(
        "--vhost-user",
        required=True,
        type=existing_socket,
        metavar="SOCKET",
        help="xlio serve's socket",
    )
    g.add_argument("--run", default="ping -c 3 198.18.0.1", metavar="CMD", type=command_text,
                   help="what the guest runs (default: %(default)s)")  # fmt: skip
    g.add_argument("--timeout", type=seconds_in(86400, lo=5.0), default=120.0, metavar="S",
                   help="kill the guest after S seconds, at least 5: it boots in about 4 s "
                   "under TCG here (default: %(default)s)")  # fmt: skip


def run(a: argparse.Namespace) -> int:
    from xlio.guestvm import GuestSetupError, run_guest

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        r = run_guest(a.vhost_user, a.run, a.timeout, echo=echo)
    except GuestSetupError as e:
        raise UsageError(str(e)) from None
    if r.status is None:
        why = f"timed out after {a.timeout:g} s" if r.seconds >= a.timeout else "no exit status"
        tail = "\n".join(r.console.splitlines()[-5:])
        print(f"xlio guest: error: the guest's command {why}; last console lines:\n{tail}",
              file=sys.stderr)  # fmt: skip
        return 124
    return r.status
