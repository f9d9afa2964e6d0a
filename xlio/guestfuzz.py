"""A hostile L2 against every backend: random ring states, checked invariants.

Theory of operation
-------------------
One *example* is a short random program that L2 (and, on the direct path,
L1) runs against a :class:`~xlio.backends.datapath.Datapath`: it writes what
it likes into its descriptor tables, available and used rings (addresses
inside, across and outside its memory, on a page L1 swapped out, on the
rings themselves; lengths, flags, ``next`` fields, indirect descriptors,
loops, indices and event indices), kicks either queue, makes the wire
deliver frames, writes feature bits, status values and queue set-ups to
the device's registers, has L1 swap pages of L2 out, and on ``l0`` has L1
revoke and delegate with arbitrary arguments. The program is drawn from a
``random.Random`` so a seed names an example (hypothesis draws the seed in
the test suite; ``scripts/fuzz.py`` walks through seeds for long runs).

After every step :func:`check` asserts the invariants:

* no exception escapes a backend (a refused DELEGATE or REVOKE is an
  answer, :class:`~xlio.backends.direct.DelegationRefused`, not an escape);
* every host frame the device serving L2 touched lies in L2's memory as
  EPT12 and EPT01 map it (the audit hook of
  :class:`~xlio.sim.memory.GuestMemory`, ``touched``);
* every chain a device took off an available ring shows up in a metric
  (packets, fails, malformed, spoofed), unless the device is in
  DEVICE_NEEDS_RESET;
* L2 is running when control returns to it.

At the end of an example the driver resets the device (virtio 1.x,
2.1.2), and traffic must flow both ways again, byte for byte.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xlio.backends.datapath import Datapath
from xlio.backends.device import NetDevice
from xlio.backends.direct import DelegationRefused, QueueState
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.frontends.virtio_net import RXQ, TXQ, DriverQueue
from xlio.measure import make_config
from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size
from xlio.sim.arch import machine_for
from xlio.sim.memory import PAGE_SHIFT
from xlio.sim.nested import L2
from xlio.virtio import (
    DESC,
    NET_HDR,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

PATHS = ("single", "l1", "l0")
STEPS = 12  # actions per example


class InvariantBroken(AssertionError):
    """A backend broke one of the guarantees (the message says which)."""


@dataclass
class Tally:
    """What a run of examples did, for the long mode's report."""

    examples: int = 0
    steps: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # device error reasons seen
    needs_reset: int = 0
    refusals: int = 0
    frames_checked: int = 0


def new_datapath(path: str, queue_size: int = 64) -> Datapath:
    """A datapath on 8 MiB of L2 memory (small, so that the audit's map is cheap)."""
    m = machine_for(make_config("kvm-2019", path))
    dp = Datapath(m, path, queue_size=queue_size, capture=True, l2_mem_mib=8)
    m.datapath = dp
    return dp


def l2_host_frames(dp: Datapath) -> set[int]:
    """Host frames backing L2's memory now (what EPT12 then EPT01 map)."""
    out = set()
    for p in range(dp.mmu.l2_pages):
        l1 = dp.mmu.l1_page_of(p)
        if l1 is not None:
            out.add(dp.vept.resolve_l1_frame(l1))
    return out


class Fuzzer:
    """Runs examples on one datapath (see the module docstring)."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.allowed = l2_host_frames(dp)
        self.touched: set[int] = set()
        for view in (dp.l0_view_of_l2, dp.l1_view_of_l2):
            view.touched = self.touched
        self.tally = Tally()
        self.seq = 0

    # ------------------------------------------------------------- addresses
    def _addr(self, rng: random.Random) -> int:
        dp = self.dp
        drv = dp.driver
        size = dp.l2_view.size
        rx, tx = drv.rx, drv.tx
        assert rx is not None and tx is not None
        choices: list[Callable[[], int]] = [
            lambda: drv.tx_bufs + rng.randrange(drv.queue_size) * drv.buf_size,
            lambda: drv.rx_bufs + rng.randrange(drv.queue_size) * drv.buf_size,
            lambda: rng.choice((rx.desc, rx.avail, rx.used, tx.desc, tx.avail, tx.used)),
            lambda: size - rng.randrange(1, 4096),  # crossing the end of L2 memory
            lambda: rng.choice((1 << 40, (1 << 64) - 16, size, 0)),
            lambda: rng.randrange(size) if size else 0,
            lambda: ((dp.mmu.l2_pages - 1) << PAGE_SHIFT) + rng.randrange(4096),
        ]
        return rng.choice(choices)()

    def _length(self, rng: random.Random) -> int:
        return rng.choice((0, 1, 12, 25, 26, 60, 200, 1514, 2048, 4096, 65562, 65563,
                           rng.randrange(1 << 32)))  # fmt: skip

    def _queue(self, rng: random.Random) -> DriverQueue:
        q = self.dp.driver.rx if rng.random() < 0.5 else self.dp.driver.tx
        assert q is not None
        return q

    # ------------------------------------------------------------- actions
    def _write_desc(self, rng: random.Random) -> None:
        q = self._queue(rng)
        i = rng.randrange(q.size)
        flags = rng.choice((0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT,
                            rng.randrange(1 << 16)))  # fmt: skip
        nxt = rng.choice((i, (i + 1) % q.size, rng.randrange(q.size), rng.randrange(1 << 16)))
        addr = self._addr(rng) & ((1 << 64) - 1)
        self.dp.l2_view.write(
            q.desc + 16 * i, DESC.pack(addr, self._length(rng) & 0xFFFFFFFF, flags, nxt)
        )

    def _publish(self, rng: random.Random) -> None:
        """Put heads into the available ring and move its index (sane or not)."""
        q = self._queue(rng)
        mem = self.dp.l2_view
        n = rng.choice((1, 1, 2, 3, q.size, q.size + 1))
        for k in range(min(n, q.size)):
            head = rng.choice((rng.randrange(q.size), rng.randrange(1 << 16)))
            mem.write_u16(q.avail + 4 + 2 * ((q.avail_idx + k) % q.size), head)
        idx = rng.choice(((q.avail_idx + n) & 0xFFFF, rng.randrange(1 << 16)))
        mem.write_u16(q.avail + 2, idx)
        q.avail_idx = idx

    def _scribble(self, rng: random.Random) -> None:
        """Ring fields the driver owns or must not touch: flags, event indices, used ring."""
        q = self._queue(rng)
        mem = self.dp.l2_view
        where = rng.choice(
            (q.avail, q.avail + 4 + 2 * q.size, q.used, q.used + 2, q.used + 4 + 8 * q.size,
             q.used + 4 + 8 * rng.randrange(q.size))
        )  # fmt: skip
        mem.write_u16(where, rng.randrange(1 << 16))

    def _tx_frame(self, rng: random.Random) -> None:
        """A chain of one or two descriptors holding a header and a frame, some odd."""
        dp = self.dp
        tx = dp.driver.tx
        assert tx is not None
        self.seq += 1
        frame = udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT,
                                  rng.choice((60, 200, 1500, 3000)), self.seq)  # fmt: skip
        hdr = NET_HDR.pack(rng.choice((0, 0, 1, 2)), rng.choice((0, 0, 1, 3, 4, 5)), 0, 0, 0, 0, 0)
        if rng.random() < 0.3:
            frame = bytes(6) + rng.randbytes(6) + frame[12:]  # another source MAC
        data = hdr + frame
        i = rng.randrange(tx.size)
        j = (i + 1) % tx.size
        a = dp.driver.tx_bufs + i * dp.driver.buf_size
        if len(data) <= dp.driver.buf_size and rng.random() < 0.5:
            dp.l2_view.write(a, data)
            dp.l2_view.write(tx.desc + 16 * i, DESC.pack(a, len(data), 0, 0))
        else:
            b = dp.driver.tx_bufs + j * dp.driver.buf_size
            cut = min(len(data) // 2, dp.driver.buf_size)
            rest = data[cut:][: dp.driver.buf_size]
            dp.l2_view.write(a, data[:cut])
            dp.l2_view.write(b, rest)
            dp.l2_view.write(tx.desc + 16 * i, DESC.pack(a, cut, VIRTQ_DESC_F_NEXT, j))
            dp.l2_view.write(tx.desc + 16 * j, DESC.pack(b, len(rest), 0, 0))
        dp.l2_view.write_u16(tx.avail + 4 + 2 * (tx.avail_idx % tx.size), i)
        tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
        dp.l2_view.write_u16(tx.avail + 2, tx.avail_idx)

    def _kick(self, rng: random.Random) -> None:
        self.dp.kick(rng.choice((TXQ, RXQ, TXQ)))

    def _deliver(self, rng: random.Random) -> None:
        self.seq += 1
        n = rng.choice((1, 4, 40))
        self.dp.wire.inject(
            [udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT,
                               rng.choice((60, 1514)), self.seq * 64 + k) for k in range(n)]
        )  # fmt: skip
        self.dp.pump()

    def _registers(self, rng: random.Random) -> None:
        model = self.dp.model
        kind = rng.randrange(3)
        if kind == 0:
            model.set_driver_features(rng.randrange(1 << 64))
        elif kind == 1:
            model.set_status(rng.randrange(256))
        else:
            model.setup_queue(
                rng.randrange(4), rng.choice((0, 1, 16, 64, 100, 1 << 16)), self._addr(rng),
                self._addr(rng), self._addr(rng),
            )  # fmt: skip

    def _swap(self, rng: random.Random) -> None:
        """L1 swaps out a page of L2: often one holding rings or buffers."""
        if self.dp.path == "single":
            return
        page = rng.choice((self._addr(rng) >> PAGE_SHIFT, rng.randrange(self.dp.mmu.l2_pages)))
        if 0 <= page < self.dp.mmu.l2_pages:
            self.dp.mmu.evict(page)

    def _l1_control(self, rng: random.Random) -> None:
        """L1 (trusted, but checked) revokes, or delegates with odd arguments."""
        dp = self.dp
        if dp.path != "l0":
            return
        if dp.direct.active or rng.random() < 0.3:
            dp.l1_revoke(resume=rng.random() < 0.8)
            return
        if dp.l1_dev is None:
            return
        d = dp.delegation()
        rx, tx = d.rx, d.tx

        def odd(q: QueueState) -> QueueState:
            field_ = rng.choice(("size", "desc", "avail", "used", "last_avail", "used_idx"))
            value = rng.choice((0, -1, 100, 1 << 16, 1 << 40, self._addr(rng)))
            return replace(q, **{field_: value})

        mac = rng.choice((GUEST_MAC, bytes(6), b"\xff" * 6, rng.randbytes(rng.randrange(8))))
        d = replace(d, mac=mac)
        if rng.random() < 0.7:
            d = replace(d, rx=odd(rx)) if rng.random() < 0.5 else replace(d, tx=odd(tx))
        try:
            dp.l1_delegate(d)
        except DelegationRefused:
            self.tally.refusals += 1

    #: action name -> weight in the random program
    ACTIONS: dict[str, int] = {
        "write_desc": 6, "publish": 4, "scribble": 2, "tx_frame": 4, "kick": 5,
        "deliver": 3, "registers": 1, "swap": 1, "l1_control": 1,
    }  # fmt: skip

    # ------------------------------------------------------------- checking
    def check(self) -> None:
        dp = self.dp
        if dp.m.state != L2:
            raise InvariantBroken(f"control returned with the machine in level {dp.m.state}")
        if not self.touched <= self.allowed:
            self.allowed |= l2_host_frames(dp)  # L2 touched swapped pages back in
            stray = self.touched - self.allowed
            if stray:
                raise InvariantBroken(f"host frames outside L2 memory touched: {sorted(stray)[:5]}")
        self.touched.clear()
        for dev in self._devices():
            _check_accounting(dev)

    def _devices(self) -> list[NetDevice]:
        dp = self.dp
        return [d for d in (dp.single_dev, dp.l1_dev, dp.direct.device) if d is not None]

    def example(self, seed: int) -> None:
        """One example: random steps, then reset and check traffic flows."""
        rng = random.Random(seed)
        actions = {name: getattr(self, "_" + name) for name in self.ACTIONS}
        names = list(actions)
        weights = list(self.ACTIONS.values())
        for _ in range(rng.randrange(1, STEPS + 1)):
            name = rng.choices(names, weights)[0]
            self.tally.actions[name] += 1
            self.tally.steps += 1
            actions[name](rng)
            self.check()
        for dev in self._devices():
            self.tally.errors.update(dev.errors)
            self.tally.needs_reset += dev.needs_reset
        self._recover()
        self.tally.examples += 1

    def _recover(self) -> None:
        """The driver resets the device; then traffic flows both ways."""
        dp = self.dp
        dp.driver.reset()
        if dp.path != "single":  # memory pressure ends: L1 swaps L2's pages back in
            for page in sorted(dp.mmu.swapped):
                dp.mmu.fault_in(page)
        self.check()
        dev = dp.active_device()
        if dev is None or dev.needs_reset:
            raise InvariantBroken("no working device after the driver's reset")
        assert dp.wire.seen_by_peer is not None and dp.received is not None
        dp.wire.seen_by_peer.clear()
        dp.received.clear()
        dp.wire.to_guest.clear()
        self.seq += 1
        out = [udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 100,
                                 self.seq * 64 + k) for k in range(3)]  # fmt: skip
        dp.send(out)
        back = [udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 100,
                                  self.seq * 64 + k) for k in range(3)]  # fmt: skip
        dp.wire.inject(back)
        dp.pump()
        self.check()
        # frames L1 still held for L2 from before the reset may come first
        if dp.wire.seen_by_peer[-3:] != out or dp.received[-3:] != back:
            raise InvariantBroken("traffic does not flow byte for byte after the reset")
        dp.wire.seen_by_peer.clear()
        dp.received.clear()
        self.tally.frames_checked += 6


def _check_accounting(dev: NetDevice) -> None:
    """Every chain taken off a ring is in a metric (a broken device may lose one)."""
    m = dev.metrics
    tx = m["tx_packets_count"] + m["tx_fails"] + m["tx_malformed_frames"]
    tx += m["tx_spoofed_mac_count"]
    rx = m["rx_packets_count"] + m["rx_fails"]
    for what, accounted, q in (("TX", tx, dev.txq), ("RX", rx, dev.rxq)):
        if accounted > q.popped or (accounted < q.popped and not dev.needs_reset):
            raise InvariantBroken(
                f"{dev.name} {what}: {q.popped} chains taken, {accounted} in metrics"
            )
