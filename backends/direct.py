"""L0's direct service of L2's virtio-net, and the L1/L0 delegation protocol.

Theory of operation
-------------------
Network I/O is stateless, so once L1 has set a device up, L0 can serve L2's
rings itself and L1 need not see L2's kicks. The cooperation between L1's
backend and L0's is this protocol (the slides' "cooperation between L1/L2
BE"), carried by hypercalls (VMCALL from L1, handled by L0):

1. L1's device model negotiates with L2 as usual: features, queue set-up,
   DRIVER_OK. The control plane (config space, status) stays L1's for good.
2. ``DELEGATE`` (:class:`Delegation`): L1 hands L0 everything a backend
   needs and nothing else: the notify port, the negotiated features, the
   MAC, and per queue its size, the L2 GPAs of its descriptor table,
   available and used rings, and L1's ``last_avail``/``used_idx``.
   L0 validates (:meth:`DirectBackend.delegate`): sizes are powers of two up
   to 32768, features are ones L0 serves (``DIRECT_FEATURES``), the MAC
   is one unicast address, queue positions are ring indices, the six rings
   are aligned, inside L2's memory, mapped by EPT12 and disjoint. A refusal
   changes nothing: L1 keeps serving.
3. On acceptance L1 clears the notify port's bit in vmcs12's I/O bitmap, so
   L2's kicks are L0's (``sim.routing``: an exit L1 did not ask for is L0's),
   and stops its own backend for the device.
4. Data plane, L1 never involved: L0 pops L2's TX chains and fills its RX
   chains through the L2 GPA -> host translation service of
   ``sim.vept.VirtualEpt`` (which forgets a translation exactly when L1's
   EPT12 change becomes visible to L0), puts frames on its wire, and injects
   interrupts into L2 itself.
5. ``REVOKE``: L1 asks for the device back (before a reset, a migration, a
   config change). L0 stops between chains and returns
   :class:`Handback`: each queue's ``last_avail``/``used_idx``/``signalled``.
   L0 holds no frames of its own: what waits for L2's RX waits on L0's wire,
   which both paths share. L1 restores unconditional I/O
   exiting and its backend resumes exactly there, first draining anything L2
   published (and notified L0 about) before the hand-back: no frame is lost
   or delivered twice.

No per-connection state is shared: what L1 set up is handed over at step 2,
what L0 holds is handed back at step 5.
"""

from __future__ import annotations

from dataclasses import dataclass

from xlio.sim.memory import GuestMemory, MemoryFault
from xlio.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
    valid_queue_size,
)

from .device import NetDevice
from .virtqueue import DeviceQueue, queue_spans, span_problem

#: Features every backend here serves, L0's direct one included: what xlio's
#: own driver takes (VERSION_1, MAC, EVENT_IDX) and what Linux's virtio-net
#: takes from a vhost-user device (indirect tables, mergeable RX buffers, TX
#: checksum and TCP segmentation offload, RX checksum trust).
DIRECT_FEATURES = sum(
    1 << b
    for b in (
        VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
        VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    )
)  # fmt: skip


@dataclass(frozen=True)
class QueueState:
    size: int
    desc: int
    avail: int
    used: int
    last_avail: int
    used_idx: int
    signalled: int


@dataclass(frozen=True)
class Delegation:
    """What L1 hands L0 in the DELEGATE hypercall."""

    notify_port: int
    features: int
    mac: bytes
    rx: QueueState
    tx: QueueState


@dataclass
class Handback:
    """What L0 returns to L1 on REVOKE."""

    rx: QueueState
    tx: QueueState


class DelegationRefused(Exception):
    """L0 validated a DELEGATE and said no (the reason is the message)."""


def queue_state(q: DeviceQueue) -> QueueState:
    return QueueState(q.size, q.desc, q.avail, q.used, q.last_avail, q.used_idx, q.signalled)


def fresh_queue(size: int, desc: int, avail: int, used: int) -> QueueState:
    """A queue the driver has just set up: nothing consumed, nothing used."""
    return QueueState(size, desc, avail, used, 0, 0, 0)


def device_queue(mem: GuestMemory, s: QueueState, features: int) -> DeviceQueue:
    q = DeviceQueue(
        mem,
        s.size,
        s.desc,
        s.avail,
        s.used,
        bit(features, VIRTIO_F_EVENT_IDX),
        last_avail=s.last_avail,
        used_idx=s.used_idx,
        indirect=bit(features, VIRTIO_F_INDIRECT_DESC),
    )
    q.signalled = s.signalled
    return q


def net_device(
    mem: GuestMemory, rx: QueueState, tx: QueueState, features: int, name: str,
    mac: bytes | None,
) -> NetDevice:  # fmt: skip
    """A backend for a virtio-net function on ``mem``, its queues where ``rx``
    and ``tx`` say, serving the negotiated ``features``: how every backend
    (L0's, L1's, L0's direct service, L0's device for L1's own NIC) starts."""
    return NetDevice(
        mem, device_queue(mem, rx, features), device_queue(mem, tx, features), name,
        mac=mac, features=features,
    )  # fmt: skip


class DirectBackend:
    """L0's side of the protocol: validate, serve, hand back."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem  # L0's view of L2 memory (the translation service)
        self.device: NetDevice | None = None
        self.delegation: Delegation | None = None
        self.refusals = 0
        self.make_device = net_device  # how L0's device is built (a shadow's builds a stand-in)

    @property
    def active(self) -> bool:
        return self.device is not None

    def _mapped(self, start: int, end: int, what: str) -> None:
        try:
            for page in range(start >> 12, ((end - 1) >> 12) + 1):
                self.mem.translate(page << 12)
        except MemoryFault:
            raise DelegationRefused(f"{what} is not mapped by EPT12") from None

    def _check(self, d: Delegation) -> None:
        if self.device is not None:
            raise DelegationRefused("device already delegated")
        if d.features & ~DIRECT_FEATURES:
            raise DelegationRefused(f"features {d.features & ~DIRECT_FEATURES:#x} not served")
        if not d.features >> VIRTIO_F_VERSION_1 & 1:
            raise DelegationRefused("VIRTIO_F_VERSION_1 not negotiated")
        mac = d.mac
        if len(mac) != 6 or mac[0] & 1 or not any(mac):
            raise DelegationRefused(f"MAC {mac.hex(':')} is not a unicast address")
        spans = []
        for name, q in (("rx", d.rx), ("tx", d.tx)):
            if not valid_queue_size(q.size):
                raise DelegationRefused(f"{name} queue size {q.size} invalid")
            for pos in ("last_avail", "used_idx", "signalled"):
                if not 0 <= getattr(q, pos) <= 0xFFFF:
                    raise DelegationRefused(f"{name} {pos} {getattr(q, pos)} is not a ring index")
            if (q.last_avail - q.used_idx) & 0xFFFF > q.size:
                raise DelegationRefused(f"{name} has more chains in flight than entries")
            spans += queue_spans(name, q.size, q.desc, q.avail, q.used)
        problem = span_problem(spans, self.mem.size)
        if problem is not None:
            raise DelegationRefused(problem)
        for start, end, what, _ in spans:
            self._mapped(start, end, what)

    def delegate(self, d: Delegation) -> None:
        """Validate and accept a DELEGATE; raises :class:`DelegationRefused`.

        Refused: a device already delegated, features L0 does not serve, a MAC
        that is not one unicast address, an invalid queue size, queue
        positions that are not 16-bit ring indices or claim more chains in
        flight than the queue holds, rings misaligned, outside L2 memory,
        overlapping one another or not mapped by EPT12.
        """
        try:
            self._check(d)
        except DelegationRefused:
            self.refusals += 1
            raise
        self.device = self.make_device(self.mem, d.rx, d.tx, d.features, "l0-direct", d.mac)
        self.delegation = d

    def revoke(self) -> Handback:
        """Stop serving; the queue positions go back to L1. Refused
        (:class:`DelegationRefused`) when nothing is delegated."""
        dev = self.device
        if dev is None:
            self.refusals += 1
            raise DelegationRefused("nothing delegated")
        hb = Handback(queue_state(dev.rxq), queue_state(dev.txq))
        self.device = None
        self.delegation = None
        return hb
