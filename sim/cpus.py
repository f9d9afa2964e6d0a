"""Physical CPUs in modeled time: who runs, for how long, at which level.

Theory of operation
-------------------
A :class:`Cpu` is one physical CPU of L0 inside a SimPy environment. It runs
one piece of work at a time: a thread that wants it (L2's vCPU, an L1 vCPU's
other thread, a vhost worker) asks with :meth:`Cpu.run` and waits while
earlier work holds it, which is how a descheduled vCPU does not run. Work
is given in cycles split by where they are spent (``L2`` the guest's own
instructions, ``L1`` and ``L0`` handler and thread work, ``switch`` the
hardware transitions of exits), so utilization comes out per level. Time is
in seconds; cycles convert at the preset's clock. The engine decides *when*
and *where*; what a piece of work costs comes from the sans-IO model.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import simpy
from simpy.events import Timeout

LEVELS = ("L2", "L1", "L0", "switch")


class Cpu:
    """One physical CPU: exclusive, first come first served, busy time by level.

    A single server needs no queue object: the CPU is free at ``free_at``,
    and work asked for now starts then. :meth:`run` (or :meth:`hold`, the
    event itself) makes the asking thread wait until its work is done;
    :meth:`spend` queues work that runs on this CPU on behalf of another
    thread (an interrupt's handling, say) without a waiting process,
    delaying whatever the CPU's own thread asks for next.
    """

    def __init__(self, env: simpy.Environment, name: str, clock_ghz: float) -> None:
        self.env = env
        self.name = name
        self.hz = clock_ghz * 1e9
        self.free_at = 0.0
        self.busy_cycles = dict.fromkeys(LEVELS, 0.0)

    def _book(self, work: dict[str, float]) -> float:
        total = 0.0
        busy = self.busy_cycles
        for level, cycles in work.items():
            total += cycles
            busy[level] += cycles
        now = self.env._now
        if not total:
            return now
        free = self.free_at
        self.free_at = (free if free > now else now) + total / self.hz
        return self.free_at

    def hold(self, work: dict[str, float]) -> simpy.Timeout | None:
        """The event that ends ``work`` on this CPU (after anything queued
        before), for the asking thread to wait on; None if it ends now."""
        end = self._book(work)
        env = self.env
        now = env._now
        return Timeout(env, end - now) if end > now else None

    def run(self, work: dict[str, float]) -> Generator[Any, Any, None]:
        """Hold the CPU for ``work`` (cycles by level): ``yield from cpu.run(work)``."""
        ev = self.hold(work)
        if ev is not None:
            yield ev

    def spend(self, work: dict[str, float]) -> None:
        """Queue ``work`` on this CPU for another thread's sake; nobody waits for it."""
        self._book(work)

    @property
    def busy(self) -> dict[str, float]:
        """Busy seconds by level."""
        return {k: v / self.hz for k, v in self.busy_cycles.items()}

    def reset(self) -> None:
        """Forget the busy time so far (the end of a warm-up)."""
        self.busy_cycles = dict.fromkeys(LEVELS, 0.0)

    def utilization(self, seconds: float) -> dict[str, float]:
        """Busy share of ``seconds`` by level, and ``total``."""
        busy = self.busy
        out = {k: v / seconds for k, v in busy.items()}
        out["total"] = sum(busy.values()) / seconds
        return out
