"""A real Linux guest (Debian's 6.1 kernel under QEMU's TCG) served over
vhost-user by ``xlio serve``, on every path, reached by real kernel peers.

No mocks: the guest's own virtio-net driver negotiates, kicks and takes
interrupts; ``ping`` and sockets in the namespace are the peer. Each test
starts ``xlio serve`` as a child (default signal dispositions) and boots
guests on its socket (about 4 s each here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from children import read_until, running, spawn, xlio_args
from taphosts import SKIP, netns_name

from xlio.guestvm import GuestSetupError, boot_image, run_guest

try:
    if shutil.which("qemu-system-x86_64") is None:
        raise GuestSetupError("no qemu-system-x86_64 (Debian's qemu-system-x86)")
    boot_image()
    GUEST_SKIP = SKIP
except GuestSetupError as e:
    GUEST_SKIP = str(e)

pytestmark = pytest.mark.skipif(bool(GUEST_SKIP), reason=GUEST_SKIP or "ok")

HOST = "198.18.0.1"
GUEST = "198.18.0.2"

#: The peer in the namespace: a TFTP server on UDP port 69 (RFC 1350,
#: lockstep: busybox has no UDP nc, its tftp is the guest's UDP client) whose
#: one file is 40,000 bytes of a counter, and a TCP sink on port 5001 that
#: prints the bytes it took once it has the 3,000,000 it expects.
PEER = r"""
import socket, struct, threading
FILE = b"".join(b"%07d\n" % i for i in range(5000))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("198.18.0.1", 69))
def tftp():
    while True:
        req, a = u.recvfrom(600)
        if req[:2] != b"\0\1":
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        block = 1
        while True:
            chunk = FILE[512 * (block - 1): 512 * block]
            s.sendto(struct.pack(">HH", 3, block & 0xFFFF) + chunk, a)
            ack, a = s.recvfrom(600)
            if len(chunk) < 512:
                break
            block += 1
        s.close()
threading.Thread(target=tftp, daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("198.18.0.1", 5001)); t.listen(1); print("listening", flush=True)
c, _ = t.accept(); n = 0
while n < 3000000:
    d = c.recv(1 << 20)
    if not d: break
    n += len(d)
c.close()
print("tcp", n, flush=True)
"""
FILE_MD5 = __import__("hashlib").md5(b"".join(b"%07d\n" % i for i in range(5000))).hexdigest()


@contextmanager
def serving(path: str, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    ns = netns_name("vu")
    with tempfile.TemporaryDirectory(prefix="xlio-vu-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        proc = spawn(xlio_args("serve", "--path", path, "--vhost-user", sock, "--netns", ns,
                               "--json", *extra))  # fmt: skip
        with running(proc):
            read_until(proc, "ready: listening", 30)
            yield proc, sock, ns


def stop(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, json.loads(out), err


def in_ns(ns: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          **kw)  # fmt: skip


def loss(text: str) -> int:
    m = re.search(r"(\d+)% packet loss", text)
    assert m, text
    return int(m.group(1))


@pytest.mark.parametrize("path", ["single", "l1", "l0"])
def test_pings_both_ways_udp_echo_and_a_tcp_stream_on_every_path(path: str) -> None:
    with serving(path) as (proc, sock, ns):
        peer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "listening"
            host_ping: list[subprocess.CompletedProcess[str]] = []

            def ping_guest(line: str) -> None:
                if line.startswith("guest-ready") and not host_ping:
                    threading.Thread(target=lambda: host_ping.append(in_ns(
                        ns, "ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "2", GUEST)),
                    ).start()  # fmt: skip

            cmd = (
                "echo guest-ready; ping -c 20 -i 0.05 -W 2 198.18.0.1; "
                "cd /tmp && tftp -g -r file -l file 198.18.0.1 && md5sum file; "
                "dd if=/dev/zero bs=60000 count=50 2>/dev/null | nc 198.18.0.1 5001; "
                "sleep 2; ip link set eth0 down; "
                "cat /sys/class/net/eth0/statistics/tx_bytes"
            )
            r = run_guest(sock, cmd, 120, echo=ping_guest)
            assert r.status == 0, r.console
            assert loss(r.output) == 0
            assert f"{FILE_MD5}  file" in r.output  # 79 UDP datagrams each way, in order
            tcp = peer.communicate(timeout=10)[0]
            assert "tcp 3000000" in tcp
            assert host_ping and loss(host_ping[0].stdout) == 0
        finally:
            peer.kill()
            peer.wait()
        status, rep, err = stop(proc)
    assert status == 130 and "Traceback" not in err
    vu = rep["vhost_user"]
    assert vu["connections"] == 1 and vu["protocol_errors"] == 0
    assert rep["tap"]["frames_to_peer"] >= 40 and vu["queues"]["tx"]["kicks"] > 0
    # the stream left partly as TSO frames: skbs with page fragments, which
    # Linux posts as indirect tables (INDIRECT_DESC), with their GSO header
    assert vu["queues"]["tx"]["indirect_tables"] > 0
    # serve's count of what L2 sent holds the stream (and its headers, ACKs, pings)
    assert rep["l2_nic"]["tx_bytes_count"] >= 3_000_000
    if path == "l0":
        assert rep["per_op"]["l1_be_exits"] == 0


def test_switching_between_l1_and_l0_loses_and_duplicates_no_frame() -> None:
    with serving("l1", "--switch-every", "0.2") as (proc, sock, ns):
        cmd = (
            "ping -c 100 -i 0.02 -W 2 198.18.0.1 | tail -2; ip link set eth0 down; "
            "cd /sys/class/net/eth0/statistics && cat tx_packets rx_packets"
        )
        r = run_guest(sock, cmd, 120)
        assert r.status == 0, r.console
        assert loss(r.output) == 0
        guest_tx, guest_rx = (int(x) for x in r.output.splitlines()[-2:])
        link = in_ns(ns, "ip", "-s", "-j", "link", "show").stdout
        status, rep, err = stop(proc)
    tap = [i for i in json.loads(link) if i["ifname"].startswith("xlio")][0]["stats64"]
    assert status == 130 and rep["switches"] >= 5
    assert (guest_tx, guest_rx) == (tap["rx"]["packets"], tap["tx"]["packets"])


def test_virtio_net_reloaded_in_the_guest_is_renegotiated_and_served_again() -> None:
    with serving("l0") as (proc, sock, ns):
        cmd = (
            "ping -c 5 -i 0.1 -W 2 198.18.0.1 | tail -2; rmmod virtio_net; "
            "insmod /lib/modules/virtio_net.ko; sleep 1; ip link set eth0 up; "
            "ip addr add 198.18.0.2/24 dev eth0; ping -c 5 -i 0.1 -W 2 198.18.0.1 | tail -2"
        )
        r = run_guest(sock, cmd, 120)
        status, rep, err = stop(proc)
    assert r.status == 0 and r.output.count("0% packet loss") == 2, r.console
    assert rep["vhost_user"]["messages"]["GET_VRING_BASE"] >= 4  # both queues, twice
    assert status == 130 and "Traceback" not in err


def _maps_and_fds(pid: int) -> tuple[int, int]:
    maps = sum("memfd:" in line for line in open(f"/proc/{pid}/maps"))
    return maps, len(os.listdir(f"/proc/{pid}/fd"))


def test_qemu_killed_mid_stream_leaves_nothing_and_the_next_guest_is_served() -> None:
    with serving("l1") as (proc, sock, ns):
        before = _maps_and_fds(proc.pid)
        qemu: list[subprocess.Popen[bytes]] = []

        def kill_soon(line: str) -> None:
            if line.startswith("PING") and qemu:
                threading.Timer(1.0, qemu[0].kill).start()

        r = run_guest(sock, "ping -i 0.02 198.18.0.1", 60, echo=kill_soon, started=qemu.append)
        assert r.qemu_status == -signal.SIGKILL and r.status is None
        deadline = time.monotonic() + 10
        while _maps_and_fds(proc.pid) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _maps_and_fds(proc.pid) == before  # no mapping, no fd of the dead VMM
        r2 = run_guest(sock, "ping -c 5 -i 0.1 -W 2 198.18.0.1", 60)
        status, rep, err = stop(proc)
    assert r2.status == 0 and loss(r2.output) == 0
    assert rep["vhost_user"]["connections"] == 2 and "Traceback" not in err
    assert in_ns(ns, "true").returncode != 0  # the namespace is gone


def test_sigint_to_serve_while_a_guest_runs_ends_it_cleanly() -> None:
    with serving("single") as (proc, sock, ns):
        qemu: list[subprocess.Popen[bytes]] = []

        def interrupt(line: str) -> None:
            if line.startswith("64 bytes") and not getattr(interrupt, "done", False):
                interrupt.done = True  # type: ignore[attr-defined]
                proc.send_signal(signal.SIGINT)

        r = run_guest(sock, "ping -c 50 -i 0.05 198.18.0.1", 20, echo=interrupt,
                      started=qemu.append)  # fmt: skip
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
    rep = json.loads(out)
    assert rep["stopped_by"] == "SIGINT" and rep["vhost_user"]["queues"]["tx"]["kicks"] > 0
    assert qemu and qemu[0].poll() is not None and r.seconds < 25
    assert in_ns(ns, "true").returncode != 0


def test_a_reconnecting_qemu_is_served_again_by_the_next_serve_from_its_rings_state() -> None:
    """QEMU's ``reconnect=1``: the back-end goes away (serve ends) and a new
    one listens on the same socket; QEMU connects again, restores the rings'
    positions (SET_VRING_BASE) and the guest's traffic goes on."""
    with tempfile.TemporaryDirectory(prefix="xlio-vu-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        reports: list[dict[str, Any]] = []

        def serve_twice() -> None:
            for path, seconds in (("l1", "7"), ("l0", "30")):
                p = spawn(xlio_args("serve", "--path", path, "--vhost-user", sock, "--netns",
                                    netns_name("rc"), "--duration", seconds, "--json"))  # fmt: skip
                with running(p):
                    out, _ = p.communicate(timeout=60)
                reports.append(json.loads(out))

        t = threading.Thread(target=serve_twice)
        t.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        r = run_guest(sock, "ping -c 60 -i 0.2 -W 1 198.18.0.1 | tail -2", 60)
        t.join(timeout=60)
    assert r.status == 0 and loss(r.output) <= 20, r.console
    first, second = reports
    assert first["vhost_user"]["connections"] == 1 and second["vhost_user"]["connections"] == 1
    assert first["tap"]["frames_to_peer"] > 5 and second["tap"]["frames_to_peer"] > 5


def test_after_a_hostile_frontend_and_with_intervals_a_real_guest_is_served() -> None:
    """A front-end that breaks the protocol gets one line and its connection
    closed; the real guest that connects next is served; ``--interval``
    lines carry the guest's notifications and the other paths' charges."""
    import socket as sk
    import struct

    with serving("l1", "--interval", "1") as (proc, sock, ns):
        bad = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
        bad.connect(sock)
        bad.sendall(struct.pack("<III", 1, 1, 1 << 30))  # GET_FEATURES with a 1 GiB payload
        assert bad.recv(16) == b""
        bad.close()
        r = run_guest(sock, "ping -c 20 -i 0.1 -W 2 198.18.0.1 | tail -2", 60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert r.status == 0 and loss(r.output) == 0, r.console
    intervals = [json.loads(x) for x in out.splitlines() if x.startswith('{"t_s"')]
    rep = json.loads("\n".join(x for x in out.splitlines() if not x.startswith('{"t_s"')))
    assert proc.returncode == 130 and "Traceback" not in err
    assert rep["vhost_user"]["protocol_errors"] == 1 and rep["vhost_user"]["connections"] == 2
    assert sum("vhost-user:" in line for line in err.splitlines()) == 1
    tx_kicks = sum(i["vhost_user"]["tx"]["kicks"] for i in intervals)
    assert 0 < tx_kicks <= rep["vhost_user"]["queues"]["tx"]["kicks"]  # the last may be cut
    assert sum(i["other_paths"]["l0"]["l1_exits"] for i in intervals) > 0


@pytest.mark.parametrize("path", ["single", "l0"])
def test_jumbo_frames_reach_linux_over_mergeable_rx_buffers(path: str) -> None:
    """MTU 9000 both sides: each 8,042-byte echo reply is spread over several
    of Linux's mergeable RX buffers (``num_buffers``), and the guest takes it.
    (On ``l1`` L1's own NIC, xlio's driver with 2,048-byte buffers and no
    mergeable RX, drops such frames: counted, not delivered.)"""
    with serving(path) as (proc, sock, ns):
        link = json.loads(in_ns(ns, "ip", "-j", "link", "show").stdout)
        ifname = next(i["ifname"] for i in link if i["ifname"].startswith("xlio"))
        assert in_ns(ns, "ip", "link", "set", ifname, "mtu", "9000").returncode == 0
        r = run_guest(sock, "ip link set eth0 mtu 9000; ping -c 5 -s 8000 -W 2 198.18.0.1", 60)
        status, rep, err = stop(proc)
    assert r.status == 0 and loss(r.output) == 0, r.console
    nic = rep["l2_nic"]
    assert nic["rx_avail_entries"] >= nic["rx_packets_count"] + 5 * 4  # 4+ buffers a reply
    assert nic["rx_fails"] == 0 and status == 130
