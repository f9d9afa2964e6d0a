"""One L2 NIC, end to end, on one path, charged exit by exit.

Theory of operation
-------------------
A :class:`Datapath` wires the pieces together for ``single``, ``l1`` or
``l0`` and drives them; every piece it calls is sans-IO and every crossing
between levels goes through the machine (:class:`xlio.sim.nested.NestedVmx`),
which charges it.

Memory. L2's memory is laid out by the EPT model (static EPT12 and EPT02, so
no EPT exit happens in steady state) and each level looks at it its own way,
each a :class:`~xlio.sim.memory.GuestMemory`: L2 itself through EPT02 (the
hardware), L1's backend through its own EPT12 (vhost's memory table), L0's
direct backend through the translation service ``VirtualEpt.translate``.
L1's own NIC lives in L1 memory, which L1 and L0 see through EPT01.

Control plane. L2's driver probes its NIC through a register interface whose
accesses are port I/O: in ``single`` L0's device model answers them, nested
L1's does (reflected exits). At DRIVER_OK that device model starts its
backend. On ``l0``, L1 then delegates the device to L0
(:mod:`xlio.backends.direct`).

Data plane. A kick (port I/O to the notify port) is an L2 exit:

* L0 keeps it (``single``, or delegated): L0's backend drains TX onto the wire;
* L1 gets it (``l1``): L1's backend drains TX, relays the frames through L1's
  own NIC (whose kick is an L1 exit, caused by the backend), L0's device for
  that NIC puts them on the wire, and L1 resumes L2.

Receive (:meth:`Datapath.pump`, L0's backend thread): frames from the wire go
straight into L2's RX ring and L0 injects the interrupt (``single``, ``l0``),
or into L1's RX ring with an interrupt for L1, which first forces a reflected
exit of the running L2; L1 receives, its backend copies into L2's ring,
injects L2's interrupt in vmcs12 and resumes L2 (``l1``). L2's interrupt
handler takes the frames, its endpoint answers ARP, ICMP echo and UDP echo,
and the answers go out through the same send path.

Every machine operation of the data plane (a kick's exit, an interrupt, an
EOI, a HLT, L1's VMRESUME) goes through :meth:`Datapath._machine`: it runs
once from a given machine state and is replayed afterwards (the model is
deterministic), so a frame's Python is its data, not its accounting.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable
from itertools import repeat
from typing import Any

from xlio.frontends.virtio_net import (
    RXQ,
    TXQ,
    VirtioNetDriver,
    chain_buffers,
    layout_bytes,
)
from xlio.packets import UDP_DISCARD_PORT, UDP_ECHO_PORT, Endpoint, udp_frame_of_size
from xlio.sim.machine import L0, L1, L2, NestedMachine
from xlio.sim.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, MemoryFault
from xlio.sim.refs import weak_method
from xlio.sim.vmx import ExitReason
from xlio.sim.workloads import VIRTIO_NOTIFY_PORT, build_memory, mmio_kick_exit
from xlio.virtio import (
    NET_HDR_SIZE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
)

from .device import RX_HDR, NetDevice, with_rx_header
from .devicemodel import VIRTIO_CONFIG_PORT, DeviceModel, started_device
from .direct import (
    Delegation,
    DelegationRefused,
    DirectBackend,
    QueueState,
    net_device,
    queue_state,
)
from .wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC, LoopbackWire

#: TX offloads L0's device for L1's own NIC offers (a relayed frame keeps them).
TX_OFFLOADS = (
    (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6)
)
#: Where L1 keeps its own NIC's rings and buffers (L1 GPA), clear of L2's backing.
L1_NIC_BASE = 64 << 20
RX_BATCH = 256  # frames L0's RX thread moves per pass
KICKS = ("pio", "mmio")


def l1_nic_tx_queue_size(queue_size: int, buf_size: int) -> int:
    """L1's own NIC's TX ring: L2's queue size, or more if the largest frame L1's
    backend accepts (65,562 bytes with its header) would not fit one chain of
    L1's buffers, as a relaying bridge's NIC must carry what it was handed."""
    need = chain_buffers(buf_size)
    return max(queue_size, 1 << (need - 1).bit_length())


def _tally(dev: Any) -> Counter[str]:
    """What one L2 backend did, as :meth:`Datapath.served` sums it: its
    metrics, and per queue the available entries it took, the interrupts it
    signalled and saw suppressed, the chains that came in indirect tables."""
    out: Counter[str] = Counter(dev.metrics)
    for name, q in (("rx", dev.rxq), ("tx", dev.txq)):
        out[f"{name}_avail_entries"] += q.popped
        out[f"{name}_interrupts"] += q.interrupts
        out[f"{name}_interrupts_suppressed"] += q.interrupts_suppressed
        out[f"{name}_indirect_tables"] += q.indirect_tables
    return out


def _no_guest(queue: int) -> None:
    """The interrupt line of a datapath that has no real guest attached."""


class Datapath:
    """L2's NIC on one path (see the module docstring)."""

    def __init__(
        self,
        m: NestedMachine,
        path: str,
        *,
        queue_size: int = 256,
        event_idx: bool = True,
        buf_size: int = 2048,
        capture: bool = False,
        l2_mem_mib: int = 64,
        l1_mem_mib: int = 256,
        wire: Any = None,
        kick: str = "pio",
        guest: bool = False,
    ) -> None:
        if kick not in KICKS:
            raise ValueError(f"kick must be one of {', '.join(KICKS)}")
        self.m = m
        self._replayers: dict[Hashable, Callable[[], Any]] = {}  # see _machine
        self.path = path
        self.kick_mode = kick
        self.costs = m.costs
        vept, mmu = build_memory(
            m,
            {
                "l2_mem_gib": l2_mem_mib / 1024,
                "l1_mem_gib": l1_mem_mib / 1024,
                "page_size": "4k",
                "virtual_ept": "vtlb",
                "static_ept": True,
                "static_ept02": True,
                "swap": "l1",
                "avoid_invept": True,
                "defer_rebuild": False,
            },
        )
        self.vept, self.mmu = vept, mmu
        host = vept.host
        l2_size = mmu.l2_pages << PAGE_SHIFT
        # what each view's cached translations depend on: L0's mappings
        # (EPT02, EPT01), and for L1's backend also L1's own EPT12
        l0_epochs = (vept.epoch,)
        l1_epochs = (vept.epoch, mmu.epoch)
        # the parts call back into the Datapath weakly: no cycle (xlio.sim.refs)
        w = weak_method
        self.l2_view = GuestMemory(host, l2_size, w(self._l2_hw), "L2", l0_epochs)
        self.l1_view_of_l2 = GuestMemory(host, l2_size, w(self._l1_vhost), "L1", l1_epochs)
        self.l0_view_of_l2 = GuestMemory(host, l2_size, vept.translate, "L0", l0_epochs)
        self.l1_view = GuestMemory(host, vept.l1mem.size, w(self._l1_own), "L1 memory", l0_epochs)
        self.wire = wire if wire is not None else LoopbackWire(capture=capture)
        self.endpoint = Endpoint(GUEST_MAC, GUEST_IP)
        self.received: list[bytes] | None = [] if capture else None
        self.direct = DirectBackend(self.l0_view_of_l2)
        self.l1_dev: NetDevice | None = None  # L1's backend for L2's NIC
        self.single_dev: NetDevice | None = None  # L0's backend, single-level
        self.l1_pending: deque[bytes] = deque()  # L1 holds these for L2's RX
        self.retired: Counter[str] = Counter()  # see _retire
        #: how L2's backends are built (a shadow datapath builds stand-ins)
        self.l2_device: Callable[..., NetDevice] = net_device
        #: hears of every L2 event: a kick, what L2's backend took from TX and
        #: gave to RX, and when the datapath is done with an event (see
        #: :mod:`xlio.backends.shadow`); None: nobody listens
        self.recorder: Any = None
        self.resets_signalled = 0
        self.l0_nic: NetDevice | None = None  # L0's device for L1's own NIC
        self.l1_nic: VirtioNetDriver | None = None
        nested = path != "single"
        self.model = DeviceModel(
            w(self._l2_config_access), w(self.kick), w(self._start_l2_backend),
            w(self._l2_broken), l2_size, reset=w(self._l2_device_reset),
        )  # fmt: skip
        self._l2_irq_pending = False  # an interrupt for L2 raised while its handler runs
        self._in_l2_handler = False
        #: L2's driver: xlio's own, or (``guest``) a real guest's, which brings
        #: its rings with :meth:`attach_guest` (vhost-user) and takes its
        #: interrupts on ``signal`` (the queue's call eventfd)
        self.driver: VirtioNetDriver | None = None
        self.signal: Callable[[int], None] = _no_guest
        #: L2's driver takes TX completion interrupts (Linux's virtio-net with
        #: napi_tx, 6.1's default); xlio's own reclaims on send and never does
        self.tx_interrupts = guest
        if not guest:
            self.driver = VirtioNetDriver(
                self.l2_view, self.model, queue_size=queue_size, event_idx=event_idx,
                buf_size=buf_size,
            )  # fmt: skip
        if nested:
            l1_model = DeviceModel(
                w(self._l1_config_access), w(self._l1_nic_kick), w(self._start_l1_nic),
                lambda: False, vept.l1mem.size,
            )  # fmt: skip
            self.l1_nic = VirtioNetDriver(
                self.l1_view, l1_model, queue_size=queue_size, event_idx=event_idx,
                buf_size=buf_size, base=L1_NIC_BASE,
                tx_queue_size=l1_nic_tx_queue_size(queue_size, buf_size),
            )  # fmt: skip
            with m.l1_background():  # L1 boots with its own NIC
                self.l1_nic.probe()
        if self.driver is not None:
            self.driver.probe()  # L2 boots (on l0, L1 delegates at DRIVER_OK)

    # ------------------------------------------------------------- translation
    def _l2_hw(self, gpa: int) -> int:
        """L2's own accesses: the hardware walks EPT02 (an EPT violation if absent)."""
        hpa = self.vept.ept02.translate(gpa)
        if hpa is None:
            if not 0 <= gpa < self.l2_view.size:
                raise MemoryFault(f"L2 GPA {gpa:#x} outside L2 memory")
            self.vept.l2_touch(gpa >> PAGE_SHIFT, 1, self.mmu.l2_fault)
            hpa = self.vept.ept02.translate(gpa)
            if hpa is None:
                raise MemoryFault(f"L2 GPA {gpa:#x} not mapped")
        return hpa

    def _l1_vhost(self, gpa: int) -> int:
        """L1's backend: L2 GPA through L1's own EPT12, then L1 memory (EPT01).

        A page L1 swapped out is swapped back in by L1 (its vhost faults on
        it); L0's direct backend cannot do that and counts a drop instead."""
        l1 = self.mmu.ept12.translate(gpa)
        if l1 is None and 0 <= gpa < self.l1_view_of_l2.size:
            self.mmu.fault_in(gpa >> PAGE_SHIFT)
            l1 = self.mmu.ept12.translate(gpa)
        if l1 is None:
            raise MemoryFault(f"L2 GPA {gpa:#x} not mapped by EPT12")
        return self._l1_own(l1)

    def _l1_own(self, l1_gpa: int) -> int:
        if not 0 <= l1_gpa < self.vept.l1mem.size:
            raise MemoryFault(f"L1 GPA {l1_gpa:#x} outside L1 memory")
        frame = self.vept.resolve_l1_frame(l1_gpa >> PAGE_SHIFT)
        return (frame << PAGE_SHIFT) | (l1_gpa & (PAGE_SIZE - 1))

    # ------------------------------------------------------------- control plane
    def _l2_config_access(self, handler: Callable[[], Any]) -> Any:
        """L2's port I/O to its NIC's config space: handled by the device model's level."""
        m = self.m
        level = m.l2_exit(ExitReason.IO_INSTRUCTION, "io_user", port=VIRTIO_CONFIG_PORT)
        try:
            return handler()
        finally:  # whatever the handler does, L1 resumes L2
            if level == L1:
                m.l1_vmresume()

    def _l1_config_access(self, handler: Callable[[], Any]) -> Any:
        self.m.l1_exit(ExitReason.IO_INSTRUCTION, "io_user", cause="l1-own-nic-setup")
        return handler()

    def _start_l2_backend(self, model: DeviceModel) -> NetDevice:
        """DRIVER_OK: the device model starts its backend."""
        return self._serve_l2(*model.queue_states(), model.features)

    def _serve_l2(self, rx: QueueState, tx: QueueState, features: int) -> NetDevice:
        """The backend of this path starts on L2's queues; on ``l0`` L1 then
        delegates the device to L0."""
        make = self.l2_device
        if self.path == "single":
            self.single_dev = started_device(
                self.l0_view_of_l2, rx, tx, features, "l0", GUEST_MAC, make
            )
            return self.single_dev
        dev = self.l1_dev = started_device(
            self.l1_view_of_l2, rx, tx, features, "l1-backend", GUEST_MAC, make
        )
        if self.path == "l0" and not dev.needs_reset:
            try:
                self.l1_delegate()
            except DelegationRefused:
                pass  # L0 said no: L1's backend keeps serving (counted in refusals)
        return dev

    def _l2_device_reset(self) -> None:
        """L2 resets its NIC: whoever serves it stops first (L1 revokes L0's service)."""
        if self.direct.active:
            self.l1_revoke(resume=False)
        self._retire(self.l1_dev or self.single_dev)
        self.l1_dev = None
        self.single_dev = None

    def _start_l1_nic(self, model: DeviceModel) -> NetDevice:
        # L1's NIC carries L2's frames across L1's bridge: no source-MAC check;
        # L0's device for it offers the TX offloads (as vhost-net does to a
        # Linux L1), so what L2's driver left to the device (a checksum, TSO)
        # crosses L1 with L2's header and is done at the end, on the tap
        self.l0_nic = started_device(
            self.l1_view, *model.queue_states(), model.features | TX_OFFLOADS,
            "l0-for-l1-nic", None,
        )  # fmt: skip
        return self.l0_nic

    def _l2_broken(self) -> bool:
        dev = self.active_device()
        return dev is not None and dev.needs_reset

    def _retire(self, dev: NetDevice | None) -> None:
        """An L2 backend stops serving (a hand-over, a reset, the guest gone):
        what it did (:func:`_tally`) is kept in ``retired``, so that a queue's
        totals are the queue's, whoever served it."""
        if dev is not None:
            self.retired.update(_tally(dev))

    def served(self) -> Counter[str]:
        """``retired`` plus the backend serving now: L2's NIC's totals."""
        out = Counter(self.retired)
        dev = self.active_device()
        if dev is not None:
            out.update(_tally(dev))
        return out

    def l1_serves(self) -> bool:
        """Whether L2's NIC is L1's now: nested, and not delegated to L0."""
        return self.path != "single" and not self.direct.active

    def active_device(self) -> NetDevice | None:
        """The backend that serves L2's rings right now."""
        if self.path == "single":
            return self.single_dev
        direct = self.direct.device  # L0's, while L1 has delegated the device
        return direct if direct is not None else self.l1_dev

    def delegation(self) -> Delegation:
        """What L1 would hand L0 for L2's NIC now (its backend's queue state)."""
        dev = self.l1_dev
        if dev is None:
            raise DelegationRefused("L2's driver has not brought the device up")
        return Delegation(
            VIRTIO_NOTIFY_PORT, self.model.features, GUEST_MAC,
            queue_state(dev.rxq), queue_state(dev.txq),
        )  # fmt: skip

    def l1_delegate(self, d: Delegation | None = None) -> None:
        """L1 hands L2's NIC to L0 (DELEGATE hypercall, by default with what
        :meth:`delegation` says); raises DelegationRefused."""
        if d is None:
            d = self.delegation()
        m = self.m
        with m.l1_background():
            m.l1_exit(ExitReason.VMCALL, "vmcall", cause="delegate")
            self.direct.delegate(d)
            m.l1_set_io_passthrough(frozenset({VIRTIO_NOTIFY_PORT}))
        self._retire(self.l1_dev)
        self.l1_dev = None
        if self.l1_pending:  # what L1 held for L2's RX waits on L0's wire, first in line
            self.wire.put_back(list(self.l1_pending))
            self.l1_pending.clear()

    def l1_revoke(self, *, resume: bool = True) -> bool:
        """L1 takes L2's NIC back (REVOKE hypercall) and, with ``resume``,
        serves on where L0 stopped; False if L0 refused (nothing delegated)."""
        m = self.m
        with m.l1_background():
            m.l1_exit(ExitReason.VMCALL, "vmcall", cause="revoke")
            serving = self.direct.device
            try:
                hb = self.direct.revoke()
            except DelegationRefused:
                return False
            m.l1_set_io_passthrough(frozenset())
        self._retire(serving)
        if not resume:
            return True
        self.l1_dev = self.l2_device(
            self.l1_view_of_l2, hb.rx, hb.tx, self.model.features, "l1-backend", GUEST_MAC
        )
        self.model.device = self.l1_dev
        # a backend that takes over a queue looks for work it was never kicked
        # for (L2 may have published and notified L0 just before the REVOKE)
        with m.l1_background():
            frames, irq = self.l1_dev.tx()
            if self.recorder is not None:
                self.recorder.tx(frames, irq, drain=True)
            self._charge_l1(frames)
            self._l1_relay(frames)
        if irq and self.tx_interrupts:  # raised by L1's other vCPU: the model has no such line
            self.signal(TXQ)
        return True

    # ------------------------------------------------------------- a real guest
    def attach_guest(
        self, mem: GuestMemory, features: int, rx: QueueState, tx: QueueState,
        signal: Callable[[int], None],
    ) -> NetDevice:  # fmt: skip
        """A real guest's driver brings its rings (vhost-user: its memory
        table, its queues once both are started): the backend of this path
        serves them from ``rx`` and ``tx`` (their positions included) on
        ``mem``, the guest's memory as every level sees it (one mapping of
        the VMM's), with ``features`` as the VMM negotiated them; interrupts
        go to ``signal``. On ``l0`` L1 then delegates the device to L0."""
        if self.driver is not None:
            raise ValueError("this datapath's L2 driver is xlio's own")
        self.detach_guest()
        self.l2_view = self.l1_view_of_l2 = self.l0_view_of_l2 = mem
        self.direct.mem = mem
        self.model.features = features
        self.signal = signal
        return self._serve_l2(rx, tx, features)

    def detach_guest(self) -> tuple[QueueState, QueueState] | None:
        """The guest's rings go away (GET_VRING_BASE, a reset, a disconnect):
        whoever serves them stops (L1 revokes L0's service first); returns
        where each queue stood, None if nothing was served."""
        dev = self.active_device()
        state = None if dev is None else (queue_state(dev.rxq), queue_state(dev.txq))
        if self.direct.active:  # what L0 hands back is where its device stands
            self.l1_revoke(resume=False)
        else:
            self._retire(dev)
        self.l1_dev = None
        self.single_dev = None
        self.signal = _no_guest
        return state

    # ------------------------------------------------------------- data plane
    def _machine(self, key: Hashable, operation: Callable[[], Any]) -> Any:
        """One machine operation of the data plane (an exit, an interrupt, an
        EOI, a HLT, a VMRESUME): run the first time, replayed afterwards from
        the same machine state (:meth:`NestedVmx.replay`; ``key`` names the
        operation and its arguments); returns what the operation returned."""
        run = self._replayers.get(key)
        if run is None:  # one replayer per operation (its key names its arguments)
            run = self._replayers[key] = self.m.replayer(key, operation)
        return run().result

    def _charge_l0(self, frames: list[bytes]) -> None:
        c = self.costs
        self.m.l0_work(len(frames) * c.backend_frame, "backend")
        self.m.l0_work(c.copy_byte * sum(map(len, frames)), "copies")

    def _charge_l1(self, frames: list[bytes]) -> None:
        """L1's backend data work: it runs on EPT01 at single-level speed, so the
        cache-pollution factor of L1's exit path does not apply to it."""
        c = self.costs
        self.m.l1_work(len(frames) * c.backend_frame, "backend")
        self.m.l1_work(c.copy_byte * sum(map(len, frames)), "copies")

    def _l2_kick_exit(self) -> int:
        """L2's notify write as the exit it is; returns the level that handles it.

        ``pio``: port I/O, routed by vmcs12's I/O controls. ``mmio``: see
        :func:`xlio.sim.workloads.mmio_kick_exit`.
        """
        m = self.m
        if self.kick_mode == "pio":
            return self._machine(
                "io_kick",
                lambda: m.l2_exit(ExitReason.IO_INSTRUCTION, "io_kick", port=VIRTIO_NOTIFY_PORT),
            )
        to_l1 = self.l1_serves()
        return self._machine(("mmio_kick", to_l1), lambda: mmio_kick_exit(m, to_l1))

    def kick(self, queue: int, exits: int = 1) -> None:
        """L2 writes the queue index to the notify register (``exits`` times:
        a real guest's kicks that arrived together on one eventfd read, each
        its own exit, served by one pass of the backend)."""
        m = self.m
        rec = self.recorder
        if rec is not None:
            rec.kick(queue, exits)
        for _ in range(exits - 1):
            self._kick_exit_only()
        level = self._l2_kick_exit()
        if level == L0:
            dev = self.active_device()
            if dev is not None and queue == TXQ:
                frames, irq = dev.tx()
                if rec is not None:
                    rec.tx(frames, irq)
                self._charge_l0(frames)
                self.wire.transmit(frames)
                if irq and self.tx_interrupts:
                    self._machine("l0_interrupt_l2", m.l0_interrupt_l2)
                    self.l2_interrupt(TXQ)
            if rec is not None:
                rec.done()
            return
        tx_irq = False
        try:
            if self.l1_dev is not None:
                if queue == TXQ:
                    frames, irq = self.l1_dev.tx()
                    if rec is not None:
                        rec.tx(frames, irq)
                    self._charge_l1(frames)
                    self._l1_relay(frames)
                    if irq and self.tx_interrupts:  # L1 injects it before it resumes L2
                        self._machine("l1_interrupt_l2", m.l1_interrupt_l2)
                        tx_irq = True
                elif self._l1_to_l2():  # new buffers let L1 deliver what it held
                    self._l2_irq_pending = True
        finally:  # whatever L1's backend does, L1 resumes L2
            self._machine("l1_vmresume", m.l1_vmresume)
        if tx_irq:
            self.l2_interrupt(TXQ)
        if self._l2_irq_pending and not self._in_l2_handler:
            self.l2_interrupt()
        if rec is not None:
            rec.done()

    def _kick_exit_only(self) -> None:
        """One kick's exit with nothing new to serve (the backend's pass for
        the kicks that came with it found the ring already drained): L0 or
        L1 handles it, and L1 resumes L2."""
        if self._l2_kick_exit() != L0:
            self._machine("l1_vmresume", self.m.l1_vmresume)

    def _l1_relay(self, frames: list[bytes]) -> None:
        """L1's backend passes frames to L1's own NIC (L1 runs, L2 is out)."""
        if frames and self.l1_nic is not None:
            # with the header L2 gave (its offloads were checked against what
            # L2 negotiated; L0's device for L1's NIC offers them too)
            self.l1_nic.send(frames, with_header=True)

    def _l1_nic_kick(self, queue: int) -> None:
        """L1 kicks its own NIC: an L1 exit that L0's device for it handles."""
        m = self.m
        pio = ExitReason.IO_INSTRUCTION
        self._machine("l1_io_kick", lambda: m.l1_exit(pio, "io_kick", cause="l1-backend"))
        if queue == TXQ and self.l0_nic is not None:
            frames, _ = self.l0_nic.tx()
            self._charge_l0(frames)
            self.wire.transmit(frames)

    def _l1_to_l2(self) -> bool:
        """L1's backend moves what it holds into L2's RX ring; True to interrupt L2."""
        dev = self.l1_dev
        if dev is None or not self.l1_pending:
            return False
        pending = self.l1_pending
        frames = list(pending)
        consumed, irq = dev.rx(frames)
        if self.recorder is not None:
            self.recorder.rx(frames[:consumed], irq)
        self._charge_l1(frames[:consumed])
        if consumed == len(frames):
            pending.clear()
        else:
            for _ in range(consumed):
                pending.popleft()
        if irq:
            self._machine("l1_interrupt_l2", self.m.l1_interrupt_l2)
        return irq

    def pump(self) -> int:
        """L0's RX thread: move the wire's frames toward L2 until nothing moves."""
        moved = 0
        while self.wire.to_guest:
            n = self._rx_pass()
            if not n:
                break
            moved += n
        if self.recorder is not None:
            self.recorder.done()
        return moved

    def _rx_pass(self) -> int:
        frames = self.wire.take(RX_BATCH)
        if self.l1_serves():
            return self._rx_via_l1(frames)
        dev = self.active_device()
        if dev is None:
            self.wire.put_back(frames)
            return 0
        consumed, irq = dev.rx(frames)
        if self.recorder is not None:
            self.recorder.rx(frames[:consumed], irq)
        if consumed < len(frames):
            self.wire.put_back(frames[consumed:])
            frames = frames[:consumed]
        self._charge_l0(frames)
        if irq:
            self._machine("l0_interrupt_l2", self.m.l0_interrupt_l2)
            self.l2_interrupt()
        self._config_interrupt_if_broken()
        return consumed

    def _rx_via_l1(self, frames: list[bytes]) -> int:
        m = self.m
        nic = self.l0_nic
        if nic is None or self.l1_nic is None:
            self.wire.put_back(frames)
            return 0
        consumed, irq = nic.rx(frames)
        if consumed < len(frames):
            self.wire.put_back(frames[consumed:])
            frames = frames[:consumed]
        self._charge_l0(frames)
        if not irq:
            return consumed
        # L2 running: a reflected external interrupt; L1 halted: a wake-up
        self._machine("l0_interrupt_l1", m.l0_interrupt_l1)
        # L1's NIC driver (its refill kick is L1's exit); L1's backend hands
        # each frame on with the header L0's device gave it when that is a
        # plain one (no offloads, one buffer), else with a fresh one
        got = self.l1_nic.receive(with_header=True)
        if not all(map(bytes.startswith, got, repeat(RX_HDR))):
            got = [f if f.startswith(RX_HDR) else with_rx_header(f[NET_HDR_SIZE:]) for f in got]
        self.l1_pending.extend(got)
        l2_irq = self._l1_to_l2()
        self._machine("l1_vmresume", m.l1_vmresume)
        if l2_irq:
            self.l2_interrupt()
        self._config_interrupt_if_broken()
        return consumed

    def l2_interrupt(self, queue: int = RXQ) -> None:
        """L2's interrupt handler for ``queue`` (EOI on return from the hard
        interrupt): xlio's driver then runs its NAPI poll and its endpoint
        answers; a real guest's handler is its own, so the interrupt is
        signalled to it (its call eventfd)."""
        if self.driver is None:
            self._l2_irq_pending = False
            self._machine("l2_eoi", self.m.l2_eoi)
            self.signal(queue)
            return
        if self._in_l2_handler:  # taken when the running handler returns
            self._l2_irq_pending = True
            return
        self._in_l2_handler = True
        try:
            while True:
                self._l2_irq_pending = False
                self._machine("l2_eoi", self.m.l2_eoi)
                frames = self.driver.receive()
                replies: list[bytes] = []
                for f in frames:
                    if self.received is not None:
                        self.received.append(f)
                    replies.extend(self.endpoint.handle(f))
                if replies:
                    self.send(replies)
                if not self._l2_irq_pending:
                    break
        finally:
            self._in_l2_handler = False

    def l2_idle(self) -> None:
        """L2 has nothing left to do: it halts until the next interrupt."""
        m = self.m
        if m.state == L2 and not m.l2_halted:
            self._machine("l2_hlt", m.l2_hlt)

    def send(self, frames: list[bytes]) -> int:
        """L2 transmits (its driver kicks when the device asks)."""
        assert self.driver is not None, "a real guest sends by itself"
        sent = self.driver.send(frames)
        self._config_interrupt_if_broken()
        return sent

    def _config_interrupt_if_broken(self) -> None:
        """A device that set DEVICE_NEEDS_RESET raises a config-change interrupt;
        L2's handler reads the status (a config access) and resets the device."""
        dev = self.active_device()
        if dev is None or not dev.needs_reset:
            return
        self.resets_signalled += 1
        if self.driver is None:
            return  # a real guest's VMM holds its config space (vhost-user has no say)
        if self.m.state == L1:
            return  # delivered when L1 resumes L2
        if self.l1_serves():
            self.m.l0_interrupt_l1()  # L1's device model raises it...
            self.m.l1_interrupt_l2()  # ...into L2
            self.m.l1_vmresume()
        else:
            self.m.l0_interrupt_l2()
        self.m.l2_eoi()
        if self.driver.needs_reset():
            self.driver.reset()  # on l0, L1 revokes at the reset and delegates at DRIVER_OK

    def metrics(self) -> dict[str, dict[str, int]]:
        devs = {
            "l2-nic": self.single_dev if self.path == "single" else None,
            "l1-backend": self.l1_dev,
            "l0-direct": self.direct.device,
            "l0-for-l1-nic": self.l0_nic,
        }
        out = {
            k: {**dict(d.metrics), **{f"error: {e}": n for e, n in d.errors.items()}}
            for k, d in devs.items()
            if d is not None
        }
        if self.l1_nic is not None:  # what L1's NIC driver dropped before its device saw it
            out["l1-nic-driver"] = {"tx_too_big": self.l1_nic.tx_too_big,
                                    "tx_busy": self.l1_nic.tx_busy}  # fmt: skip
        return out


# ---------------------------------------------------------------- workloads
DATAPATH_DEFAULTS: dict[str, Any] = {
    "count": 1000,
    "batch": 1,
    "frame_size": 256,
    "queue_size": 256,
    "event_idx": True,
    "kick": "pio",
}


def datapath_options(opts: dict[str, Any]) -> dict[str, Any]:
    o = {**DATAPATH_DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    if not 60 <= o["frame_size"] <= 9000:
        raise ValueError("--frame-size must be between 60 and 9000 bytes")
    if not 1 <= o["batch"] <= o["queue_size"]:
        raise ValueError("--batch must be between 1 and the queue size")
    if o["queue_size"] & (o["queue_size"] - 1) or not 2 <= o["queue_size"] <= 32768:
        raise ValueError("--queue-size must be a power of two from 2 to 32768")
    if o["kick"] not in KICKS:
        raise ValueError(f"--kick must be one of {', '.join(KICKS)}")
    return o


def _buf_size(frame_size: int) -> int:
    return max(2048, (frame_size + NET_HDR_SIZE + 2047) & ~2047)


#: L2's and L1's memory for a datapath whose rings and buffers fit (MiB):
#: the layouts of the default options and every smaller one use these.
L2_MEM_MIB, L1_MEM_MIB = 64, 256
_MIB = 1 << 20


def _round_mib(n: int, to: int = 64) -> int:
    return -(-n // (to * _MIB)) * to


def datapath_memory(queue_size: int, buf_size: int) -> tuple[int, int]:
    """(L2 MiB, L1 MiB) that hold the rings and buffers of a datapath: L2's
    driver's from its base at 1 MiB (and room above them), L1's own NIC's
    from L1_NIC_BASE, below L2's backing, which fills L1 memory from the top."""
    l2_need = (1 << 20) + layout_bytes(queue_size, buf_size)
    l2 = max(L2_MEM_MIB, _round_mib(l2_need) + (64 if l2_need > L2_MEM_MIB * _MIB else 0))
    nic = layout_bytes(queue_size, buf_size, l1_nic_tx_queue_size(queue_size, buf_size))
    l1 = max(L1_MEM_MIB, _round_mib(L1_NIC_BASE + nic) + l2 + 64)
    return l2, l1


def make_datapath(
    m: NestedMachine, path: str, o: dict[str, Any], capture: bool = False, wire: Any = None,
    guest: bool = False,
) -> Datapath:  # fmt: skip
    buf = _buf_size(o["frame_size"])
    l2_mib, l1_mib = datapath_memory(o["queue_size"], buf)
    dp = Datapath(
        m, path, queue_size=o["queue_size"], event_idx=o["event_idx"], buf_size=buf,
        capture=capture, wire=wire, kick=o["kick"], l2_mem_mib=l2_mib, l1_mem_mib=l1_mib,
        guest=guest,
    )  # fmt: skip
    m.datapath = dp
    return dp


def _guest_frames(first: int, n: int, size: int, dport: int) -> list[bytes]:
    return [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, dport, size, first + i)
        for i in range(n)
    ]


def _peer_frames(first: int, n: int, size: int, dport: int) -> list[bytes]:
    return [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, dport, size, first + i)
        for i in range(n)
    ]


class DatapathRun:
    """One network workload's run: calling it sends ``n`` frames (requests) in
    bursts of ``b``; ``done`` counts them as they go and ``tick(done, n)``,
    when set, hears of progress every 64 bursts. (An object, not a closure
    that refers to itself: that would be a reference cycle holding the
    whole machine.)"""

    def __init__(self, kind: str, dp: Datapath, o: dict[str, Any]) -> None:
        self.kind = kind
        self.dp = dp
        self.n, self.b, self.size = int(o["count"]), int(o["batch"]), int(o["frame_size"])
        self.queue_size = int(o["queue_size"])
        self.done = 0
        self.tick: Callable[[int, int], None] | None = None
        if kind == "echo":  # between requests L2 idles: the steady state starts halted
            dp.l2_idle()

    def _burst(self, first: int, k: int) -> None:
        dp = self.dp
        if self.kind == "tx":
            dp.send(_guest_frames(first, k, self.size, UDP_DISCARD_PORT))
        elif self.kind == "rx":
            dp.wire.inject(_peer_frames(first, k, self.size, UDP_DISCARD_PORT))
        else:
            dp.wire.inject(_peer_frames(first, k, self.size, UDP_ECHO_PORT))
        dp.pump()
        if self.kind == "echo":
            dp.l2_idle()

    def __call__(self) -> float:
        n, b, tick = self.n, self.b, self.tick
        done = 0
        bursts = 0
        while done < n:
            k = min(b, n - done)
            self._burst(done, k)
            done += k
            self.done = done
            bursts += 1
            if tick is not None and (bursts & 63 == 0 or done == n):
                tick(done, n)
        return n

    def warmup(self) -> None:
        """A ring's worth of frames before the measurement: the first kick of a
        cold device and the first touch of each buffer page (EPT entries
        built) are one-time costs, not the steady state."""
        done = 0
        while done < max(self.b, self.queue_size):
            self._burst(self.n + done, self.b)
            done += self.b


def _build(kind: str) -> Callable[[NestedMachine, str, dict[str, Any]], DatapathRun]:
    def build(m: NestedMachine, path: str, opts: dict[str, Any]) -> DatapathRun:
        o = datapath_options(opts)
        return DatapathRun(kind, make_datapath(m, path, o, capture=bool(opts.get("capture"))), o)

    return build


BUILDERS = {"tx": _build("tx"), "rx": _build("rx"), "echo": _build("echo")}
