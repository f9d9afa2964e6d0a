"""netperf in modeled time: an L2 guest's TCP and UDP traffic on each path.

Theory of operation
-------------------
A discrete-event model (SimPy) of one L2 guest with one virtio-net device,
its backends, a link and a peer. The engine decides *when* and on *which
CPU* (:class:`~xlio.sim.cpus.Cpu`); what each step costs and which exits it
takes is decided by the sans-IO model: every kick, interrupt, EOI, HLT and
wake-up is a call on :class:`~xlio.sim.nested.NestedVmx`, whose charged
cycles (split by level) are then spent on the CPU where that work runs.

Threads and CPUs (one physical CPU each, so they contend only where they
really share one):

``guest``    L2's vCPU (single level: the guest's vCPU) on ``cpu0``; on the
             nested paths it is L1's vCPU 0, which runs L2;
``l1-vhost`` L1's vhost worker for L2's device (``l1``): on L1's vCPU 1
             (``cpu1``, ``--l1-backend-vcpu other``) or on vCPU 0 with L2
             (``same``, contending with it). ``--l1-backend qemu`` makes it
             QEMU's userspace virtio backend instead: each kick of L2 is then
             a KVM_EXIT_IO round trip to L1's userspace (the io_user profile);
``vhost``    L0's vhost worker: for the guest's device (``single``), for L1's
             own device (``l1``, ``cpu2``);
``direct``   L0's direct-service thread for L2's delegated device (``l0``).

Rings are virtqueues by index: a producer publishes, a consumer consumes,
and each side asks to be notified only when it is about to sleep. A worker
runs with notifications off and, before it sleeps, re-arms them and looks
again (vhost's ``vhost_enable_notify`` and recheck); the guest's driver
kicks only an armed worker, once per published batch. The guest receives
with NAPI: an interrupt disables further ones, the poll takes up to 64
packets, and interrupts are re-armed only when a poll finds less than its
budget. TX completions are reaped on the next transmit, as Linux's
virtio-net does; a full TX ring stops the queue until a TX interrupt. So the
number of kicks and interrupts per packet comes out of the timing. An idle
guest halts, and the interrupt that wakes it takes the path of
:meth:`NestedVmx.l0_interrupt_l2` (posted interrupt, reflected HLT, virtual
idle).

The link (:mod:`xlio.backends.timed`, with the rings and worker threads)
serializes frames at its rate in each direction (Ethernet's 38
bytes of header, FCS, preamble and gap per frame); the peer is bare metal and
never the bottleneck: it acknowledges every second TCP segment and answers a
request after a turnaround. Being a pure function of arrival times, the
peer is evaluated when a frame is sent, and its answer is put on the wire
at once with its future departure time: no event per frame on that side.
TCP is modeled at the level of packets: a window of unacknowledged bytes,
delayed ACKs, per-packet stack costs in the guest; no loss (a guest with no
RX buffer holds the packet in the backend, as vhost does; a full NIC queue
drops and counts), no congestion control.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import simpy

from xlio.sim.arch import machine_for
from xlio.sim.costs import CostModel
from xlio.sim.cpus import Cpu
from xlio.sim.guest_mmu import GuestPaging, Paging
from xlio.sim.nested import L2, Config
from xlio.sim.vmx import ExitReason
from xlio.sim.workloads import VIRTIO_NOTIFY_PORT

from .timed import Link, Ring, Worker

R = ExitReason
Work = dict[str, float]


class Test(StrEnum):
    TCP_STREAM = "TCP_STREAM"
    UDP_STREAM = "UDP_STREAM"
    TCP_RR = "TCP_RR"
    UDP_RR = "UDP_RR"

    @property
    def tcp(self) -> bool:
        return self in (Test.TCP_STREAM, Test.TCP_RR)

    @property
    def rr(self) -> bool:
        return self in (Test.TCP_RR, Test.UDP_RR)


class Path(StrEnum):
    SINGLE = "single"
    L1 = "l1"
    L0 = "l0"


LINKS: dict[str, float] = {"1g": 1e9, "10g": 10e9, "25g": 25e9, "100g": 100e9}
MTU = 1500
TCP_IP_HEADERS = 52  # IPv4 20 + TCP 20 + timestamps 12
UDP_IP_HEADERS = 28
ETH_HEADER = 14
VNET_HDR = 12
GSO_MAX = 65_536  # the largest GSO segment Linux builds
NAPI_BUDGET = 64  # Linux NAPI_POLL_WEIGHT
VHOST_PKT_WEIGHT = 256  # vhost-net: packets per run before yielding (VHOST_NET_PKT_WEIGHT)
SEND_SIZE = 16_384  # netperf's default send size on Linux: segments per send() follow
TCP_WINDOW = 256 * 1024  # bytes in flight (an autotuned LAN socket buffer, estimate)
WARMUP_SHARE = 0.1  # the first tenth of the run is not measured


@dataclass(frozen=True)
class NetperfOptions:
    test: Test
    path: Path
    link: str = "1g"
    duration: float = 0.2
    size: int | None = None  # payload per packet (stream) or per request/response (RR)
    seed: int = 1
    burst: int = 1  # RR: transactions in flight
    l1_backend_vcpu: str = "other"
    queue_size: int = 256
    window: int = TCP_WINDOW
    tso: bool | None = None  # TCP segmentation offload (default: the preset's)
    l1_backend: str = "vhost"  # l1 path: vhost in L1's kernel, or QEMU's userspace virtio
    ticks: bool = True  # the guest's timer tick at the preset's guest_hz while it runs


@dataclass
class Counters:
    sent: int = 0  # packets the guest transmitted
    kicks: int = 0  # guest notifications of its device
    irqs: int = 0  # interrupts delivered to the guest
    ticks: int = 0  # timer ticks the running guest took
    transactions: int = 0
    latencies: list[float] = field(default_factory=list)


class NetperfModel:
    """One netperf run on one path (see the module docstring)."""

    def __init__(self, costs: CostModel, opts: NetperfOptions, **switches: Any) -> None:
        self.costs = costs
        self.opts = opts
        self.env = simpy.Environment()
        self.rng = random.Random(opts.seed)
        nested = opts.path is not Path.SINGLE
        self.m = machine_for(Config.from_preset(costs, nested=nested, **switches))
        if opts.path is Path.L0:  # L1 delegated the device: L2's kicks are L0's
            self.m.l1_set_io_passthrough(frozenset({VIRTIO_NOTIFY_PORT}))
        env = self.env
        clock = costs.clock_ghz
        self.cpus: dict[str, Cpu] = {"cpu0": Cpu(env, "cpu0", clock)}
        self.c = Counters()
        self.test = opts.test
        headers = TCP_IP_HEADERS if opts.test.tcp else UDP_IP_HEADERS
        mss = MTU - headers
        self.tso = costs.tso if opts.tso is None else opts.tso
        if opts.test is Test.TCP_STREAM and self.tso:
            # a GSO segment of up to 64 KiB per descriptor; the host NIC cuts it
            # into MSS frames on the wire and the peer's GRO takes it whole
            default = (GSO_MAX - headers) // mss * mss
            limit = default
        else:
            default = mss if not opts.test.rr else 1
            limit = mss
        self.payload = min(opts.size or default, limit)
        self.wire_frames = max(1, -(-self.payload // mss))
        self.l3 = self.payload + headers * self.wire_frames
        self.ack_l3 = TCP_IP_HEADERS
        self.frame = self.payload + headers + ETH_HEADER + VNET_HDR  # bytes in guest buffers
        self.acked_per_ack = self.payload * (2 if self.wire_frames == 1 else 1)
        rate = LINKS[opts.link]
        self.to_peer = Link(env, rate, self._peer_receive)
        self.to_guest = Link(env, rate, self._wire_to_backend)
        self.wire_inbox: deque[tuple[float, Any]] = deque()  # frames for the wire's worker
        # the guest's device rings and the backend that serves them
        q = opts.queue_size
        self.txq = Ring(q)
        self.txq.irq_armed = False  # TX interrupts only when the guest stops its queue
        self.rxq = Ring(q)
        self.rxq.kick_armed = False  # the backend asks for RX buffers only when it runs out
        self.rx_inbox: deque[Any] = deque()  # at the backend, waiting for RX buffers
        self.guest_wake: simpy.Event = env.event()
        self.guest_halted = False
        self.irq_pending = False
        self.napi = False
        self.window = opts.window
        self.in_flight = 0  # TCP bytes unacknowledged
        self.unacked_segments = 0  # at the peer, for delayed ACKs
        self.rr_outstanding: deque[float] = deque()  # request send times
        self.measure_from = opts.duration * WARMUP_SHARE
        self.totals = dict.fromkeys(
            ("guest_sent", "peer_received", "peer_sent", "guest_received"), 0
        )
        self.window_rx_bytes = 0  # payload the peer receives inside the measured window
        self.peer_last = 0.0  # when the peer's last answer left
        self.measuring = False
        self.l1_vcpu1_halted = False  # l1 path: L1's vCPU 1 (its vhost's) is halted
        if opts.path is Path.L1:
            self._build_l1_path()
        else:
            self.cpus["cpu1"] = Cpu(env, "cpu1", clock)
            name = "vhost" if opts.path is Path.SINGLE else "direct"
            self.backend = Worker(env, name, self.cpus["cpu1"], "L0")
            env.process(self._worker(self.backend, self._l0_backend_step, self._l0_backend_rearm))
        env.process(self._guest())
        if opts.ticks:
            self.paging = GuestPaging(self.m, Paging.NESTED_EPT if nested else Paging.SINGLE)
            env.process(self._ticks())

    # ------------------------------------------------------------ accounting
    def _charge(self, key: Any, fn: Callable[[], Any]) -> Work:
        """One sans-IO step on the machine (replayed after its first run: ``key``
        names everything ``fn`` depends on besides the machine's state); its
        cycles by level."""
        return self.m.replay(key, fn).levels

    def _data_work(self, level: str, packets: int, frame: int) -> Work:
        c = self.costs
        backend = packets * c.backend_frame
        copies = packets * c.copy_byte * frame
        work = self.m.l0_work if level == "L0" else self.m.l1_work
        work(backend, "backend")
        work(copies, "copies")
        return {level: backend + copies}

    # ------------------------------------------------------------ the guest
    def _interrupt_guest(self) -> Work:
        """L0's backend raises the guest's interrupt (single level, direct path)."""
        self.c.irqs += 1
        self.irq_pending = True
        w = self._charge("l0_interrupt_l2", self.m.l0_interrupt_l2)
        self._wake_guest()
        return w

    def _wake_guest(self) -> None:
        if self.guest_halted:
            self.guest_halted = False
            self.guest_wake.succeed()

    def _guest(self) -> Generator[Any, Any, None]:
        env = self.env
        c = self.costs
        cpu = self.cpus["cpu0"]
        t = self.test
        # one send() call: netperf's 16 KiB of TCP (several segments, one kick
        # check, as with xmit_more), one UDP datagram, one RR message
        seg_per_send = max(1, -(-SEND_SIZE // self.payload)) if t is Test.TCP_STREAM else 1
        while True:
            work: Work = {"L2": 0.0}
            did = False
            if self.irq_pending:  # the interrupt handler: EOI, NAPI scheduled
                self.irq_pending = False
                w = self._charge("l2_eoi", self.m.l2_eoi)
                _add(work, w)
                self.rxq.irq_armed = False
                self.napi = True
                did = True
            if self.napi:
                n = 0
                rx_bytes = 0
                while self.rxq.used and n < NAPI_BUDGET:
                    pkt = self.rxq.used.popleft()
                    n += 1
                    rx_bytes += self._guest_consume(pkt)
                work["L2"] += n * c.guest_rx_packet + rx_bytes * c.guest_copy_byte
                if n:
                    did = True
                    refill_kick = self.rxq.kick_armed  # the backend waits for buffers
                    if refill_kick:
                        _add(work, self._kick(rx=True))
                if n < NAPI_BUDGET:  # napi_complete: re-arm, then look again
                    self.napi = False
                    self.rxq.irq_armed = True
                    if self.rxq.used:
                        self.rxq.irq_armed = False
                        self.napi = True
            # TX: reap completions, then send what the test allows
            self.txq.used.clear()
            sent = min(seg_per_send, self.txq.free(), self._may_send())
            if sent > 0:
                self._guest_send(sent)
                did = True
                work["L2"] += sent * (c.guest_tx_packet + self.payload * c.guest_copy_byte)
                if self.txq.kick_armed:
                    _add(work, self._kick(rx=False))
            elif self.txq.free() == 0:
                self.txq.irq_armed = True  # stop the queue until a TX interrupt
            if did:
                ev = cpu.hold(work)
                if ev is not None:
                    yield ev
                continue
            # nothing to do: halt until an interrupt
            ev = cpu.hold(work)
            if ev is not None:
                yield ev
            if self.irq_pending or self.rxq.used:
                continue
            w = self._charge("l2_hlt", self.m.l2_hlt)
            self.guest_halted = True
            self.guest_wake = env.event()
            ev = cpu.hold(w)
            if ev is not None:
                yield ev
            if self.irq_pending:  # it arrived while halting
                self.guest_halted = False
                continue
            yield self.guest_wake

    def _ticks(self) -> Generator[Any, Any, None]:
        """The guest's timer at ``guest_hz``: each tick of a running guest is
        its TSC-deadline re-arm and the timer interrupt (through L1 when
        nested, :meth:`GuestPaging.timer_tick`), and nested L1's own tick
        (:meth:`GuestPaging.l1_timer_tick`), spent on the guest's CPU; a
        halted guest's tick is stopped (NOHZ idle; L1's is then counted in
        its HLT handling, not here)."""
        period = 1.0 / self.costs.guest_hz
        cpu = self.cpus["cpu0"]
        m = self.m
        while True:
            yield self.env.timeout(period)
            if self.guest_halted or m.state != L2 or m.l2_halted:
                continue
            self.c.ticks += 1
            cpu.spend(self._charge("timer_tick", self.paging.tick_operation))
            if self.paging.paging.nested:  # L1's own tick, its vCPU busy running L2
                cpu.spend(self._charge("l1_timer_tick", self.paging.l1_tick_operation))

    def _may_send(self) -> int:
        """How many packets the test lets the guest send now."""
        t = self.test
        if t is Test.UDP_STREAM:
            return VHOST_PKT_WEIGHT  # never limited by the test (the ring limits it)
        if t is Test.TCP_STREAM:
            return (self.window - self.in_flight) // self.payload
        return self.opts.burst - len(self.rr_outstanding)

    def _guest_send(self, n: int) -> None:
        """Publish ``n`` packets on the TX ring."""
        t = self.test
        now = self.env.now
        if t is Test.TCP_STREAM:
            self.in_flight += n * self.payload
        elif t.rr:
            self.rr_outstanding.extend([now] * n)
        self.txq.avail.extend([("data", now)] * n)
        self.c.sent += n
        self.totals["guest_sent"] += n

    def _guest_consume(self, pkt: tuple[str, float]) -> int:
        """One received packet through the guest's stack; its payload bytes."""
        self.totals["guest_received"] += 1
        kind = pkt[0]
        if kind == "ack":
            self.in_flight = max(0, self.in_flight - self.acked_per_ack)
        elif kind == "response":
            start = self.rr_outstanding.popleft()
            if self.measuring:
                self.c.transactions += 1
                self.c.latencies.append(self.env.now - start)
        if kind == "ack":
            return 0
        return self.payload

    def _kick(self, *, rx: bool) -> Work:
        """The guest notifies its device: an exit, and the backend wakes."""
        self.c.kicks += 1
        ring = self.rxq if rx else self.txq
        ring.kick_armed = False
        m = self.m
        l1 = self.opts.path is Path.L1
        ipi = l1 and self.opts.l1_backend_vcpu == "other" and self.l1_vhost.sleeping

        profile = "io_user" if l1 and self.opts.l1_backend == "qemu" else "io_kick"

        def exit_() -> None:
            if m.l2_exit(R.IO_INSTRUCTION, profile, port=VIRTIO_NOTIFY_PORT) == 1:
                # L1's handler: ioeventfd wakes L1's vhost; on another vCPU
                # that is an IPI (an L1 exit) before L1 resumes L2
                if ipi:
                    m.l1_exit(R.MSR_WRITE, "msr_write", cause="l1-ipi")
                m.l1_vmresume()

        w = self._charge(("kick", profile, ipi), exit_)
        if ipi:
            self._interrupt_l1_vcpu1()
        (self.l1_vhost if l1 else self.backend).wake()
        return w

    # ------------------------------------------------------------ L0's backend
    def _worker(
        self,
        wk: Worker,
        step: Callable[[Work], bool],
        rearm: Callable[[], bool],
        *,
        polls: bool = True,
        on_sleep: Callable[[], Work] | None = None,
    ) -> Generator[Any, Any, None]:
        """A vhost worker's loop, for every backend thread.

        ``step`` does one round of work with notifications off (True if it did
        any); when there is none, ``rearm`` re-enables notifications and looks
        again (vhost_enable_notify: True if work appeared, which disables them
        and goes on). A worker that cannot ``poll`` (L1's vhost on L2's vCPU)
        re-arms after every round. A woken worker pays the wake-up (the
        scheduler's latency) before its first round. A round's effects are
        visible at its start and its CPU time follows: half a round early.
        """
        hold = wk.cpu.hold
        wakeup = {wk.level: self.costs.thread_wakeup}
        while True:
            work: Work = {}
            if step(work) and polls or rearm() and polls:
                ev = hold(work)
                if ev is not None:
                    yield ev
                continue
            if work:
                ev = hold(work)
                if ev is not None:
                    yield ev
            woken = wk.sleep()
            if on_sleep is not None:  # its vCPU halts: CPU time nobody waits for
                wk.cpu.spend(on_sleep())
            yield woken
            ev = hold(wakeup)
            if ev is not None:
                yield ev

    def _l0_backend_step(self, work: Work) -> bool:
        """vhost (single level) or L0's direct-service thread (l0): one round."""
        n_tx = self._to_wire(self.txq)
        if n_tx:
            _add(work, self._data_work("L0", n_tx, self.frame))
            self.txq.used.extend([None] * n_tx)
            if self.txq.irq_armed:  # the guest stopped its queue: TX interrupt
                self.txq.irq_armed = False
                self._run_on(self.cpus["cpu0"], self._interrupt_guest())
        self._arrivals(self.rx_inbox)
        n_rx = self._backend_rx(work, "L0")
        return bool(n_tx or n_rx)

    def _to_wire(self, ring: Ring) -> int:
        """L0's worker puts up to a round's worth of a TX ring on the wire."""
        n = 0
        while ring.avail and n < VHOST_PKT_WEIGHT:
            ring.avail.popleft()
            n += 1
            self.to_peer.send("data", self.l3, self.wire_frames)
        return n

    def _l0_backend_rearm(self) -> bool:
        self.txq.kick_armed = True
        if self.txq.avail or self._arrived() or (self.rx_inbox and self.rxq.free() > 0):
            self.txq.kick_armed = False
            return True
        if self.wire_inbox:  # the next frame on the wire wakes the worker
            self.backend.wake_at(self.wire_inbox[0][0])
        return False

    def _backend_rx(self, work: Work, level: str) -> int:
        """Move packets waiting at the backend into the guest's RX buffers."""
        n = 0
        while self.rx_inbox and self.rxq.free() > 0 and n < VHOST_PKT_WEIGHT:
            self.rxq.used.append(self.rx_inbox.popleft())
            n += 1
        if self.rx_inbox and self.rxq.free() == 0:
            self.rxq.kick_armed = True  # wait for the guest to refill
        if n:
            _add(work, self._data_work(level, n, self.frame))
            if self.rxq.irq_armed:
                self.rxq.irq_armed = False
                if self.opts.path is Path.L1:
                    _add(work, self._l1_interrupt_l2())
                else:
                    # the guest's side of the delivery (its exits, its wake-up)
                    self._run_on(self.cpus["cpu0"], self._interrupt_guest())
        return n

    def _wire_to_backend(self, item: Any, arrival: float) -> None:
        """A frame for the guest, arriving at ``arrival`` at the worker facing the
        wire (called when the peer sends it): it wakes a sleeping worker then."""
        self.wire_inbox.append((arrival, item))
        wk = self.l0_vhost if self.opts.path is Path.L1 else self.backend
        if wk.sleeping:
            wk.wake_at(arrival)

    def _arrivals(self, into: deque[Any]) -> int:
        """Move the frames that have arrived into the worker's inbox."""
        inbox = self.wire_inbox
        now = self.env.now
        n = 0
        while inbox and inbox[0][0] <= now:
            into.append(inbox.popleft()[1])
            n += 1
        return n

    def _arrived(self) -> bool:
        return bool(self.wire_inbox) and self.wire_inbox[0][0] <= self.env.now

    # ------------------------------------------------------------ the peer
    def _peer_receive(self, item: Any, arrival: float) -> None:
        """The peer takes a frame arriving at ``arrival`` (called when it is sent)."""
        self.totals["peer_received"] += 1
        if self.measure_from <= arrival < self.opts.duration:
            self.window_rx_bytes += self.payload
        t = self.test
        if t is Test.UDP_STREAM:
            return
        if t is Test.TCP_STREAM:
            # delayed ACK: every second full segment; GRO hands the peer a
            # whole GSO segment, which it acknowledges at once
            self.unacked_segments += 1
            if self.wire_frames == 1 and self.unacked_segments < 2:
                return
            self.unacked_segments = 0
            kind, l3 = "ack", self.ack_l3
        else:
            kind, l3 = "response", self.l3
        turnaround = self.costs.peer_turnaround_us * 1e-6 * self.rng.uniform(0.8, 1.2)
        # the peer answers in order, after its turnaround: straight onto the wire
        at = max(arrival + turnaround, self.peer_last)
        self.peer_last = at
        self.totals["peer_sent"] += 1
        self.to_guest.send((kind, at), l3, at=at)

    # ------------------------------------------------------------ the L1 path
    def _build_l1_path(self) -> None:
        env = self.env
        clock = self.costs.clock_ghz
        other = self.opts.l1_backend_vcpu == "other"
        if other:
            self.cpus["cpu1"] = Cpu(env, "cpu1", clock)
        self.cpus["cpu2"] = Cpu(env, "cpu2", clock)
        self.l1_cpu = self.cpus["cpu1"] if other else self.cpus["cpu0"]
        self.l1_vhost = Worker(env, "l1-vhost", self.l1_cpu, "L1")
        self.l0_vhost = Worker(env, "vhost", self.cpus["cpu2"], "L0")
        q = self.opts.queue_size
        self.l1_txq = Ring(q)  # L1's own NIC, served by L0's vhost
        self.l1_nic_inbox: deque[Any] = deque()  # at L0's vhost for L1's NIC
        self.l1_rx_pending: deque[Any] = deque()  # in L1's NIC RX ring
        self.l1_irq_armed = True
        self.l1_napi_pending = False
        env.process(
            self._worker(
                self.l1_vhost, self._l1_vhost_step, self._l1_vhost_rearm,
                polls=other, on_sleep=self._l1_vhost_idle,
            )
        )  # fmt: skip
        env.process(
            self._worker(self.l0_vhost, self._l0_vhost_for_l1_step, self._l0_vhost_for_l1_rearm)
        )

    def _l1_vhost_step(self, work: Work) -> bool:
        """L1's vhost worker for L2's device, and L1's NIC receive, on its vCPU."""
        n_tx = 0
        while self.txq.avail and n_tx < VHOST_PKT_WEIGHT and self.l1_txq.free() > 0:
            self.txq.avail.popleft()
            self.l1_txq.avail.append("data")
            n_tx += 1
        if n_tx:
            _add(work, self._data_work("L1", n_tx, self.frame))
            self.txq.used.extend([None] * n_tx)
            if self.txq.irq_armed:  # the guest stopped its queue: TX interrupt
                self.txq.irq_armed = False
                _add(work, self._l1_interrupt_l2())
            if self.l1_txq.kick_armed:  # L1 kicks its own NIC: an L1 exit
                self.l1_txq.kick_armed = False

                m = self.m
                _add(
                    work,
                    self._charge(
                        "l1_nic_kick",
                        lambda: m.l1_exit(
                            R.IO_INSTRUCTION, "io_kick", cause="l1-backend", background=True
                        ),
                    ),
                )
                self.l0_vhost.wake()
        # L1's NIC receive: NAPI in L1, the bridge, then vhost's RX into L2
        n_rx = 0
        while self.l1_rx_pending and n_rx < VHOST_PKT_WEIGHT:
            self.rx_inbox.append(self.l1_rx_pending.popleft())
            n_rx += 1
        if n_rx:
            _add(work, self._data_work("L1", n_rx, self.frame))  # L1's stack and bridge
        n_in = self._backend_rx(work, "L1")
        return bool(n_tx or n_rx or n_in)

    def _l1_vhost_rearm(self) -> bool:
        self.txq.kick_armed = True
        self.l1_irq_armed = True
        if self.txq.avail or self.l1_rx_pending or (self.rx_inbox and self.rxq.free() > 0):
            self.txq.kick_armed = False
            return True
        return False

    def _l1_vhost_idle(self) -> Work:
        """L1's vhost sleeps: its vCPU halts, if nothing else runs there."""
        if self.opts.l1_backend_vcpu == "other":  # L1's vCPU 1: an L1 HLT exit
            self.l1_vcpu1_halted = True
            return self._charge("l1_vcpu_halt", self.m.l1_vcpu_halt)
        if self.m.state != L2:  # vCPU 0 woke for its NIC while L2 stays halted
            return self._charge("l1_halt_again", self.m.l1_halt_again)
        return {}

    def _l1_interrupt_l2(self) -> Work:
        """L1's vhost raises L2's interrupt; returns the work on the vhost's CPU."""
        self.c.irqs += 1
        self.irq_pending = True
        m = self.m
        if self.opts.l1_backend_vcpu == "other":
            # an IPI from L1's vCPU 1 (its exit), then delivery on vCPU 0: a
            # nested posted interrupt, or (halted) L0 wakes L1, which wakes L2
            w = self._charge("l1_ipi_exit", m.l1_ipi_exit)
            self._run_on(self.cpus["cpu0"], self._charge("l0_interrupt_l2", m.l0_interrupt_l2))
        elif m.state == L2:
            # same vCPU, L2 not halted: L1's vhost ran in an exit that already
            # took L2 out; the interrupt is posted and taken at re-entry
            w = self._charge("l0_interrupt_l2", m.l0_interrupt_l2)
        else:  # same vCPU, L1 woken for its NIC while L2 was halted

            def deliver() -> None:
                m.l1_interrupt_l2()
                m.l1_vmresume()

            w = self._charge("l1_interrupt_l2", deliver)
        self._wake_guest()
        return w

    def _run_on(self, cpu: Cpu, work: Work) -> None:
        """Work that runs on another CPU than the caller's, queued there."""
        if work:
            cpu.spend(work)

    def _l0_vhost_for_l1_step(self, work: Work) -> bool:
        """L0's vhost for L1's own NIC: to the wire, and from it into L1's RX ring."""
        n_tx = self._to_wire(self.l1_txq)
        if n_tx:
            _add(work, self._data_work("L0", n_tx, self.frame))
        self._arrivals(self.l1_nic_inbox)
        n_rx = 0
        while self.l1_nic_inbox and n_rx < VHOST_PKT_WEIGHT:
            self.l1_rx_pending.append(self.l1_nic_inbox.popleft())
            n_rx += 1
        if n_rx:
            _add(work, self._data_work("L0", n_rx, self.frame))
            if self.l1_irq_armed:  # interrupt L1 where its NIC's NAPI runs
                self.l1_irq_armed = False
                self._interrupt_l1_nic()
            self.l1_vhost.wake()
        return bool(n_tx or n_rx)

    def _l0_vhost_for_l1_rearm(self) -> bool:
        self.l1_txq.kick_armed = True
        if self.l1_txq.avail or self.l1_nic_inbox or self._arrived():
            self.l1_txq.kick_armed = False
            return True
        if self.wire_inbox:  # the next frame on the wire wakes the worker
            self.l0_vhost.wake_at(self.wire_inbox[0][0])
        return False

    def _interrupt_l1_vcpu1(self) -> None:
        """L0 interrupts L1's vCPU 1 (its vhost's): waking it if it halted."""
        halted = self.l1_vcpu1_halted
        self.l1_vcpu1_halted = False
        m = self.m
        work = self._charge(
            ("l0_interrupt_l1_vcpu", halted), lambda: m.l0_interrupt_l1_vcpu(halted=halted)
        )
        self._run_on(self.l1_cpu, work)

    def _interrupt_l1_nic(self) -> None:
        """L0's vhost interrupts L1 where its NIC's NAPI runs (the vhost's vCPU)."""
        m = self.m
        if self.opts.l1_backend_vcpu == "other":
            self._interrupt_l1_vcpu1()
            return

        # vCPU 0 runs L2: a forced reflected exit, handled in L1, back to L2; or
        # L2 is halted in L1: L0 wakes L1, which stays up for its vhost
        def irq() -> None:
            m.l0_interrupt_l1()
            if not m.l2_halted:
                m.l1_vmresume()

        self._run_on(self.cpus["cpu0"], self._charge("l0_interrupt_l1", irq))

    # ------------------------------------------------------------ running
    def conservation(self) -> dict[str, int]:
        """Whole-run totals: every packet is delivered, dropped or still on its way."""
        t = self.totals
        in_guest_tx = len(self.txq.avail)
        on_wire = self.to_peer.in_transit()
        to_peer = on_wire + in_guest_tx
        to_guest = len(self.wire_inbox) + len(self.rx_inbox) + len(self.rxq.used)
        if self.opts.path is Path.L1:
            to_peer += len(self.l1_txq.avail)
            to_guest += len(self.l1_nic_inbox) + len(self.l1_rx_pending)
        return {
            "guest_sent": t["guest_sent"],
            "peer_received": t["peer_received"] - on_wire,
            "dropped_to_peer": self.to_peer.dropped,
            "in_flight_to_peer": to_peer,
            "peer_sent": t["peer_sent"],
            "guest_received": t["guest_received"],
            "dropped_to_guest": self.to_guest.dropped,
            "in_flight_to_guest": to_guest,
        }

    def run(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Warm up, then measure until the duration; ``progress`` hears (percent, 100).

        Ctrl-C while measuring ends the run there: the result covers the
        modeled time measured so far and says ``interrupted``.
        """
        env = self.env
        env.run(until=self.measure_from)
        self.m.reset_stats()
        for cpu in self.cpus.values():
            cpu.reset()
        self.to_peer.busy = self.to_guest.busy = 0.0
        self.c = Counters()
        self.measuring = True
        end = self.opts.duration
        step = (end - self.measure_from) / 100
        try:
            for i in range(1, 101):
                env.run(until=end if i == 100 else self.measure_from + i * step)
                if progress is not None:
                    progress(i, 100)
        except KeyboardInterrupt:
            measured = env.now - self.measure_from
            if measured <= 0:
                raise
            r = self.result(measured)
            r["interrupted"] = True
            return r
        return self.result(end - self.measure_from)

    def result(self, seconds: float) -> dict[str, Any]:
        c = self.c
        s = self.m.stats
        out: dict[str, Any] = {}
        if self.test.rr:
            lat = sorted(c.latencies)
            out["transactions_per_s"] = c.transactions / seconds
            out["latency_us"] = (
                {f"p{q}": _percentile(lat, q) * 1e6 for q in (50, 90, 99)}
                if lat
                else {"p50": None, "p90": None, "p99": None}
            )
        out["throughput_mbps"] = self.window_rx_bytes * 8 / seconds / 1e6
        packets = c.sent
        out["packets_per_s"] = packets / seconds
        cpu = {name: cpu.utilization(seconds) for name, cpu in self.cpus.items()}
        out["cpu"] = {k: round(v["total"], 4) for k, v in cpu.items()}
        out["cpu_by_level"] = {k: {lv: round(x, 4) for lv, x in v.items()} for k, v in cpu.items()}
        busiest = max(cpu, key=lambda k: cpu[k]["total"])
        out["cpu_busiest"] = {"cpu": busiest, "utilization": round(cpu[busiest]["total"], 4)}
        exits: dict[str, float] = {}
        for row in s.reason_rows():
            exits[f"{row['level']} {row['reason']}"] = row["count"] / seconds
        out["exits_per_s"] = exits
        denom = max(packets, 1)
        summary = s.summary()
        out["per_packet"] = {k: v / denom for k, v in summary.items()}
        out["per_packet"]["kicks"] = c.kicks / denom
        out["per_packet"]["interrupts"] = c.irqs / denom
        out["timer_ticks_per_s"] = c.ticks / seconds
        link = self.to_peer.busy / seconds
        out["link_utilization"] = round(link, 4)
        saturated = []
        if link > 0.95:
            saturated.append(f"the link ({self.opts.link})")
        if cpu[busiest]["total"] > 0.95:
            saturated.append(f"CPU {busiest}")
        out["bottleneck"] = " and ".join(saturated) or "latency (nothing saturated)"
        out["accounting"] = self.conservation()
        return out


def _add(work: Work, more: Work) -> None:
    get = work.get
    for k, v in more.items():
        work[k] = get(k, 0.0) + v


def _percentile(sorted_values: list[float], q: int) -> float:
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[i]
