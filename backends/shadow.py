"""The same L2 NIC events charged on the other paths: shadow datapaths.

Theory of operation
-------------------
A real guest's run happens on one path; what it would have cost on the
other two is a question about exactly those events, not about another run
(under TCG the guest's timing, and so its batching and notifications, would
differ). A :class:`Shadows` hangs a recorder on the real
:class:`~xlio.backends.datapath.Datapath`: it hears each kick (queue,
notify writes), what L2's backend took from the TX ring (the frames with
their headers, and whether the driver wanted the interrupt) and what it put
into the RX ring (the frames, and whether the driver wanted the interrupt).
Each shadow is a datapath of its own path and machine whose L2 backend is a
:class:`ShadowDevice`: it touches no memory and answers with what the real
backend did, so the shadow's machine charges that path's chain for the same
kicks, frames, bytes and interrupts. Frames the real L2 received are put on
the shadow's wire, so they cross L0 (and L1) as they would on that path.

The shadows catch up when the real datapath is done with an event (the end
of a kick or a pump): nothing of the real datapath waits for them, and they
never touch the guest's memory (their view is the real one, read only by
L0's checks of a delegation). Two approximations, both small: a shadow's
RX interrupt is signalled for the first frames it delivers after the real
driver asked for one (the batching of a path's RX differs), and the real
path's hand-over drains (``--switch-every``) reach a shadow as one kick each.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from xlio.frontends.virtio_net import TXQ
from xlio.sim.machine import NestedMachine
from xlio.sim.memory import GuestMemory
from xlio.virtio import VIRTIO_F_EVENT_IDX, bit

from .datapath import Datapath, make_datapath
from .device import METRICS
from .direct import QueueState
from .wire import Inbox


class ShadowQueue:
    """A queue's positions and counts, as delegation and hand-overs read them."""

    def __init__(self, s: QueueState, event_idx: bool) -> None:
        self.size, self.desc, self.avail, self.used = s.size, s.desc, s.avail, s.used
        self.last_avail, self.used_idx, self.signalled = s.last_avail, s.used_idx, s.signalled
        self.event_idx = event_idx
        self.popped = 0
        self.interrupts = 0
        self.interrupts_suppressed = 0
        self.indirect_tables = 0  # the real queue counts them; a stand-in has none
        self.broken = False

    def set_notify(self, enabled: bool) -> None:
        pass

    def took(self, n: int, irq: bool) -> None:
        self.popped += n
        self.last_avail = (self.last_avail + n) & 0xFFFF
        self.used_idx = self.signalled = (self.used_idx + n) & 0xFFFF
        if n:
            if irq:
                self.interrupts += 1
            else:
                self.interrupts_suppressed += 1


class Script:
    """What the real L2 backend did, waiting for one shadow to replay it."""

    def __init__(self) -> None:
        self.events: deque[tuple[Any, ...]] = deque()
        self.tx: deque[tuple[list[bytes], bool]] = deque()
        self.rx_irqs_owed = 0


class ShadowDevice:
    """L2's backend in a shadow datapath: the real backend's answers."""

    def __init__(self, script: Script, rx: QueueState, tx: QueueState, features: int,
                 name: str) -> None:  # fmt: skip
        ev = bit(features, VIRTIO_F_EVENT_IDX)
        self.script = script
        self.rxq = ShadowQueue(rx, ev)
        self.txq = ShadowQueue(tx, ev)
        self.name = name
        self.features = features
        self.needs_reset = False
        self.metrics: Counter[str] = Counter({k: 0 for k in METRICS})
        self.errors: Counter[str] = Counter()

    def tx(self, limit: int = 1 << 30) -> tuple[list[bytes], bool]:
        frames, irq = self.script.tx.popleft() if self.script.tx else ([], False)
        self.txq.took(len(frames), irq)
        self.metrics["tx_packets_count"] += len(frames)
        self.metrics["tx_bytes_count"] += sum(map(len, frames)) - 12 * len(frames)
        return frames, irq

    def rx(self, frames: list[bytes]) -> tuple[int, bool]:
        s = self.script
        irq = bool(frames) and s.rx_irqs_owed > 0
        if irq:
            s.rx_irqs_owed -= 1
        self.rxq.took(len(frames), irq)
        self.metrics["rx_packets_count"] += len(frames)
        self.metrics["rx_bytes_count"] += sum(map(len, frames)) - 12 * len(frames)
        return len(frames), irq


class ShadowWire(Inbox):
    """A shadow's L0 wire: frames out are counted and dropped (the real wire
    carried them); frames in are what the real L2 received."""

    def __init__(self) -> None:
        super().__init__()
        self.frames_to_peer = 0

    def transmit(self, hdr_frames: list[bytes]) -> None:
        self.frames_to_peer += len(hdr_frames)


class Recorder:
    """Hung on the real datapath (its ``recorder``): hands each shadow what happened."""

    def __init__(self, shadows: Shadows) -> None:
        self.shadows = shadows

    def kick(self, queue: int, exits: int) -> None:
        for s in self.shadows.scripts:
            s.events.append(("kick", queue, exits))

    def tx(self, frames: list[bytes], irq: bool, drain: bool = False) -> None:
        for s in self.shadows.scripts:
            if drain:
                s.events.append(("kick", TXQ, 1))
            s.tx.append((frames, irq))

    def rx(self, frames: list[bytes], irq: bool) -> None:
        if not frames and not irq:
            return
        for s in self.shadows.scripts:
            s.events.append(("rx", frames))
            s.rx_irqs_owed += irq

    def done(self) -> None:
        self.shadows.catch_up()


class Shadows:
    """Shadow datapaths of ``paths``, charged with what ``real`` did."""

    def __init__(self, real: Datapath, machines: dict[str, NestedMachine], o: dict[str, Any]):
        self.real = real
        self.dps: dict[str, Datapath] = {}
        self.scripts: list[Script] = []
        for path, m in machines.items():
            dp = make_datapath(m, path, o, wire=ShadowWire(), guest=True)
            script = Script()
            dp.l2_device = dp.direct.make_device = _maker(script)
            dp.shadow_script = script  # type: ignore[attr-defined]
            self.dps[path] = dp
            self.scripts.append(script)
        self._busy = False
        real.recorder = Recorder(self)

    def attach(self, mem: GuestMemory, features: int, rx: QueueState, tx: QueueState) -> None:
        self.catch_up()
        for dp in self.dps.values():
            dp.attach_guest(mem, features, rx, tx, _nobody)

    def detach(self) -> None:
        self.catch_up()
        for dp in self.dps.values():
            dp.detach_guest()

    def catch_up(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            for dp in self.dps.values():
                script: Script = dp.shadow_script  # type: ignore[attr-defined]
                while script.events:
                    ev = script.events.popleft()
                    if ev[0] == "kick":
                        if dp.active_device() is not None:
                            dp.kick(ev[1], exits=ev[2])
                    else:
                        dp.wire.to_guest.extend(ev[1])
                        dp.pump()
        finally:
            self._busy = False


def _maker(script: Script) -> Any:
    def make(mem: GuestMemory, rx: QueueState, tx: QueueState, features: int, name: str,
             mac: bytes | None) -> ShadowDevice:  # fmt: skip
        return ShadowDevice(script, rx, tx, features, name)

    return make


def _nobody(queue: int) -> None:
    """A shadow's interrupts reach no guest."""
