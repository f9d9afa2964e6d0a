"""Test hosts: a network namespace holding the kernel side of our tap.

:class:`NamespacedTap` creates a namespace with a unique ``xlio-`` name,
opens a tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte virtio-net header
so the header crosses unchanged) in the root namespace, moves its link into
the namespace, gives it the host address and brings it up, with IPv6 off so
the kernel's own chatter (MLD, router solicitations) stays off the wire.
The process keeps the tap's file descriptor: frames written on it arrive in
the namespace's kernel stack, frames that stack sends come out of it.

Cleanup is unconditional: :meth:`NamespacedTap.close` (also on ``__exit__``,
on any exception, on KeyboardInterrupt) closes the tap, which deletes it, and
removes the namespace; it is idempotent, and a second signal arriving during
it does not cut it short. Each namespace has an owner record in
``/run/xlio`` (PID and start time): a run killed with SIGKILL cannot clean
up, and the next run (or ``xlio cleanup``) removes namespaces whose owner
is dead, and only those. It acts only in the process that
built the host: pyroute2 forks helper processes (to open sockets inside a
namespace) that inherit our state, and a helper interrupted by a signal must
not unwind into our cleanup and remove the namespace from under its parent.
pyroute2's calls block, so all of this runs outside the trio loop.

Default addressing (RFC 2544's benchmarking range, never routed): host side
198.18.0.1/24 in the namespace, L2 guest 198.18.0.2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_SIZE = 12

#: The tap's queue toward our reader, in frames (Linux's default is 1,000): a
#: burst from the namespace waits there while L2's inbox is full.
TAP_TXQUEUELEN = 10_000

HOST_IP = "198.18.0.1"
GUEST_IP = "198.18.0.2"
PREFIX = 24


class HostSetupError(Exception):
    """What is missing to build a test host (root, /dev/net/tun, a valid name)."""


CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def effective_capabilities() -> int:
    """This process's effective capability set (CapEff of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    """Raise :class:`HostSetupError` naming what is missing for real taps.

    Checked by capability, not by user id: creating a namespace needs
    CAP_SYS_ADMIN, a tap and its addresses CAP_NET_ADMIN.
    """
    caps = effective_capabilities()
    missing = [
        name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
        if not caps >> bit & 1
    ]  # fmt: skip
    if missing:
        raise HostSetupError(
            f"real taps need {' and '.join(missing)} (network namespaces and /dev/net/tun)"
        )
    if not os.path.exists("/dev/net/tun"):
        raise HostSetupError("/dev/net/tun is missing (no TUN/TAP support on this machine)")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise HostSetupError("/dev/net/tun is not readable and writable")


# ---------------------------------------------------------------- owners
#: One file per namespace xlio created, naming the process that owns it.
OWNERS = "/run/xlio"


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): a PID plus this is unique."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record_owner(name: str) -> None:
    os.makedirs(OWNERS, mode=0o700, exist_ok=True)
    pid = os.getpid()
    with open(os.path.join(OWNERS, name), "w") as f:
        f.write(f"{pid} {_start_time(pid)}\n")


def _forget_owner(name: str) -> None:
    try:
        os.unlink(os.path.join(OWNERS, name))
    except FileNotFoundError:
        pass


def owner_alive(name: str) -> bool | None:
    """Whether the process that created namespace ``name`` still runs (None: unknown)."""
    try:
        with open(os.path.join(OWNERS, name)) as f:
            pid_text, start = f.read().split()
    except (OSError, ValueError):
        return None
    return _start_time(int(pid_text)) == start


def reap_orphans() -> list[str]:
    """Remove the ``xlio-`` namespaces whose owner died (a SIGKILLed run), and only those.

    A namespace with no owner record is not ours to judge and stays.
    """
    from pyroute2 import netns

    removed = []
    for name in netns.listnetns():
        if name.startswith("xlio-") and owner_alive(name) is False:
            netns.remove(name)
            _forget_owner(name)
            removed.append(name)
    return removed


#: What a namespace name of ours looks like (it becomes a file in /run/netns).
NETNS_NAME = re.compile(r"xlio-[A-Za-z0-9_.-]+")
NAME_MAX = 255


def netns_name_problem(name: str) -> str | None:
    """Why ``name`` is not a namespace name xlio may create (None: it is)."""
    if not NETNS_NAME.fullmatch(name):
        return f"namespace name {name!r} must be xlio- followed by letters, digits, '-', '_' or '.'"
    if ".." in name:
        return f"namespace name {name!r} must not contain '..'"
    if len(name.encode()) > NAME_MAX:
        return f"namespace name is longer than {NAME_MAX} bytes"
    return None


#: A run's tag (letters and digits, at most 4): set in the environment, every
#: namespace and tap this process and its children create carries it, so a
#: run (the test suite) can tell what it made from what else is on the host.
RUN_TAG_ENV = "XLIO_RUN_TAG"
RUN_TAG = re.compile(r"[a-z0-9]{1,4}")


def run_tag() -> str:
    """This run's tag from ``$XLIO_RUN_TAG`` ('' when unset or not a valid tag)."""
    tag = os.environ.get(RUN_TAG_ENV, "")
    return tag if RUN_TAG.fullmatch(tag) else ""


def netns_prefix(tag: str | None = None) -> str:
    """What the names of a run's namespaces start with: ``xlio-TAG-`` (``xlio-`` untagged)."""
    tag = run_tag() if tag is None else tag
    return f"xlio-{tag}-" if tag else "xlio-"


def tap_prefix(tag: str | None = None) -> str:
    """What a run's tap names start with: ``xlioTAG-`` (``xlio`` untagged; 15 bytes at most)."""
    tag = run_tag() if tag is None else tag
    return f"xlio{tag}-" if tag else "xlio"


def unique_netns() -> str:
    return f"{netns_prefix()}{os.getpid()}-{secrets.token_hex(3)}"


def open_tap(ifname: str) -> int:
    """A non-blocking tap fd with a 12-byte virtio-net header on every frame."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError:
        os.close(fd)
        raise
    return fd


def _disable_ipv6(name: str) -> None:
    from pyroute2 import netns

    netns.pushns(name)
    try:
        for knob in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "w") as f:
                f.write("1")
    except OSError as e:
        if e.errno != errno.ENOENT:  # a kernel without IPv6 has nothing to disable
            raise
    finally:
        netns.popns()


@dataclass
class HostInfo:
    netns: str
    ifname: str
    host_ip: str
    guest_ip: str
    prefix: int
    host_mac: bytes


class NamespacedTap:
    """A namespace with our tap's kernel side in it (see the module docstring)."""

    def __init__(
        self,
        netns_name: str | None = None,
        *,
        host_ip: str = HOST_IP,
        guest_ip: str = GUEST_IP,
        prefix: int = PREFIX,
    ) -> None:
        name = netns_name or unique_netns()
        problem = netns_name_problem(name)
        if problem:
            raise HostSetupError(problem)
        self.name = name
        self.ifname = tap_prefix() + secrets.token_hex(3)[: 15 - len(tap_prefix())]
        self.host_ip = host_ip
        self.guest_ip = guest_ip
        self.prefix = prefix
        self.fd = -1
        self._created_ns = False
        self._owner = os.getpid()
        self.info: HostInfo | None = None

    def open(self) -> HostInfo:
        from pyroute2 import IPRoute, NetNS, netns

        check_privileges()
        reap_orphans()  # what a killed run left behind
        if self.name in netns.listnetns():
            raise HostSetupError(f"namespace {self.name} already exists")
        try:
            self._created_ns = True  # set first: a signal right after create cannot leak it
            _record_owner(self.name)
            with _signals_held():  # pyroute2 forks a child to mount it: let it finish first
                netns.create(self.name)
            _disable_ipv6(self.name)
            self.fd = open_tap(self.ifname)
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.ifname)[0]
                ipr.link("set", index=idx, net_ns_fd=self.name)
            with NetNS(self.name) as ns:
                idx = ns.link_lookup(ifname=self.ifname)[0]
                ns.addr("add", index=idx, address=self.host_ip, prefixlen=self.prefix)
                # room for a burst: the kernel queues what the guest has not read yet
                ns.link("set", index=idx, state="up", txqlen=TAP_TXQUEUELEN)
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                mac = ns.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        except BaseException:
            self.close()
            raise
        self.info = HostInfo(
            self.name, self.ifname, self.host_ip, self.guest_ip, self.prefix,
            bytes(int(x, 16) for x in mac.split(":")),
        )  # fmt: skip
        return self.info

    def close(self) -> None:
        """Delete the tap and the namespace; safe to call more than once.

        In a forked child (pyroute2's helpers) this does nothing: the host
        belongs to the process that built it.
        """
        if os.getpid() != self._owner:
            return
        interrupted: BaseException | None = None
        for _ in range(10):  # a signal during cleanup: finish the cleanup, then re-raise
            try:
                self._close_once()
                break
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

    def _close_once(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        if self._created_ns:
            from pyroute2 import netns

            if self.name in netns.listnetns():
                netns.remove(self.name)
            _forget_owner(self.name)
            self._created_ns = False

    def __enter__(self) -> HostInfo:
        return self.open()

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextmanager
def _signals_held() -> Iterator[None]:
    """Stop signals stay pending (blocked) inside the block, delivered after it.

    ``netns.create`` forks a child that unshares and bind-mounts the new
    namespace onto its file; a stop raised while that child is still at work
    would remove the file before the child mounts it again, leaving it behind.
    """
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def leftovers(tag: str | None = None) -> tuple[list[str], list[str]]:
    """The namespaces and root-namespace links of run ``tag`` that exist now
    (default: this run's, ``$XLIO_RUN_TAG``; ``""``: every ``xlio-`` one)."""
    from pyroute2 import IPRoute, netns

    spaces_of, links_of = netns_prefix(tag), tap_prefix(tag)
    spaces = [n for n in netns.listnetns() if n.startswith(spaces_of)]
    with IPRoute() as ipr:
        links = [
            name
            for link in ipr.get_links()
            if (name := str(link.get_attr("IFLA_IFNAME"))).startswith(links_of)
        ]
    return spaces, links
