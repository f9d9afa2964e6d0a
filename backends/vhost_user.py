"""vhost-user: xlio as the device process a VMM hands its virtio-net rings to.

Theory of operation
-------------------
The protocol is QEMU's ``docs/interop/vhost-user.rst``. The VMM (the
front-end) connects to our unix socket and sends messages: a 12-byte header
(``request u32, flags u32, size u32``; flags carry the version 0x1, REPLY
0x4 and NEED_REPLY 0x8) and ``size`` bytes of payload, file descriptors
riding along in SCM_RIGHTS. :class:`VhostUserDevice` is the back-end's
state machine, sans-IO: :meth:`VhostUserDevice.feed` takes the bytes and
fds that arrived and returns the replies to send; the mapping of a memory
region, the interrupt line and the closing of fds are functions and lists
the edge supplies and reads (``map_region``, ``signal``, ``fds_to_close``),
so a test can play the VMM with bytearrays.

What a connection goes through (as QEMU 7.2 drives it, REFERENCE 14):
GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, SET_VRING_CALL/ERR;
when the guest's driver sets DRIVER_OK: SET_FEATURES, SET_MEM_TABLE (each
region mapped from its fd at its ``mmap_offset``; ring addresses arrive as
the VMM's user addresses and are translated to guest-physical through the
same table, descriptor addresses are guest-physical), then per queue
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK (which
starts the ring) and SET_VRING_CALL; SET_VRING_ENABLE enables it (rings
start disabled once VHOST_USER_F_PROTOCOL_FEATURES is negotiated, enabled
otherwise). When both queues are started and enabled the datapath's
backend serves them (:meth:`~xlio.backends.datapath.Datapath.attach_guest`:
L0's, L1's, or L1's delegated to L0's direct service). GET_VRING_BASE (the
guest's driver reset the device, or the VM stops) stops the ring and
returns its ``last_avail``; a later start resumes from SET_VRING_BASE, so a
reconnecting VMM is served again from its rings' state.

Bad input from the VMM is contained: any message we do not know, a header
or payload of the wrong size, a cut message at the end of the stream, more
or fewer fds than the message takes, regions that overlap or are not whole
pages, rings outside every region, a queue size that is not a power of two
up to 32768, a ring index out of range, a KICK before the memory table,
GET_VRING_BASE of a queue never set up: each raises :class:`ProtocolError`,
whose message is the one log line, and the edge ends the connection. Every
guest access goes through :class:`~xlio.sim.memory.MappedHost`, which
touches nothing outside the mapped regions. With REPLY_ACK negotiated a
message that asks for a reply (NEED_REPLY) gets u64 0 once it is done.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from xlio.sim.memory import PAGE_SIZE, GuestMemory, MappedHost, MemoryFault
from xlio.virtio import MAX_QUEUE_SIZE, VIRTIO_NET_F_MAC, valid_queue_size

from .datapath import Datapath
from .direct import DIRECT_FEATURES, QueueState
from .shadow import Shadows
from .virtqueue import queue_spans, span_problem


class Request(IntEnum):
    """Front-end message types (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3


HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEM_HEADER = struct.Struct("<II")  # nregions, padding
REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION_MASK = 0x3
#: bit 8 of a KICK/CALL/ERR payload: no fd comes with the message
VRING_NOFD = 1 << 8
VRING_INDEX_MASK = 0xFF
#: The feature bit that says the front-end speaks protocol features.
F_PROTOCOL_FEATURES = 30
MAX_REGIONS = 8  # QEMU's VHOST_MEMORY_BASELINE_NREGIONS
#: Largest payload a message may carry here: the memory table with every
#: region (8 + 32 * 8 bytes) is the largest we take.
MAX_PAYLOAD = MEM_HEADER.size + REGION.size * MAX_REGIONS
NUM_QUEUES = 2  # one queue pair: 0 receives, 1 transmits
MAX_FDS = MAX_REGIONS

#: What the device offers: what the backends serve (``direct.DIRECT_FEATURES``)
#: but MAC, which is QEMU's to answer, and that it speaks protocol features.
#: Refused: GUEST_TSO4/6 (the tap would need TUNSETOFFLOAD and the device
#: RX frames of up to 64 KiB spread over mergeable buffers), MQ (one queue
#: pair), ACCESS_PLATFORM (QEMU then wants the back-end channel).
DEVICE_FEATURES = (DIRECT_FEATURES & ~(1 << VIRTIO_NET_F_MAC)) | (1 << F_PROTOCOL_FEATURES)
PROTOCOL_FEATURES = 1 << ProtocolFeature.REPLY_ACK


class ProtocolError(Exception):
    """The front-end sent something we will not take: log the message, close."""


@dataclass(frozen=True)
class Region:
    """One region of the memory table."""

    gpa: int
    size: int
    uaddr: int  # the front-end's user address of the region
    mmap_offset: int
    fd: int


@dataclass
class Vring:
    """What the front-end has told us of one queue."""

    num: int | None = None
    addr: tuple[int, int, int] | None = None  # desc, avail, used (user addresses)
    base: int = 0  # last_avail to start from
    kick: int | None = None  # fd
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False


@dataclass
class NotifyCounts:
    """A queue's notifications, as the real driver made and wanted them."""

    kicks: int = 0  # eventfd counts read: each was one notify write (one exit)
    kick_reads: int = 0  # eventfd reads: passes of the backend
    interrupts: int = 0  # call eventfd writes


@dataclass
class Mapped:
    """The memory table as mapped: the regions, their buffers, the view."""

    regions: list[Region]
    host: MappedHost
    mem: GuestMemory
    buffers: list[Any] = field(default_factory=list)


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


class VhostUserDevice:
    """The back-end of one vhost-user connection (see the module docstring).

    ``map_region(fd, offset, size)`` returns a buffer of ``size`` bytes of
    the fd from ``offset`` (the edge's mmap); ``unmap(buffer)`` undoes it.
    ``dp`` is the datapath whose backend serves the rings; ``shadows``, when
    given, charge the same events on the other paths; ``signal_fd(fd)``
    raises an interrupt on a call fd.
    """

    def __init__(
        self,
        dp: Datapath,
        map_region: Callable[[int, int, int], Any],
        unmap: Callable[[Any], None],
        shadows: Shadows | None = None,
        signal_fd: Callable[[int], None] = lambda fd: None,
    ) -> None:
        self.dp = dp
        self.signal_fd = signal_fd  # an interrupt: the edge writes the call eventfd
        self.shadows = shadows  # the same events charged on the other paths
        self.map_region = map_region
        self.unmap = unmap
        self.buffer = b""
        self.pending_fds: list[int] = []
        #: fds the edge must close (ours no longer): replaced, stopped, refused
        self.fds_to_close: list[int] = []
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.vrings = [Vring() for _ in range(NUM_QUEUES)]
        self.memory: Mapped | None = None
        self.serving = False
        self.notify = [NotifyCounts() for _ in range(NUM_QUEUES)]
        self.messages: Counter[str] = Counter()
        self.attaches = 0
        #: the datapath's totals when this connection began (it may have served others)
        self.served_before = dp.served()

    # ------------------------------------------------------------- framing
    def feed(self, data: bytes, fds: list[int]) -> list[bytes]:
        """Bytes and fds that arrived; the replies to send, in order.
        Raises :class:`ProtocolError` (the connection ends)."""
        self.pending_fds += fds
        self.buffer += data
        replies: list[bytes] = []
        while len(self.buffer) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self.buffer)
            if size > MAX_PAYLOAD:
                raise ProtocolError(
                    f"{request_name(request)}: payload of {size} bytes (at most {MAX_PAYLOAD})"
                )
            if flags & VERSION_MASK != VERSION:
                raise ProtocolError(f"{request_name(request)}: version {flags & VERSION_MASK}")
            if len(self.buffer) < HEADER.size + size:
                break
            payload = self.buffer[HEADER.size : HEADER.size + size]
            self.buffer = self.buffer[HEADER.size + size :]
            fds_now, self.pending_fds = self.pending_fds, []
            reply = self._handle(request, flags, payload, fds_now)
            if reply is not None:
                replies.append(reply)
        if len(self.pending_fds) > MAX_FDS:
            raise ProtocolError(f"{len(self.pending_fds)} fds with no message")
        return replies

    def end_of_stream(self) -> str | None:
        """The front-end closed: what it left unfinished (None: nothing)."""
        if self.buffer:
            return f"connection closed inside a message ({len(self.buffer)} bytes of it)"
        return None

    def _reply(self, request: int, payload: bytes) -> bytes:
        return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload

    def _handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        name = request_name(request)
        self.messages[name] += 1
        try:
            req = Request(request)
        except ValueError:
            self.fds_to_close += fds
            raise ProtocolError(f"unknown request {request}") from None
        handler = _HANDLERS.get(req)
        if handler is None:
            self.fds_to_close += fds
            raise ProtocolError(f"{name}: not supported (its feature was never offered)")
        want, takes = handler.sizes(payload)
        if not want(len(payload)):
            self.fds_to_close += fds
            raise ProtocolError(f"{name}: payload of {len(payload)} bytes")
        if len(fds) != takes:
            self.fds_to_close += fds
            raise ProtocolError(f"{name}: {len(fds)} fds where it takes {takes}")
        try:
            out = handler.run(self, payload, fds)
        except MemoryFault as e:
            raise ProtocolError(f"{name}: {e}") from None
        if out is not None:
            return self._reply(request, out)
        if flags & FLAG_NEED_REPLY and self.protocol_features >> ProtocolFeature.REPLY_ACK & 1:
            return self._reply(request, U64.pack(0))
        return None

    # ------------------------------------------------------------- messages
    def _vring(self, index: int, name: str) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise ProtocolError(f"{name}: queue {index} (there are {NUM_QUEUES})")
        return self.vrings[index]

    def get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(DEVICE_FEATURES)

    def set_features(self, payload: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack(payload)
        if features & ~DEVICE_FEATURES:
            raise ProtocolError(
                f"SET_FEATURES: bits {features & ~DEVICE_FEATURES:#x} never offered"
            )
        self.features = features
        if not features >> F_PROTOCOL_FEATURES & 1:  # rings are enabled from the start
            for v in self.vrings:
                v.enabled = True

    def get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(PROTOCOL_FEATURES)

    def set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack(payload)
        if features & ~PROTOCOL_FEATURES:
            raise ProtocolError(
                f"SET_PROTOCOL_FEATURES: bits {features & ~PROTOCOL_FEATURES:#x} never offered"
            )
        self.protocol_features = features

    def set_owner(self, payload: bytes, fds: list[int]) -> None:
        self.owner = True

    def reset_owner(self, payload: bytes, fds: list[int]) -> None:
        """The front-end gives the device up: every ring stops, back to scratch."""
        self.close()
        self.owner = False
        self.features = 0
        self.vrings = [Vring() for _ in range(NUM_QUEUES)]

    def get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(NUM_QUEUES)

    def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        n, _ = MEM_HEADER.unpack_from(payload)
        regions = []
        for i in range(n):
            gpa, size, uaddr, offset = REGION.unpack_from(
                payload, MEM_HEADER.size + REGION.size * i
            )
            regions.append(Region(gpa, size, uaddr, offset, fds[i]))
        self._stop_serving()
        self._unmap()
        problem = _regions_problem(regions)
        if problem is not None:
            self.fds_to_close += fds
            raise ProtocolError(f"SET_MEM_TABLE: {problem}")
        buffers: list[Any] = []
        try:
            for r in regions:
                buffers.append(self.map_region(r.fd, r.mmap_offset, r.size))
        except OSError as e:
            for b in buffers:
                self.unmap(b)
            self.fds_to_close += fds
            raise ProtocolError(f"SET_MEM_TABLE: mapping a region failed: {e}") from None
        # the mappings hold the memory: the fds are not needed any more
        self.fds_to_close += fds
        host = MappedHost([(r.gpa, r.size, b) for r, b in zip(regions, buffers, strict=True)])
        self.memory = Mapped(regions, host, host.memory("guest"), buffers)
        self._maybe_serve()

    def set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = VRING_STATE.unpack(payload)
        v = self._vring(index, "SET_VRING_NUM")
        if not valid_queue_size(num):
            raise ProtocolError(
                f"SET_VRING_NUM: queue {index} size {num} (a power of two up to {MAX_QUEUE_SIZE})"
            )
        v.num = num

    def set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        index, _flags, desc, used, avail, _log = VRING_ADDR.unpack(payload)
        self._vring(index, "SET_VRING_ADDR").addr = (desc, avail, used)

    def set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, num = VRING_STATE.unpack(payload)
        v = self._vring(index, "SET_VRING_BASE")
        if num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: queue {index} base {num} is not a ring index")
        v.base = num

    def get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        index, _ = VRING_STATE.unpack(payload)
        v = self._vring(index, "GET_VRING_BASE")
        if v.num is None or v.addr is None:
            raise ProtocolError(f"GET_VRING_BASE: queue {index} was never set up")
        self._stop_serving()
        v.started = False
        self._drop_fd(v, "kick")
        return VRING_STATE.pack(index, v.base)

    def _fd_message(self, payload: bytes, fds: list[int], name: str) -> tuple[Vring, int | None]:
        (u,) = U64.unpack(payload)
        v = self._vring(u & VRING_INDEX_MASK, name)
        nofd = bool(u & VRING_NOFD)
        if nofd != (not fds):
            self.fds_to_close += fds
            raise ProtocolError(
                f"{name}: {len(fds)} fds with the no-fd flag {'set' if nofd else 'clear'}"
            )
        return v, (fds[0] if fds else None)

    def set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        v, fd = self._fd_message(payload, fds, "SET_VRING_KICK")
        if fd is None:
            raise ProtocolError("SET_VRING_KICK: polling rings (no kick fd) are not served")
        if self.memory is None:
            self.fds_to_close.append(fd)
            raise ProtocolError("SET_VRING_KICK before SET_MEM_TABLE")
        if v.num is None or v.addr is None:
            self.fds_to_close.append(fd)
            raise ProtocolError("SET_VRING_KICK: queue not set up (SET_VRING_NUM and ADDR first)")
        self._drop_fd(v, "kick")
        v.kick = fd
        self._stop_serving()
        v.started = True
        self._maybe_serve()

    def set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        v, fd = self._fd_message(payload, fds, "SET_VRING_CALL")
        self._drop_fd(v, "call")
        v.call = fd

    def set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        v, fd = self._fd_message(payload, fds, "SET_VRING_ERR")
        self._drop_fd(v, "err")
        v.err = fd

    def set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, num = VRING_STATE.unpack(payload)
        if index >= NUM_QUEUES and not num:
            return  # QEMU disables queues it may have: ours are two, the rest never were
        v = self._vring(index, "SET_VRING_ENABLE")
        if bool(num) != v.enabled:
            self._stop_serving()
            v.enabled = bool(num)
            self._maybe_serve()

    # ------------------------------------------------------------- serving
    def _drop_fd(self, v: Vring, which: str) -> None:
        fd = getattr(v, which)
        if fd is not None:
            self.fds_to_close.append(fd)
            setattr(v, which, None)

    def _queue_state(self, index: int, mem: GuestMemory, host: MappedHost) -> QueueState:
        v = self.vrings[index]
        assert v.num is not None and v.addr is not None
        desc, avail, used = (self._guest_physical(a, index) for a in v.addr)
        spans = queue_spans(("rx", "tx")[index], v.num, desc, avail, used)
        problem = span_problem(spans, mem.size)
        if problem is not None:
            raise ProtocolError(f"queue {index}: {problem}")
        for start, end, what, _ in spans:
            for page in range(start // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1):
                try:
                    host.translate(page * PAGE_SIZE)
                except MemoryFault:
                    raise ProtocolError(f"queue {index}: {what} is in no region") from None
        used_idx = mem.read_u16(used + 2)  # where the driver has seen the device get to
        return QueueState(v.num, desc, avail, used, v.base, used_idx, used_idx)

    def _guest_physical(self, uaddr: int, index: int) -> int:
        assert self.memory is not None
        for r in self.memory.regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                return r.gpa + uaddr - r.uaddr
        raise ProtocolError(f"queue {index}: ring address {uaddr:#x} is in no region")

    def _maybe_serve(self) -> None:
        if self.serving or self.memory is None:
            return
        if not all(v.started and v.enabled for v in self.vrings):
            return
        m = self.memory
        rx, tx = (self._queue_state(i, m.mem, m.host) for i in range(NUM_QUEUES))
        features = self.features & ~(1 << F_PROTOCOL_FEATURES)
        self.dp.attach_guest(m.mem, features, rx, tx, self._signal)
        if self.shadows is not None:
            self.shadows.attach(m.mem, features, rx, tx)
        self.serving = True
        self.attaches += 1

    def _stop_serving(self) -> None:
        if not self.serving:
            return
        self.serving = False
        state = self.dp.detach_guest()
        if self.shadows is not None:
            self.shadows.detach()
        if state is not None:
            for v, s in zip(self.vrings, state, strict=True):
                v.base = s.last_avail

    def _signal(self, index: int) -> None:
        v = self.vrings[index]
        self.notify[index].interrupts += 1
        if v.call is not None:
            self.signal_fd(v.call)

    def kick(self, index: int, count: int) -> None:
        """The driver's notify writes on queue ``index`` (``count`` of them, read
        together from its kick eventfd): the datapath serves them."""
        n = self.notify[index]
        n.kicks += count
        n.kick_reads += 1
        if self.serving:
            self.dp.kick(index, exits=max(count, 1))
            self.dp.pump()

    def kick_fds(self) -> dict[int, int]:
        """Queue -> kick fd of every started ring: what the edge watches."""
        return {i: v.kick for i, v in enumerate(self.vrings) if v.started and v.kick is not None}

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """Per queue, as the real driver made and wanted its notifications:
        kicks (notify writes, each an exit), the available entries the device
        consumed and how many of them no kick of their own announced (the
        driver published them with notifications off, EVENT_IDX's
        ``avail_event``, or behind another entry's kick), interrupts
        signalled and the used-entry publishes whose interrupt the driver
        suppressed (``used_event``), and the chains that came in an indirect
        table. Counted since the connection began."""
        served = self.dp.served()
        out = {}
        for i, name in enumerate(("rx", "tx")):
            n = self.notify[i]
            chains = served[f"{name}_avail_entries"] - self.served_before[f"{name}_avail_entries"]
            out[name] = {
                "kicks": n.kicks,
                "kick_reads": n.kick_reads,
                "avail_entries": chains,
                "kicks_suppressed": max(0, chains - n.kicks),
                "interrupts": n.interrupts,
                "interrupts_suppressed": served[f"{name}_interrupts_suppressed"]
                - self.served_before[f"{name}_interrupts_suppressed"],
                "indirect_tables": served[f"{name}_indirect_tables"]
                - self.served_before[f"{name}_indirect_tables"],
            }
        return out

    # ------------------------------------------------------------- the end
    def _unmap(self) -> None:
        m = self.memory
        if m is None:
            return
        self.memory = None
        m.host.release()
        for b in m.buffers:
            self.unmap(b)

    def close(self) -> None:
        """The connection ends: stop serving, unmap, hand every fd back to close."""
        self._stop_serving()
        self._unmap()
        for v in self.vrings:
            for which in ("kick", "call", "err"):
                self._drop_fd(v, which)
            v.started = False
        self.fds_to_close += self.pending_fds
        self.pending_fds = []


@dataclass(frozen=True)
class FrontendMessage:
    """One message of a front-end's handshake: its bytes, the fd it carries
    (``"memory"``, ``"call"`` or ``"kick"`` with ``queue``; None: none), and
    whether the back-end answers it."""

    data: bytes
    fd: str | None = None
    queue: int = 0
    answered: bool = False


def frontend_handshake(
    features: int, mem_size: int, uaddr: int, queues: dict[int, tuple[int, int, int, int]]
) -> list[FrontendMessage]:
    """What a VMM sends when its guest's driver sets DRIVER_OK, as QEMU does
    (REFERENCE 14), for one region of ``mem_size`` bytes at guest-physical 0
    that the VMM has at ``uaddr``, and ``queues`` (index -> size, desc, avail,
    used, guest-physical), the driver having taken ``features``; the last
    message asks for REPLY_ACK's answer, so that the rings are served once
    it comes. For the front-ends xlio plays itself (tests, benchmarks)."""

    def m(req: int, payload: bytes = b"", **kw: Any) -> FrontendMessage:
        flags = VERSION | (FLAG_NEED_REPLY if kw.pop("ack", False) else 0)
        return FrontendMessage(HEADER.pack(req, flags, len(payload)) + payload, **kw)

    out = [
        m(Request.GET_FEATURES, answered=True),
        m(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtocolFeature.REPLY_ACK)),
        m(Request.SET_OWNER),
        m(Request.SET_FEATURES, U64.pack(features | 1 << F_PROTOCOL_FEATURES)),
        m(Request.SET_MEM_TABLE, MEM_HEADER.pack(1, 0) + REGION.pack(0, mem_size, uaddr, 0),
          fd="memory"),
    ]  # fmt: skip
    last = max(queues)
    for i, (size, desc, avail, used) in sorted(queues.items()):
        out += [
            m(Request.SET_VRING_NUM, VRING_STATE.pack(i, size)),
            m(Request.SET_VRING_BASE, VRING_STATE.pack(i, 0)),
            m(Request.SET_VRING_ADDR,
              VRING_ADDR.pack(i, 0, uaddr + desc, uaddr + used, uaddr + avail, 0)),
            m(Request.SET_VRING_CALL, U64.pack(i), fd="call", queue=i),
            m(Request.SET_VRING_KICK, U64.pack(i), fd="kick", queue=i),
            m(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, 1), ack=i == last,
              answered=i == last),
        ]  # fmt: skip
    return out


def _regions_problem(regions: list[Region]) -> str | None:
    if not 1 <= len(regions) <= MAX_REGIONS:
        return f"{len(regions)} regions (1 to {MAX_REGIONS})"
    for r in regions:
        if r.size <= 0 or r.size % PAGE_SIZE or r.gpa % PAGE_SIZE or r.mmap_offset % PAGE_SIZE:
            return f"region at {r.gpa:#x} of {r.size:#x} bytes is not whole pages"
        if r.gpa + r.size > 1 << 52 or r.uaddr + r.size > 1 << 64 or r.mmap_offset > 1 << 52:
            return f"region at {r.gpa:#x} lies beyond any address"
    for key in ("gpa", "uaddr"):
        ordered = sorted(regions, key=lambda r: getattr(r, key))
        for a, b in zip(ordered, ordered[1:], strict=False):
            if getattr(b, key) < getattr(a, key) + a.size:
                return f"regions at {key} {getattr(a, key):#x} and {getattr(b, key):#x} overlap"
    return None


@dataclass(frozen=True)
class _Handler:
    run: Callable[[VhostUserDevice, bytes, list[int]], bytes | None]
    payload: int | None  # fixed size; None: the memory table's
    fds: int = 0
    fd_message: bool = False  # KICK, CALL, ERR: one fd unless the no-fd flag

    def sizes(self, payload: bytes) -> tuple[Callable[[int], bool], int]:
        if self.payload is None:  # nregions regions follow their count
            if len(payload) < MEM_HEADER.size:
                return (lambda n: False), 0
            k = MEM_HEADER.unpack_from(payload)[0]
            need = MEM_HEADER.size + REGION.size * k
            return (lambda n: k <= MAX_REGIONS and need <= n <= MAX_PAYLOAD), min(k, MAX_FDS)
        size = self.payload
        takes = self.fds
        if self.fd_message and len(payload) == U64.size:
            takes = 0 if U64.unpack(payload)[0] & VRING_NOFD else 1
        return (lambda n: n == size), takes


D = VhostUserDevice
_HANDLERS: dict[Request, _Handler] = {
    Request.GET_FEATURES: _Handler(D.get_features, 0),
    Request.SET_FEATURES: _Handler(D.set_features, U64.size),
    Request.SET_OWNER: _Handler(D.set_owner, 0),
    Request.RESET_OWNER: _Handler(D.reset_owner, 0),
    Request.SET_MEM_TABLE: _Handler(D.set_mem_table, None),
    Request.SET_VRING_NUM: _Handler(D.set_vring_num, VRING_STATE.size),
    Request.SET_VRING_ADDR: _Handler(D.set_vring_addr, VRING_ADDR.size),
    Request.SET_VRING_BASE: _Handler(D.set_vring_base, VRING_STATE.size),
    Request.GET_VRING_BASE: _Handler(D.get_vring_base, VRING_STATE.size),
    Request.SET_VRING_KICK: _Handler(D.set_vring_kick, U64.size, fd_message=True),
    Request.SET_VRING_CALL: _Handler(D.set_vring_call, U64.size, fd_message=True),
    Request.SET_VRING_ERR: _Handler(D.set_vring_err, U64.size, fd_message=True),
    Request.GET_PROTOCOL_FEATURES: _Handler(D.get_protocol_features, 0),
    Request.SET_PROTOCOL_FEATURES: _Handler(D.set_protocol_features, U64.size),
    Request.GET_QUEUE_NUM: _Handler(D.get_queue_num, 0),
    Request.SET_VRING_ENABLE: _Handler(D.set_vring_enable, VRING_STATE.size),
}
