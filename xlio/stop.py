"""Stop signals, from the process's first moment to its last.

Theory of operation. An ``xlio`` process lives in three phases, and SIGINT,
SIGTERM and SIGHUP end each of them quietly with status 128 + the signal
(130 for Ctrl-C), never with a traceback:

1. **Starting** (importing the commands: numpy, scapy, simpy, trio; about
   150 ms): nothing has been built, so :func:`exit_now` ends the process at
   once, with one line ``xlio: stopped by SIGINT``.
2. **Running** (inside :func:`stopping_on_signals`): the first signal raises
   :class:`Stopped`, a ``KeyboardInterrupt`` carrying the signal, so a
   measurement reports what it did and a tap run removes its namespace on
   the way out. Later signals are ignored: a second Ctrl-C cannot cut the
   cleanup or the report short. :class:`StopState` remembers the first.
   While trio runs, its signal receiver takes the signals; in the moments
   before it opens and after it closes the handler only records the signal
   (:func:`deferring_stops`): an exception raised inside trio's scheduler
   would be a ``TrioInternalError``, not a stop.
3. **Leaving** (the report is written): back to :func:`exit_now`, or
   ignored if a stop was already seen. :func:`leave` runs the ``atexit``
   callbacks under those handlers, flushes stdio and ends the process
   itself: Python's own finalization would put the default dispositions
   back first (a signal there killed the process, status -2, no line).

The entry point (``xlio.__main__``) installs phase 1 before importing
anything heavy; this module imports only the standard library for that reason.
A forked child (pyroute2 forks helpers and ends them with SIGTERM; a pool's
workers are ended with SIGTERM) gets the stop signals' default actions back
at the fork itself (:func:`_defaults_in_children`), so it just ends, also
when it is stuck where no Python handler would run, instead of unwinding
into its parent's cleanup.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from contextlib import contextmanager  # loaded by site already: free

TYPE_CHECKING = False  # typing itself is not imported: 4 ms more before the handlers
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType
    from typing import NoReturn

#: Signals that stop a run cleanly: what it measured is reported, what it
#: built is removed, and the exit status is 128 + the signal (130 for SIGINT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The run was stopped by ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)  # args == (signum,): rebuilt as type(e)(*e.args) (simpy does)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


class StopState:
    """Whether a stop signal was seen; after the first, the others are ignored."""

    seen = False
    signum = 0
    deferred = False  # inside trio.run: record, never raise into trio's own code

    @classmethod
    def record(cls, signum: int) -> None:
        cls.seen = True
        cls.signum = signum

    @classmethod
    def check(cls) -> None:
        """Raise the stop now if a signal came but its exception was lost (raised
        inside a finalizer or a weakref callback, where Python swallows it)."""
        if cls.seen:
            raise Stopped(cls.signum)

    @classmethod
    def status(cls) -> int:
        """128 + the signal that stopped the run (SIGINT if none was recorded:
        a ``KeyboardInterrupt`` raised by Python's own handler)."""
        return 128 + (cls.signum if cls.seen else signal.SIGINT)


def exit_now(signum: int, frame: FrameType | None = None) -> None:
    """A handler for phases 1 and 3: one line on stderr, exit 128 + ``signum``."""
    try:
        os.write(2, f"xlio: stopped by {signal.Signals(signum).name}\n".encode())
    except OSError:
        pass
    os._exit(128 + signum)


def leave(status: int) -> NoReturn:
    """Phase 3's end: the ``atexit`` callbacks (library cleanup: a pool's
    workers, a client's connection) run while :func:`exit_now` still holds
    the stop signals, stdio is flushed, and the process ends with
    ``status``, skipping the interpreter finalization during which a
    signal would meet its default disposition."""
    if "threading" in sys.modules:  # what finalization does first: wait for non-daemon threads
        sys.modules["threading"]._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader left, or the stream is closed
            pass
    os._exit(status)


_AT_FORK: list[bool] = []  # the fork hook, once registered (it cannot be unregistered)


def _child_defaults() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _defaults_in_children() -> None:
    """Every child forked from now on starts with the stop signals' default
    actions, set before it runs anything else: an inherited Python handler
    only acts when the child runs bytecode, and a child stuck on a lock
    inherited from a threaded parent never would (a pool's terminate would
    wait on it forever)."""
    if not _AT_FORK:
        _AT_FORK.append(True)
        os.register_at_fork(after_in_child=_child_defaults)


def exit_quietly_on_signals() -> None:
    """Phase 1 (and 3): every stop signal ends the process at once.

    The stop signals are also unblocked: a launcher that started us with them
    blocked (some supervisors do) would otherwise leave them pending forever;
    one already pending is delivered here, to :func:`exit_now`.
    """
    _defaults_in_children()
    for sig in STOP_SIGNALS:
        signal.signal(sig, exit_now)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Phase 2: the first stop signal raises :class:`Stopped` (cleanup runs);
    any later one is ignored, also after this block: the process is on its
    way out. Blocks nest (``serve`` inside the entry point's)."""
    _defaults_in_children()

    def handler(signum: int, frame: FrameType | None) -> None:
        if StopState.seen:
            return
        StopState.record(signum)
        if not StopState.deferred:
            raise Stopped(signum)

    def unraisable(u: sys.UnraisableHookArgs) -> None:
        # a lost stop: StopState.check finds it. Once a stop was seen, also
        # what it broke on the way: a stop inside a constructor (asyncio's
        # event loop, built by pyroute2) leaves a half-built object whose
        # __del__ then fails; that is the stop's echo, not a second error
        if not isinstance(u.exc_value, Stopped) and not StopState.seen:
            hook(u)

    hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, signal.SIG_IGN if StopState.seen else h)
        sys.unraisablehook = hook


@contextmanager
def deferring_stops() -> Iterator[None]:
    """Inside the block a stop signal is recorded in :class:`StopState`, not raised."""
    before, StopState.deferred = StopState.deferred, True
    try:
        yield
    finally:
        StopState.deferred = before
