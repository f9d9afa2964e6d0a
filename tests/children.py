"""Child processes a test signals: started with default signal dispositions,
watched for a marker on stderr, never left running after the test.

A shell starts a background job's children with SIGINT and SIGQUIT ignored
(POSIX, "Asynchronous Lists"), and an ignored disposition survives exec: a
suite launched from ``bash -c '... &'`` would hand every child an xlio that
cannot hear Ctrl-C. :func:`spawn` resets the stop signals to SIG_DFL and
unblocks them in the child before it execs, so the child's Python installs
its own handlers as it does under a terminal.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def default_signals() -> None:
    """In the child, before exec: every stop signal at its default disposition, unblocked."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def spawn(args: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
    """``Popen(args)`` with pipes, text and default signal dispositions."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(list(args), text=True, preexec_fn=default_signals, **kw)


def xlio_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "xlio", *args]


def read_until(proc: subprocess.Popen[str], text: str, timeout: float, seen: str = "") -> str:
    """Read ``proc``'s stderr (unbuffered) until the regular expression
    ``text`` matches what was read; returns what was read.

    Fails the test if the child exits first or ``timeout`` seconds pass.
    """
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while not re.search(text, seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on stderr within {timeout} s: {seen!r}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
            if not chunk:
                raise AssertionError(f"child exited ({proc.wait()}) before {text!r}: {seen!r}")
            seen += chunk
    return seen


@contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``proc``, killed and reaped when the test leaves this block, whatever happened."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
