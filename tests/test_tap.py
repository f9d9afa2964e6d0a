"""Real taps in real network namespaces, with real kernel tools on the other side.

Needs root and /dev/net/tun (CI has both); elsewhere every test here skips
with the reason. Every test builds its own ``xlio-TAG-`` namespace (the run's
tag, see conftest) and checks that nothing of it is left afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from children import read_until, running, spawn, xlio_args
from taphosts import needs_taps, netns_name

from xlio.backends.datapath import Datapath, datapath_options, make_datapath
from xlio.backends.netns import GUEST_IP, NamespacedTap, leftovers
from xlio.backends.tap import TapGone
from xlio.measure import make_config
from xlio.packets import UDP_DISCARD_PORT, UDP_ECHO_PORT
from xlio.sim.nested import NestedVmx
from xlio.tapsession import (
    TapSession,
    host_ping,
    run_with,
    socket_in_netns,
    udp_echo_server,
)

pytestmark = needs_taps
NESTED = ("l1", "l0")


def test_no_namespace_or_tap_outlives_the_suite_so_far() -> None:
    spaces, links = leftovers()
    assert not spaces and not links, (spaces, links)


@pytest.mark.parametrize("path", NESTED)
async def test_real_ping_from_the_namespace_loses_nothing(host: NamespacedTap, path: str) -> None:
    # the direct path bypasses L1 for interrupts only with APICv (posted into
    # L1's descriptor for L2): kvm-2019 has it, turtles-2010 does not
    s = TapSession(path, host, preset="kvm-2019" if path == "l0" else "turtles-2010")
    assert host.info is not None
    r = await run_with(s, lambda: host_ping(host.info, 30))
    assert r["transmitted"] == 30 and r["received"] == 30, r["output"]
    t = s.result()["totals"]
    if path == "l0":
        assert t["reflected"] == 0 and t["l1_exits"] == 0
    else:
        assert t["reflected"] >= 30  # at least each request's interrupt and each answer's kick


@pytest.mark.parametrize("path", NESTED)
async def test_udp_echo_of_1000_mixed_datagrams_every_byte(host: NamespacedTap, path: str) -> None:
    s = TapSession(path, host)
    assert host.info is not None
    info = host.info
    sizes = [1 + (i * 137) % 1472 for i in range(1000)]

    async def client() -> int:
        sock = trio.socket.from_stdlib_socket(socket_in_netns(info.netns))
        await sock.bind((info.host_ip, 0))
        await sock.connect((info.guest_ip, UDP_ECHO_PORT))
        good = 0
        window = 16
        with sock:
            for start in range(0, len(sizes), window):
                sent = {}
                for i in range(start, min(start + window, len(sizes))):
                    tag = i.to_bytes(2, "big")
                    payload = (tag + os.urandom(sizes[i]))[: max(sizes[i], 2)]
                    sent[payload] = i
                    await sock.send(payload)
                with trio.fail_after(5):
                    for _ in range(len(sent)):
                        data = await sock.recv(2048)
                        assert data in sent, "an echo that was never sent"
                        del sent[data]
                        good += 1
        return good

    assert await run_with(s, client) == 1000
    dev = s.dp.active_device()
    assert dev is not None and dev.metrics["rx_packets_count"] >= 1000
    assert dev.metrics["tx_bytes_count"] >= sum(sizes)


@pytest.mark.parametrize("path", NESTED)
async def test_guest_originated_ping_and_udp(host: NamespacedTap, path: str) -> None:
    s = TapSession(path, host)
    assert host.info is not None
    info = host.info
    sock = trio.socket.from_stdlib_socket(socket_in_netns(info.netns))
    await sock.bind((info.host_ip, UDP_ECHO_PORT))

    async def body() -> tuple[list, list]:
        async with trio.open_nursery() as n:
            n.start_soon(udp_echo_server, sock)
            pings = await s.guest_ping(10)
            udp = await s.guest_udp_echo([os.urandom(50 + 40 * i) for i in range(10)])
            n.cancel_scope.cancel()
        return pings, udp

    pings, udp = await run_with(s, body)
    sock.close()
    assert all(r is not None for r in pings), pings
    assert all(r is not None for r in udp), udp


async def test_burst_larger_than_the_ring_is_delivered_or_counted(host: NamespacedTap) -> None:
    s = TapSession("l0", host, queue_size=32)
    assert host.info is not None
    info = host.info
    s.dp.endpoint.record = True
    burst = 1500

    async def blast() -> int:
        # resolve the guest's MAC first: the kernel silently drops what does not
        # fit its unresolved-neighbour queue, and that is not the ring's doing
        assert (await host_ping(info, 1))["received"] == 1
        sock = socket_in_netns(info.netns)  # a plain socket: send without yielding
        sock.setblocking(False)
        send_errors = 0
        with sock:
            sock.bind((info.host_ip, 0))
            for i in range(burst):
                try:
                    sock.sendto(i.to_bytes(4, "big") * 50, (info.guest_ip, UDP_DISCARD_PORT))
                except OSError:
                    send_errors += 1
        last = -1
        while True:  # until nothing moves for 300 ms
            await trio.sleep(0.3)
            now = len(s.dp.endpoint.received_udp)
            if now == last:
                return send_errors
            last = now

    send_errors = await run_with(s, blast)
    from pyroute2 import NetNS

    with NetNS(info.netns) as ns:
        idx = ns.link_lookup(ifname=info.ifname)[0]
        stats = ns.get_links(idx)[0].get_attr("IFLA_STATS64")
    dev = s.dp.active_device()
    assert dev is not None
    delivered = len(s.dp.endpoint.received_udp)
    assert len(set(s.dp.endpoint.received_udp)) == delivered  # no duplicates
    drops = send_errors + stats["tx_dropped"] + dev.metrics["rx_fails"]
    assert delivered + drops == burst, (delivered, send_errors, stats["tx_dropped"])
    assert dev.metrics["no_rx_avail_buffer"] > 0  # the 32-entry ring ran dry, and it was counted
    assert delivered > 32


async def test_tap_removed_mid_run_is_a_clean_error(host: NamespacedTap) -> None:
    s = TapSession("l1", host)
    assert host.info is not None
    info = host.info

    def delete_link() -> None:
        from pyroute2 import NetNS

        with NetNS(info.netns) as ns:
            ns.link("del", index=ns.link_lookup(ifname=info.ifname)[0])

    async def delete_soon() -> None:
        await trio.sleep(0.2)
        await trio.to_thread.run_sync(delete_link)

    async with trio.open_nursery() as n:
        n.start_soon(delete_soon)
        with pytest.raises(TapGone), trio.fail_after(5):
            await s.run()


@pytest.mark.parametrize("path", NESTED)
async def test_tap_accounting_equals_the_loopback_wire(host: NamespacedTap, path: str) -> None:
    s = TapSession(path, host, record_batches=True)
    assert host.info is not None
    r = await run_with(s, lambda: host_ping(host.info, 10, interval=0.02))
    assert r["received"] == 10
    tap = s.m.stats.summary()
    batches = s.wire.read_batches
    assert batches
    m = NestedVmx(make_config("turtles-2010", path))
    dp: Datapath = make_datapath(m, path, datapath_options({}))
    dp.endpoint.ip = s.dp.endpoint.ip
    m.reset_stats()
    for batch in batches:
        dp.wire.inject(batch)
        dp.pump()
    loop = m.stats.summary()
    assert loop == tap


async def test_pcap_has_every_frame(host: NamespacedTap, tmp_path) -> None:
    path = str(tmp_path / "cap.pcap")
    s = TapSession("l0", host, pcap=path)
    assert host.info is not None
    await run_with(s, lambda: host_ping(host.info, 5))
    r = s.result()
    from scapy.layers.inet import ICMP
    from scapy.utils import rdpcap

    pkts = rdpcap(path)
    assert len(pkts) == r["pcap_frames"] == s.wire.frames_to_peer + s.wire.frames_from_peer
    assert sum(1 for p in pkts if p.haslayer(ICMP)) == 10


@contextmanager
def tmpfs(where: Path, *opts: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` for the block (a full disk, a read-only one)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_capture_that_cannot_be_written_is_refused_before_anything_is_built(
    tmp_path: Path,
) -> None:
    name = netns_name("p")
    with tmpfs(tmp_path / "ro", "ro", "size=64k") as ro:
        for bad in ("/proc/version", str(ro / "cap.pcap")):
            p = subprocess.run(xlio_args("serve", "--pcap", bad, "--netns", name),
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert p.returncode == 2 and p.stdout == "", p
            [line] = p.stderr.splitlines()
            assert line.startswith("xlio serve: error: ") and os.path.dirname(bad) in line, line
            spaces, links = leftovers()
            assert name not in spaces and not links


def test_a_disk_full_during_the_run_ends_it_with_what_was_captured(tmp_path: Path) -> None:
    """128 KiB hold about 500 frames of a 200-byte ping; 400 pings are 800 frames."""
    name = netns_name("p")
    with tmpfs(tmp_path / "small", "size=128k") as small:
        cap = small / "cap.pcap"
        proc = spawn(xlio_args("serve", "--pcap", str(cap), "--netns", name, "--json",
                               "--duration", "60"))  # fmt: skip
        with running(proc):
            read_until(proc, "ready: ", timeout=30)
            subprocess.run(["ip", "netns", "exec", name, "ping", "-q", "-f", "-c", "400",
                            "-s", "200", "-W", "1", GUEST_IP], capture_output=True,
                           timeout=60)  # fmt: skip
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], err
        r = json.loads(out)
        assert r["pcap_error"] and r["stopped_by"] is None
        crossed = r["tap"]["frames_to_peer"] + r["tap"]["frames_from_peer"]
        assert 0 < r["pcap_frames"] < crossed
        assert f"after {r['pcap_frames']} frames captured" in errors[0]
        from scapy.utils import RawPcapReader

        whole = 0
        for _ in RawPcapReader(str(cap)):  # the last record may be cut off by the full disk
            whole += 1
        assert whole in (r["pcap_frames"], r["pcap_frames"] + 1)
    spaces, links = leftovers()
    assert name not in spaces and not links


# ---------------------------------------------------------------- xlio serve
def _serve(path: str, name: str, sig: int) -> dict:
    proc = spawn(xlio_args("serve", "--path", path, "--netns", name, "--json",
                           "--preset", "kvm-2019" if path == "l0" else "turtles-2010"))  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        ping = None
        while time.monotonic() < deadline and proc.poll() is None:
            ping = subprocess.run(
                ["ip", "netns", "exec", name, "ping", "-c", "5", "-i", "0.05", "-W", "1",
                 "198.18.0.2"], capture_output=True, text=True,
            )  # fmt: skip
            if ping.returncode == 0:
                break
            time.sleep(0.2)
        if ping is None or ping.returncode != 0:
            proc.kill()
            out, err = proc.communicate(timeout=20)
            raise AssertionError(f"no answer from the guest; serve exited {proc.returncode}: "
                                 f"{err!r}; last ping: {ping!r}")  # fmt: skip
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err  # stopped by a signal: 130 for SIGINT
    assert name in err  # the namespace was announced on stderr, stdout is JSON
    return json.loads(out)


@pytest.mark.parametrize(("path", "sig"), [("l1", signal.SIGINT), ("l0", signal.SIGTERM)])
def test_serve_as_a_user_runs_it(path: str, sig: int) -> None:
    name = netns_name("t")
    r = _serve(path, name, sig)
    assert r["netns"] == name and r["tap"]["frames_from_peer"] >= 5
    assert r["totals"]["l2_exits"] >= 5
    if path == "l0":
        assert r["totals"]["reflected"] == 0 and r["totals"]["l1_exits"] == 0
    else:
        assert r["totals"]["reflected"] >= 5
    spaces, links = leftovers()
    assert name not in spaces and not links


def test_a_forked_child_never_tears_down_its_parents_host(host: NamespacedTap) -> None:
    pid = os.fork()
    if pid == 0:  # what a pyroute2 helper interrupted by a signal would do
        try:
            host.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    spaces, links = leftovers()
    assert host.name in spaces and host.fd >= 0  # still ours, still there


def test_without_capabilities_one_line_and_status_2(monkeypatch, capsys) -> None:
    from xlio import cli
    from xlio.backends import netns

    monkeypatch.setattr(netns, "effective_capabilities", lambda: 1 << netns.CAP_NET_ADMIN)
    assert cli.main(["serve", "--path", "l1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [
        "xlio serve: error: real taps need CAP_SYS_ADMIN (network namespaces and /dev/net/tun)"
    ]
    monkeypatch.setattr(netns, "effective_capabilities", lambda: 0)
    assert cli.main(["demo", "--tap"]) == 2
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN" in capsys.readouterr().err
