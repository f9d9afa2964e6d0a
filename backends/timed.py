"""The timed parts netperf's model is built of (:mod:`xlio.backends.netperf`).

Theory of operation
-------------------
Three pieces, each a small state machine in SimPy time, none of which knows
about the VMX model: :class:`Ring`, a virtqueue as occupancy (published,
consumed, returned, and whether each side asked to be notified);
:class:`Worker`, a backend thread that sleeps until it is woken or a timer
it set fires; :class:`Link`, one direction of an Ethernet wire that
serializes frames back to back at its rate and hands each to the far end
with its arrival time (no event per frame). The model decides what runs
and what it costs; these decide only when.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import simpy
from simpy.events import Timeout

from xlio.sim.cpus import Cpu

ETH_WIRE_OVERHEAD = 38  # Ethernet header 14, FCS 4, preamble 8, inter-frame gap 12
MIN_FRAME = 64 + 20  # minimum frame plus preamble and gap


class Ring:
    """One virtqueue by index: published, consumed and returned packets.

    ``kick_armed``: the consumer (device) sleeps and wants a notification;
    ``irq_armed``: the driver wants an interrupt for used buffers.
    """

    __slots__ = ("size", "avail", "used", "kick_armed", "irq_armed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.avail: deque[Any] = deque()  # published by the driver, not yet taken
        self.used: deque[Any] = deque()  # returned by the device, not yet reaped
        self.kick_armed = True
        self.irq_armed = True

    def free(self) -> int:
        return self.size - len(self.avail) - len(self.used)


class Worker:
    """A backend thread (vhost worker or L0's direct-service thread) on one CPU."""

    def __init__(self, env: simpy.Environment, name: str, cpu: Cpu, level: str) -> None:
        self.env = env
        self.name = name
        self.cpu = cpu
        self.level = level
        self.sleeping = False
        self.wake_event: simpy.Event = env.event()
        self.timer_at = float("inf")  # a wake-up already set for this time

    def wake_at(self, t: float) -> None:
        """Wake up at ``t`` (a frame's arrival), unless a timer fires earlier."""
        if t >= self.timer_at:
            return
        self.timer_at = t
        env = self.env
        delay = t - env._now
        timer = Timeout(env, delay if delay > 0.0 else 0.0)
        timer.callbacks.append(self._fire)

    def _fire(self, _: simpy.Event) -> None:
        self.timer_at = float("inf")
        self.wake()

    def wake(self) -> None:
        if self.sleeping:
            self.sleeping = False
            self.wake_event.succeed()

    def sleep(self) -> simpy.Event:
        self.sleeping = True
        self.wake_event = self.env.event()
        return self.wake_event


class Link:
    """One direction of the wire: frames serialized back to back at ``rate``.

    Both ends of this wire are pure functions of arrival times (the peer, and
    a backend's inbox read by timestamp), so a frame is handed over when it
    is sent, with the time it will arrive: no event per frame. The sender's
    queue (the host NIC's, ``txqueuelen`` 1000) is bounded: a frame that
    finds it full is dropped and counted.
    """

    QUEUE = 1000

    def __init__(
        self, env: simpy.Environment, rate: float, deliver: Callable[[Any, float], None]
    ) -> None:
        self.env = env
        self.rate = rate
        self.deliver = deliver  # deliver(item, arrival time)
        self.free_at = 0.0
        self.busy = 0.0  # seconds spent serializing
        self.dropped = 0
        self.arrivals: deque[float] = deque()  # of frames not yet arrived

    def in_transit(self) -> int:
        """Frames sent and not yet arrived."""
        arrivals = self.arrivals
        now = self.env.now
        while arrivals and arrivals[0] <= now:
            arrivals.popleft()
        return len(arrivals)

    def send(self, item: Any, l3_bytes: int, frames: int = 1, at: float | None = None) -> bool:
        """Queue ``frames`` frames carrying ``l3_bytes`` (from time ``at``, now by
        default; calls come in time order), delivered as one item at the end of
        the last; False (and counted) when the queue is full."""
        arrivals = self.arrivals
        if len(arrivals) >= self.QUEUE and self.in_transit() >= self.QUEUE:
            self.dropped += 1
            return False
        wire = l3_bytes + frames * ETH_WIRE_OVERHEAD
        if wire < frames * MIN_FRAME:
            wire = frames * MIN_FRAME
        t = wire * 8 / self.rate
        start = self.env._now if at is None else at
        if start < self.free_at:
            start = self.free_at
        end = self.free_at = start + t
        self.busy += t
        arrivals.append(end)
        self.deliver(item, end)
        return True
