"""Signals at the worst moment, and a run killed outright: nothing left behind.

``xlio serve`` runs as a user runs it (a subprocess); SIGINT, SIGTERM and
SIGHUP arrive during namespace set-up, while serving, during a ping flood,
and twice within milliseconds. Each ends with no traceback, exit status
128 + the signal (130 for SIGINT) and no namespace or tap left. A run
killed with SIGKILL leaves its namespace, which ``xlio cleanup`` (or the
next run) removes because its owner is dead, and only it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from children import default_signals, running, spawn, xlio_args
from taphosts import needs_taps, netns_name

from xlio.backends.netns import leftovers, netns_prefix, owner_alive

pytestmark = needs_taps
GUEST = "198.18.0.2"


class Serve:
    """``xlio serve`` in a subprocess, its stderr read line by line."""

    def __init__(self, *extra: str) -> None:
        self.name = netns_name("s")
        self.proc = spawn(xlio_args("serve", "--netns", self.name, "--json", *extra))
        self.err = ""

    def wait_for(self, text: str, timeout: float = 20) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while text not in self.err:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, (text, self.err)
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:  # unbuffered: a line must not hide in a reader's buffer
                self.err += os.read(self.proc.stderr.fileno(), 65536).decode()

    def stop(self, *signals: int, gap: float = 0.0) -> tuple[int, str, str]:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, self.err + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _clean(name: str) -> None:
    spaces, links = leftovers()
    assert name not in spaces and not links, (spaces, links)


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1])
def test_a_signal_during_namespace_setup(sig: int, delay: float) -> None:
    s = Serve()
    try:
        s.wait_for("building namespace")
        time.sleep(delay)
        code, out, err = s.stop(sig)
    finally:
        s.kill()
    assert code == 128 + sig, err
    assert "Traceback" not in err
    _clean(s.name)


def _blocked_stops() -> None:
    """In the child, before exec: the stop signals at their default action, blocked."""
    default_signals()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_at_the_first_moment_of_xlio_code_ends_quietly(sig: int) -> None:
    """Sent before the child runs a line of Python and held pending (blocked)
    until the entry point unblocks it: it lands on xlio's very first moment."""
    name = netns_name("s")
    proc = subprocess.Popen(xlio_args("serve", "--netns", name), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_blocked_stops)  # fmt: skip
    with running(proc):
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert err == f"xlio: stopped by {signal.Signals(sig).name}\n" and out == ""
    _clean(name)


@pytest.mark.parametrize(
    "sig", (signal.SIGINT, signal.SIGTERM), ids=lambda s: signal.Signals(s).name
)
@pytest.mark.parametrize("delay", [0.08, 0.12, 0.16, 0.2, 0.3, 0.45])
def test_a_signal_while_python_imports_the_commands_ends_quietly(sig: int, delay: float) -> None:
    """From Python's first 30 ms (its own start and site) on, while the commands
    import and the namespace is built: 128 + the signal, no traceback, nothing left."""
    name = netns_name("s")
    proc = spawn(xlio_args("serve", "--netns", name))
    with running(proc):
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    # quiet at every moment: the import phase says it was stopped; later (a fast
    # machine has the namespace built, or the guest ready, by now) the report does
    assert "Traceback" not in err, err
    if "building namespace" not in out + err:
        assert "stopped by " + signal.Signals(sig).name in err, err
    _clean(name)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_serving_reports_what_was_measured(sig: int) -> None:
    s = Serve("--path", "l0", "--preset", "kvm-2019")
    try:
        s.wait_for("L2 guest")
        ping = subprocess.run(
            ["ip", "netns", "exec", s.name, "ping", "-c", "3", "-i", "0.05", "-w", "5", GUEST],
            capture_output=True, text=True,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stdout
        code, out, err = s.stop(sig)
    finally:
        s.kill()
    assert code == 128 + sig and "Traceback" not in err, err
    r = json.loads(out)
    assert r["stopped_by"] == signal.Signals(sig).name and r["tap"]["frames_from_peer"] >= 3
    _clean(s.name)


def test_a_signal_during_a_flood() -> None:
    s = Serve("--path", "l1")
    flood = None
    try:
        s.wait_for("L2 guest")
        flood = subprocess.Popen(
            ["ip", "netns", "exec", s.name, "ping", "-f", "-c", "20000", "-s", "1000", GUEST],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.7)
        code, out, err = s.stop(signal.SIGTERM)
    finally:
        s.kill()
        if flood is not None:
            flood.kill()
            flood.wait()
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert json.loads(out)["tap"]["frames_from_peer"] > 0
    _clean(s.name)


@pytest.mark.parametrize("gap", [0.0, 0.002, 0.02])
def test_two_signals_within_milliseconds(gap: float) -> None:
    s = Serve("--path", "l1")
    try:
        s.wait_for("L2 guest")
        code, out, err = s.stop(signal.SIGINT, signal.SIGTERM, gap=gap)
    finally:
        s.kill()
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    assert "Traceback" not in err
    _clean(s.name)


def test_sigkill_leaves_a_namespace_that_cleanup_removes_and_only_it() -> None:
    killed = Serve("--path", "l1")
    live = Serve("--path", "l0")
    try:
        killed.wait_for("L2 guest")
        live.wait_for("L2 guest")
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        spaces, _ = leftovers()
        assert killed.name in spaces and owner_alive(killed.name) is False
        assert owner_alive(live.name) is True
        p = subprocess.run([sys.executable, "-m", "xlio", "cleanup", "--json"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["removed"] == [killed.name]
        spaces, _ = leftovers()
        assert killed.name not in spaces and live.name in spaces
        code, _, err = live.stop(signal.SIGINT)
        assert code == 130, err
    finally:
        killed.kill()
        live.kill()
    _clean(live.name)
    assert not os.path.exists(f"/run/xlio/{killed.name}")


SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.mark.parametrize(
    ("script", "sig"),
    [
        (["soak.py", "--paths", "l0"], signal.SIGTERM),  # inside trio.run
        (["soak.py", "--paths", "l1"], signal.SIGHUP),
        (["bench.py", "--quick"], signal.SIGINT),  # a tap row, outside trio
    ],
    ids=["soak-SIGTERM", "soak-SIGHUP", "bench-SIGINT"],
)
def test_a_script_stopped_removes_its_namespace(script: list[str], sig: int) -> None:
    proc = spawn([sys.executable, os.path.join(SCRIPTS, script[0]), *script[1:]])
    mine = f"{netns_prefix()}{proc.pid}-"
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(mine) for n in leftovers()[0]):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # the namespace's run under way
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert err.strip().endswith(f"stopped by {signal.Signals(sig).name}") and "Traceback" not in err
    assert not any(n.startswith(mine) for n in leftovers()[0])
    _clean(mine)


class _BrokenDel:
    """What a stop inside a constructor leaves behind: a __del__ that fails."""

    def __del__(self) -> None:
        raise AttributeError("half-built: no _ssock")


@pytest.mark.parametrize("stopped", [False, True])
def test_a_finalizer_broken_by_the_stop_prints_nothing(stopped: bool) -> None:
    """A SIGTERM inside asyncio's BaseEventLoop.__init__ (pyroute2 builds one
    while the namespace is set up) left a loop whose __del__ printed
    "Exception ignored ... AttributeError" after "stopped by SIGTERM". Once a
    stop is seen, such echoes are quiet; before it, a real one still prints."""
    from xlio.stop import StopState, stopping_on_signals

    heard: list[BaseException | None] = []
    saved = StopState.seen, StopState.signum, sys.unraisablehook
    sys.unraisablehook = lambda u: heard.append(u.exc_value)
    try:
        with stopping_on_signals():
            if stopped:
                StopState.record(signal.SIGTERM)
            _BrokenDel()  # collected at once: its __del__ raises into the hook
    finally:
        StopState.seen, StopState.signum, sys.unraisablehook = saved
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert [type(e) for e in heard] == ([] if stopped else [AttributeError])


def test_a_forked_child_starts_with_the_default_stop_actions() -> None:
    """A pool's worker (or pyroute2's helper) forked during a run is ended with
    SIGTERM. It used to inherit the run's Python handler, which acts only when
    the child runs bytecode: a child stuck on a lock inherited from a threaded
    parent never ended, and the parent's Pool.terminate waited forever (seen
    in `xlio sensitivity --jobs 64` stopped at 1.6 s). Now the default actions
    are back at the fork itself."""
    from xlio.stop import stopping_on_signals

    try:
        with stopping_on_signals():
            pid = os.fork()
            if pid == 0:  # the child: 0 if every stop signal has its default action
                ok = all(signal.getsignal(s) is signal.SIG_DFL
                         for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))  # fmt: skip
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert os.waitstatus_to_exitcode(status) == 0
