"""A virtio-net function's control plane: its register interface, and the backend it starts.

A :class:`DeviceModel` is what a VMM's virtio-pci device model does for a
driver: it offers features, takes the driver's, records its queues and, at
DRIVER_OK, checks them and starts the backend (:func:`started_device`); a
reset stops it. Every register access runs through ``access``, which
charges it as the exit it is at the level that handles it (L2's port I/O to
L1's device model, or L1's to L0's), so set-up costs land in the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xlio.frontends.virtio_net import RXQ, TXQ
from xlio.sim.memory import GuestMemory
from xlio.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MAC,
    valid_queue_size,
)

from .device import NetDevice
from .direct import QueueState, fresh_queue, net_device
from .virtqueue import QueueBroken, queue_spans, span_problem

#: The config-space I/O port of L2's NIC (legacy virtio-pci BAR0: status,
#: features, queue set-up); never delegated, the control plane stays L1's.
VIRTIO_CONFIG_PORT = 0xC040
DEVICE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_F_EVENT_IDX)


class DeviceModel:
    """A virtio-net device's register interface and the backend it starts.

    ``access`` runs one register access as the exit it is (L2's port I/O to
    the config port, or L1's to its own NIC's) and calls the handler at the
    level that handles it.
    """

    def __init__(
        self,
        access: Callable[[Callable[[], Any]], Any],
        kick: Callable[[int], None],
        start: Callable[[DeviceModel], NetDevice],
        broken: Callable[[], bool],
        mem_size: int,
        reset: Callable[[], None] = lambda: None,
    ) -> None:
        self._access = access
        self._start = start
        self._broken = broken
        self._reset = reset
        self.notify = kick  # the driver's notify write: a kick (no wrapper on the data path)
        self.mem_size = mem_size
        self.status = 0
        self.features = 0
        self.queues: dict[int, tuple[int, int, int, int]] = {}
        self.device: NetDevice | None = None
        self.setup_error: str | None = None  # why DRIVER_OK could not start the device
        self.setup_errors = 0

    def device_features(self) -> int:
        return int(self._access(lambda: DEVICE_FEATURES))

    def set_driver_features(self, features: int) -> None:
        self._access(lambda: setattr(self, "features", features & DEVICE_FEATURES))

    def needs_reset(self) -> bool:
        return self.setup_error is not None or self._broken()

    def get_status(self) -> int:
        def read() -> int:
            return self.status | (STATUS_DEVICE_NEEDS_RESET if self.needs_reset() else 0)

        return int(self._access(read))

    def set_status(self, status: int) -> None:
        def write() -> None:
            if status == 0:  # reset: the backend stops before the rings go away
                self._reset()
                self.device = None
                self.queues.clear()
                self.setup_error = None
            self.status = status
            if status & STATUS_DRIVER_OK and self.device is None and self.setup_error is None:
                self.setup_error = self.check_queues()
                if self.setup_error is None:
                    self.device = self._start(self)
                else:
                    self.setup_errors += 1

        self._access(write)

    def check_queues(self) -> str | None:
        """What is wrong with the queues the driver set up (None: nothing).

        At DRIVER_OK a device that cannot use what it was given sets
        DEVICE_NEEDS_RESET instead of starting (virtio 1.x, 2.1.2)."""
        spans = []
        for i, name in ((RXQ, "rx"), (TXQ, "tx")):
            q = self.queues.get(i)
            if q is None:
                return f"{name} queue was not set up"
            size = q[0]
            if not valid_queue_size(size):
                return f"{name} queue size {size} is not a power of two up to 32768"
            spans += queue_spans(name, *q)
        return span_problem(spans, self.mem_size)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        self._access(lambda: self.queues.__setitem__(index, (size, desc, avail, used)))

    def queue_states(self) -> tuple[QueueState, QueueState]:
        """The queues the driver set up, as a backend starts on them."""
        return fresh_queue(*self.queues[RXQ]), fresh_queue(*self.queues[TXQ])

    def make_device(self, mem: GuestMemory, name: str, mac: bytes | None) -> NetDevice:
        return started_device(mem, *self.queue_states(), self.features, name, mac)


def started_device(
    mem: GuestMemory, rx: QueueState, tx: QueueState, features: int, name: str,
    mac: bytes | None, make: Callable[..., NetDevice] = net_device,
) -> NetDevice:  # fmt: skip
    """A backend starting on a driver's queues (``make`` builds it): it asks
    for kicks on both."""
    dev = make(mem, rx, tx, features, name, mac)
    for q in (dev.rxq, dev.txq):
        try:
            q.set_notify(True)
        except QueueBroken as e:
            dev._broken(e)
    return dev
