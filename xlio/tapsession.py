"""Real taps: a datapath on a tap in a namespace, traffic both ways, ``serve`` and ``demo --tap``.

The thin edge around the sans-IO core: :class:`TapSession` builds the model,
the datapath and its :class:`~xlio.backends.tap.TapWire` on a namespaced
tap; the coroutines here drive traffic from the L2 side (guest-originated
ping and UDP) and from the namespace's side (a UDP echo server on a socket
created inside the namespace, the real ``ping``). Exits are charged by the
same model as on the loopback wire.

Stopping (the vocabulary is :mod:`xlio.stop`): SIGINT, SIGTERM and SIGHUP
stop ``serve`` and ``demo --tap`` cleanly. Inside trio a signal receiver
cancels the run (:func:`run_trio`); outside it (while pyroute2 builds or
removes the namespace) a handler raises :class:`Stopped`.
The first signal counts; later ones are ignored, so a second Ctrl-C cannot
cut the cleanup or the report short. The command exits with 128 + the
signal (130 for SIGINT).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from xlio.backends.datapath import Datapath, datapath_options, make_datapath
from xlio.backends.direct import DelegationRefused
from xlio.backends.netns import HostInfo, NamespacedTap
from xlio.backends.shadow import Shadows
from xlio.backends.tap import (
    CaptureFailed,
    PcapBatcher,
    TapGone,
    TapWire,
    raise_first,
    serve_tap,
)
from xlio.measure import make_config, result_of
from xlio.packets import UDP_ECHO_PORT, ip4
from xlio.sim.arch import machine_for
from xlio.sim.presets import CostModel
from xlio.sim.workloads import PATHS
from xlio.stop import STOP_SIGNALS, Stopped, StopState, deferring_stops, stopping_on_signals

#: What a real guest's run reports of the other two paths, per frame.
OTHER_PATH_FIELDS = ("l0_exits", "l1_exits", "l2_exits", "reflected", "l1_be_exits",
                     "irqs_injected_l2", "cycles", "time_us")  # fmt: skip


class TapSession:
    """One path's datapath on the tap of ``host`` (already open)."""

    def __init__(
        self,
        path: str,
        host: NamespacedTap,
        *,
        preset: str | CostModel = "turtles-2010",
        pcap: str | PcapBatcher | None = None,
        record_batches: bool = False,
        guest: bool = False,
        other_paths: bool = True,
        **opts: Any,
    ) -> None:
        assert host.info is not None, "open the host first"
        self.path = path
        self.info: HostInfo = host.info
        self.m = machine_for(make_config(preset, path))
        self.pcap = PcapBatcher(pcap) if isinstance(pcap, str) else pcap
        self.wire = TapWire(host.fd, self.pcap, record_batches=record_batches)
        o = datapath_options(opts)
        self.dp: Datapath = make_datapath(self.m, path, o, wire=self.wire, guest=guest)
        self.dp.endpoint.ip = ip4(self.info.guest_ip)
        self.host_ip = ip4(self.info.host_ip)
        self.setup = self.m.stats.summary()
        self.m.reset_stats()
        #: a real guest's events charged on the other two paths as well
        self.shadows: Shadows | None = None
        if guest and other_paths:
            others = {p: machine_for(make_config(preset, p)) for p in PATHS if p != path}
            self.shadows = Shadows(self.dp, others, o)
            for m in others.values():
                m.reset_stats()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_tap(self.dp, self.wire, task_status=task_status)

    def frames(self) -> int:
        """Frames L2's NIC moved since counting began (both directions); for a
        real guest, whose device comes and goes with its driver, the frames
        that crossed the tap."""
        if self.dp.driver is None:
            return self.wire.frames_to_peer + self.wire.frames_from_peer
        dev = self.dp.active_device()
        if dev is None:
            return 0
        return int(dev.metrics["rx_packets_count"] + dev.metrics["tx_packets_count"])

    def result(self, units: float | None = None, per: str = "frame") -> dict[str, Any]:
        n = units if units is not None else max(self.frames(), 1)
        r = result_of(self.m, "tap", self.path, n, per, setup=self.setup)
        r["tap"] = self.wire.metrics()
        r["netns"] = self.info.netns
        if self.shadows is not None:
            self.shadows.catch_up()
            r["other_paths"] = {
                p: {k: v for k, v in result_of(dp.m, "tap", p, n, per)["per_op"].items()
                    if k in OTHER_PATH_FIELDS}
                for p, dp in self.shadows.dps.items()
            }  # fmt: skip
        if self.dp.driver is None:  # a real guest: its NIC's totals over every backend it had
            r["l2_nic"] = dict(sorted(self.dp.served().items()))
        if self.pcap is not None:
            if self.pcap.failed is None:
                self.pcap.close()
            r["pcap_frames"] = self.pcap.written
            r["pcap_error"] = str(self.pcap.failed) if self.pcap.failed else None
        return r

    # ------------------------------------------------------------- L2's traffic
    async def _until(self, cond: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not cond():
                await trio.sleep(0.0005)
            return True
        return False

    async def resolve(self, timeout: float = 2.0) -> bool:
        ep = self.dp.endpoint
        if self.host_ip not in ep.neighbors:
            self.dp.send([ep.arp_request(self.host_ip)])
        return await self._until(lambda: self.host_ip in ep.neighbors, timeout)

    async def guest_ping(self, count: int, timeout: float = 1.0) -> list[float | None]:
        """L2 pings the namespace's host address; RTTs in seconds (None: lost)."""
        if not await self.resolve():
            return [None] * count
        ep = self.dp.endpoint
        ident = secrets.randbelow(0xFFFF)
        rtts: list[float | None] = []
        for seq in range(count):
            payload = seq.to_bytes(4, "big") * 14
            t0 = time.perf_counter()
            self.dp.send([ep.ping(self.host_ip, ident, seq, payload)])

            def replied(s: int = seq) -> bool:
                return any(r[0] == ident and r[1] == s for r in ep.icmp_replies)

            ok = await self._until(replied, timeout)
            rtts.append(time.perf_counter() - t0 if ok else None)
        return rtts

    async def guest_udp_echo(
        self, payloads: list[bytes], timeout: float = 1.0
    ) -> list[float | None]:
        """L2 sends each payload to the host's UDP echo server, one at a time."""
        if not await self.resolve():
            return [None] * len(payloads)
        ep = self.dp.endpoint
        rtts: list[float | None] = []
        for i, p in enumerate(payloads):
            sport = 20000 + i % 20000
            before = ep.udp_reply_count
            t0 = time.perf_counter()
            self.dp.send([ep.udp(self.host_ip, sport, UDP_ECHO_PORT, p)])

            def echoed(b: int = before) -> bool:
                return ep.udp_reply_count > b

            ok = await self._until(echoed, timeout)
            rtts.append(
                time.perf_counter() - t0 if ok and ep.udp_replies[-1] == (sport, p) else None
            )
        return rtts


def pin_neighbour(info: HostInfo, mac: bytes) -> None:
    """A permanent ARP entry for the guest in the namespace: the kernel then
    never probes it, so long measurements see only the traffic they send."""
    import subprocess

    subprocess.run(
        ["ip", "netns", "exec", info.netns, "ip", "neigh", "replace", info.guest_ip,
         "lladdr", mac.hex(":"), "dev", info.ifname], check=True,
    )  # fmt: skip


def socket_in_netns(name: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket that lives in namespace ``name`` (created while this thread is in it)."""
    from pyroute2 import netns

    netns.pushns(name)
    try:
        return socket.socket(socket.AF_INET, kind)
    finally:
        netns.popns()


async def udp_echo_server(sock: trio.socket.SocketType) -> None:
    """RFC 862 in the namespace: send every datagram back."""
    while True:
        data, addr = await sock.recvfrom(65535)
        await sock.sendto(data, addr)


async def host_ping(info: HostInfo, count: int, interval: float = 0.01) -> dict[str, Any]:
    """The real ``ping`` from inside the namespace to the guest."""
    proc = await trio.run_process(
        ["ip", "netns", "exec", info.netns, "ping", "-n", "-q", "-c", str(count),
         "-i", str(interval), "-W", "2", info.guest_ip],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    out = proc.stdout.decode()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
    return {
        "transmitted": int(m.group(1)) if m else 0,
        "received": int(m.group(2)) if m else 0,
        "rtt_ms": [float(x) for x in rtt.groups()] if rtt else None,
        "returncode": proc.returncode,
        "output": out + proc.stderr.decode(),
    }


async def run_with(session: TapSession, body: Callable[[], Awaitable[Any]]) -> Any:
    """Serve the tap while ``body`` runs; stop serving when it returns."""
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        result = await body()
        nursery.cancel_scope.cancel()
    return result


# ---------------------------------------------------------------- signals
def run_script(main: Callable[[], Any]) -> None:
    """Run a script that builds namespaces (``scripts/``): a stop signal unwinds
    it, so what it built is removed, and it exits with 128 + the signal."""
    try:
        with stopping_on_signals():
            main()
    except BaseException:
        if not StopState.seen:
            raise
        name = signal.Signals(StopState.signum).name
        print(f"{os.path.basename(sys.argv[0])}: stopped by {name}", file=sys.stderr)
        sys.exit(128 + StopState.signum)


def trio_run_stoppable(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``trio.run(fn, *args)`` in a script: a stop signal cancels it the trio
    way, then raises :class:`Stopped` outside trio (see :func:`run_script`)."""

    async def main(received: list[int]) -> Any:
        out = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope, received)
            out.append(await fn(*args))
            nursery.cancel_scope.cancel()
        return out[0] if out else None

    result, stop = run_trio(main)
    if stop:
        raise Stopped(stop)
    return result


def run_trio(fn: Callable[..., Awaitable[Any]], *args: Any) -> tuple[Any, int | None]:
    """``trio.run(fn, received, *args)``: ``fn``'s result and the stop signal
    that came during the run (None: none). ``fn`` hands ``received`` to its
    :func:`_cancel_on_signal`. A stop signal is never raised inside trio
    itself: before that receiver opens and after it closes, a signal is only
    recorded (:func:`~xlio.stop.deferring_stops`) and counts as received."""
    received: list[int] = []
    with deferring_stops():
        result = trio.run(fn, received, *args)
    if not received and StopState.seen:
        received.append(StopState.signum)
    return result, received[0] if received else None


async def _cancel_on_signal(scope: trio.CancelScope, received: list[int]) -> None:
    """Inside trio: the first stop signal cancels ``scope`` and is recorded
    (also one that came while trio was starting, before the receiver opened)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if StopState.seen:
            received.append(StopState.signum)
            scope.cancel()
            return
        async for signum in signals:
            received.append(signum)
            StopState.record(signum)  # later signals: ignored
            scope.cancel()
            return


# ---------------------------------------------------------------- xlio serve
def serve(
    path: str,
    netns_name: str | None,
    duration: float | None,
    preset: str | CostModel,
    pcap: str | PcapBatcher | None,
    announce: Callable[[str], None],
    ready: Callable[[str], None] | None = None,
    interval: float | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
    vhost_user: str | None = None,
    switch_every: float | None = None,
    other_paths: bool = True,
) -> dict[str, Any]:
    """Build the namespace, keep L2 reachable until the duration or a stop signal.

    ``ready`` hears one line the moment L2 answers (its ARP for the host
    was answered through the tap: both directions work), or with
    ``vhost_user`` (L2 is a real guest whose VMM connects to that socket)
    the moment the socket listens. With ``interval``,
    ``emit`` gets the metrics of each interval (see :func:`interval_metrics`).
    With ``switch_every`` (path ``l1``) L1 delegates L2's NIC to L0 and
    revokes it in turn, every that many seconds. With ``other_paths`` a real
    guest's events are charged on the other two paths as well (shadow
    datapaths: about as much model work again per path).
    The result's ``stopped_by`` names the signal that ended the run (None:
    the duration did). A capture that cannot be written ends the run with
    :class:`CaptureFailed`, its ``report`` holding the run's result (how
    many frames were captured); the namespace is removed either way.
    """
    with stopping_on_signals():
        host = NamespacedTap(netns_name)
        try:
            announce(f"xlio serve: building namespace {host.name}")
            info = host.open()
            session = TapSession(
                path, host, preset=preset, pcap=pcap, guest=bool(vhost_user),
                other_paths=other_paths,
            )  # fmt: skip
            who = f"vhost-user socket {vhost_user}" if vhost_user else "L2 guest"
            announce(
                f"xlio serve: path {path}, namespace {info.netns}, host {info.host_ip}/"
                f"{info.prefix} on {info.ifname}, {who} {info.guest_ip}\n"
                f"  try: ip netns exec {info.netns} ping {info.guest_ip}"
            )
            StopState.check()
            vhost = None
            if vhost_user is not None:
                from xlio.vhostsession import VhostUserServer

                vhost = VhostUserServer(session.dp, vhost_user, announce, session.shadows)
            switches = [0]
            try:
                try:
                    _, stop = run_trio(
                        _serve_main, session, duration, ready, interval, emit, vhost,
                        switch_every, switches,
                    )  # fmt: skip
                except BaseExceptionGroup as group:
                    raise_first(group, (TapGone, CaptureFailed))
                    raise
                r = session.result()
            except CaptureFailed as e:
                e.report = session.result()
                e.report["stopped_by"] = None
                raise
            r["stopped_by"] = signal.Signals(stop).name if stop else None
            if vhost is not None:
                r["vhost_user"] = vhost.report()
            if switch_every is not None:
                r["switches"] = switches[0]
            return r
        finally:
            host.close()


async def _serve_main(
    received: list[int], session: TapSession, duration: float | None,
    ready: Callable[[str], None] | None, interval: float | None,
    emit: Callable[[dict[str, Any]], None] | None, vhost: Any = None,
    switch_every: float | None = None, switches: list[int] | None = None,
) -> None:  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope, received)
        await nursery.start(session.run)
        if interval is not None and emit is not None:  # counting starts before L2 speaks
            nursery.start_soon(_every, session, interval, emit, interval_metrics(session, vhost),
                               vhost)  # fmt: skip
        if vhost is not None:
            await nursery.start(vhost.serve)
            if ready is not None:
                i = session.info
                ready(
                    f"xlio serve: ready: listening on {vhost.path} (vhost-user), path "
                    f"{session.path}, namespace {i.netns}, host {i.host_ip}/{i.prefix} on "
                    f"{i.ifname}, guest {i.guest_ip}"
                )
        elif ready is not None:
            nursery.start_soon(_announce_ready, session, ready)
        if switch_every is not None and switches is not None:
            nursery.start_soon(_switch, session, switch_every, switches)
        if duration is not None:
            await trio.sleep(duration)
            nursery.cancel_scope.cancel()


async def _switch(session: TapSession, every: float, switches: list[int]) -> None:
    """L1 hands L2's NIC to L0 (DELEGATE), takes it back (REVOKE), in turn;
    a switch is counted when it took place (L2's device is up and L0 agreed)."""
    dp = session.dp
    while True:
        await trio.sleep(every)
        if dp.direct.active:
            switches[0] += dp.l1_revoke()
        elif dp.l1_dev is not None and not dp.l1_dev.needs_reset:
            try:
                dp.l1_delegate()
            except DelegationRefused:
                continue
            switches[0] += 1


async def _announce_ready(session: TapSession, ready: Callable[[str], None]) -> None:
    """Tell the user the moment L2 answers: its ARP request for the host got a reply."""
    i = session.info
    while not await session.resolve(timeout=1.0):
        pass
    ready(
        f"xlio serve: ready: L2 guest {i.guest_ip} answers on path {session.path}, namespace "
        f"{i.netns}, host {i.host_ip}/{i.prefix} on {i.ifname}"
    )


async def _every(
    session: TapSession, interval: float, emit: Callable[[dict[str, Any]], None],
    before: dict[str, Any], vhost: Any = None,
) -> None:  # fmt: skip
    start = time.monotonic()
    while True:
        await trio.sleep(interval)
        now = interval_metrics(session, vhost)
        emit({"t_s": round(time.monotonic() - start, 3), "interval_s": interval,
              **_delta(now, before)})  # fmt: skip
        before = now


def interval_metrics(session: TapSession, vhost: Any = None) -> dict[str, Any]:
    """Counters of a serving session (cumulative): devices, tap, exits by level
    and reason, and a real guest's notifications (``vhost``)."""
    s = session.m.stats
    extra: dict[str, Any] = {}
    if vhost is not None:
        extra["vhost_user"] = vhost.report()["queues"]
    if session.shadows is not None:  # what the same events cost on the other paths
        session.shadows.catch_up()
        extra["other_paths"] = {
            p: {"l0_exits": dp.m.stats.l0_exits, "l1_exits": dp.m.stats.l1_exits,
                "modeled_us": dp.m.costs.cycles_to_us(dp.m.stats.cycles)}
            for p, dp in session.shadows.dps.items()
        }  # fmt: skip
    return {
        **extra,
        "devices": session.dp.metrics(),
        "tap": session.wire.metrics(),
        "exits": {f"{row['level']} {row['reason']}": row["count"] for row in s.reason_rows()},
        "l0_exits": s.l0_exits,
        "l1_exits": s.l1_exits,
        "reflected": s.reflected,
        "modeled_us": session.m.costs.cycles_to_us(s.cycles),
    }


def _delta(now: Any, before: Any) -> Any:
    """``now - before`` key by key (Firecracker's metrics: each line is one interval's)."""
    if isinstance(now, dict):
        return {k: _delta(v, before.get(k, 0) if isinstance(before, dict) else 0)
                for k, v in now.items()}  # fmt: skip
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        d = now - (before if isinstance(before, (int, float)) else 0)
        return round(d, 3) if isinstance(d, float) else d
    return now


# ---------------------------------------------------------------- xlio demo --tap
async def _demo_path(
    received: list[int], session: TapSession, host: HostInfo, n: int
) -> dict[str, Any] | None:
    sock = trio.socket.from_stdlib_socket(socket_in_netns(host.netns))
    await sock.bind((host.host_ip, UDP_ECHO_PORT))
    try:
        with trio.CancelScope() as stop:
            return await _demo_requests(session, host, n, sock, stop, received)
        return None  # stopped by a signal
    finally:
        sock.close()


async def _demo_requests(
    session: TapSession, host: HostInfo, n: int, sock: trio.socket.SocketType,
    stop: trio.CancelScope, received: list[int],
) -> dict[str, Any]:  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, stop, received)
        nursery.start_soon(udp_echo_server, sock)
        await nursery.start(session.run)
        await session.resolve()
        session.m.reset_stats()  # count the requests, not the neighbour lookup
        pings = await session.guest_ping(n)
        # payload sizes from 16 to 1,416 bytes: every datagram fits the tap's 1,500-byte MTU
        udp = await session.guest_udp_echo([os.urandom(16 + (37 * i) % 1401) for i in range(n)])
        hp = await host_ping(host, n)
        nursery.cancel_scope.cancel()
    requests = 2 * n + hp["transmitted"]
    lost = sum(r is None for r in pings + udp) + hp["transmitted"] - hp["received"]
    r = session.result(units=requests, per="request")
    ok = [x for x in pings if x is not None]
    uok = [x for x in udp if x is not None]
    r["rtt"] = {
        "guest_ping_ms": 1e3 * sum(ok) / len(ok) if ok else None,
        "guest_udp_ms": 1e3 * sum(uok) / len(uok) if uok else None,
        "host_ping_ms": hp["rtt_ms"][1] if hp["rtt_ms"] else None,
    }
    r["lost"] = lost
    return r


def demo_tap(
    preset: str | CostModel, n: int, progress: Callable[..., None] | None = None
) -> dict[str, Any]:
    """The demo over real taps, one fresh namespace per path; ``progress``
    hears of each path done. A stop signal raises :class:`Stopped` after the
    namespace is removed, carrying the paths finished before it (``rows``)."""
    rows: dict[str, Any] = {}
    try:
        with stopping_on_signals():
            for i, path in enumerate(("single", "l1", "l0")):
                host = NamespacedTap()
                try:
                    info = host.open()
                    session = TapSession(path, host, preset=preset)
                    StopState.check()
                    row, stop = run_trio(_demo_path, session, info, n)
                    if stop or row is None:
                        raise Stopped(stop or signal.SIGINT)
                    rows[path] = row
                finally:
                    host.close()
                if progress is not None:
                    progress(i + 1, 3)
    except Stopped as e:
        e.rows = rows  # type: ignore[attr-defined]
        raise
    return rows


def format_demo_tap(rows: dict[str, Any], preset: str, n: int) -> str:
    from xlio.report import DEMO_COLUMNS, render, table

    cols = (*DEMO_COLUMNS[:-1], ("time_us", "model us"))  # time: the model's, not the wall's

    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    body = []
    for path, r in rows.items():
        p, rtt = r["per_op"], r["rtt"]
        body.append([path, *(round(p[k], 2) for k, _ in cols), ms(rtt["guest_ping_ms"]),
                     ms(rtt["guest_udp_ms"]), ms(rtt["host_ping_ms"]), r["lost"]])  # fmt: skip
    head = (
        f"xlio demo --tap: {n} guest pings, {n} guest UDP echoes and {n} pings from the "
        f"namespace per path, real tap, preset {preset}; exits per request"
    )
    if "l0" in rows:
        ratio = rows["l1"]["per_op"]["cycles"] / (rows["l0"]["per_op"]["cycles"] or 1)
        first = f"L1 path / L0 direct path, modeled time per request: {ratio:.1f}x"
    else:
        first = "INTERRUPTED: the paths measured before the stop"
    foot = first + "\nRTTs are wall-clock on this machine: the Python datapath, not the model."
    heads = ["path", *(t for _, t in cols), "g-ping ms", "g-udp ms", "h-ping ms", "lost"]
    return render(head, table(heads, body), foot)
