"""L2's virtio-net driver: split virtqueues laid out byte for byte in L2 memory.

Theory of operation
-------------------
:meth:`VirtioNetDriver.probe` does what a driver does at probe time (virtio
1.x, 3.1.1): reset, ACKNOWLEDGE, DRIVER, read the device's features, accept
VERSION_1, MAC and (when asked for) EVENT_IDX, FEATURES_OK and check it
stuck, lay out the queues in L2 memory and hand their addresses to the
device, DRIVER_OK; then it posts every RX buffer. Each register access goes
through the ``transport`` (a PCI device model in reality; port I/O that
exits), so its cost lands in the model's set-up figures.

Queue 0 receives, queue 1 transmits; an RX buffer is one descriptor holding
the 12-byte header and the frame. :meth:`send` writes frames, publishes the
available index once per batch and kicks only if the device asked
(``avail_event`` with EVENT_IDX, else the used ring's NO_NOTIFY flag). A
frame that does not fit one TX buffer goes out as a chain of buffers linked
with VIRTQ_DESC_F_NEXT, as Linux's virtio-net sends a large skb as a
scatter-gather list (a bridge relaying a guest's jumbo frame must carry
it); only a frame over the device's limit (65,562 bytes with the header)
is dropped and counted (``tx_too_big``), never raised. When the ring has
too few free descriptors for the rest of a batch, the driver publishes
what it posted, kicks, reclaims what the device returned and goes on; what
still cannot be posted is counted (``tx_busy``). TX interrupts are
suppressed; used TX buffers are reclaimed on the next send.
:meth:`receive` (the RX interrupt handler) takes used RX buffers, re-posts
them, kicks if the device wants to hear about new buffers, and re-arms the
interrupt (``used_event``). If the device reports DEVICE_NEEDS_RESET the
driver stops using the queues and :meth:`probe` starts over.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from xlio.sim.memory import GuestMemory, MemoryFault, RingPages
from xlio.virtio import (
    DESC,
    MAX_TX_CHAIN_BYTES,
    NET_HDR_SIZE,
    RUN_MIN,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    U16,
    USED_ELEM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MAC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    descs,
    id_runs,
    need_event,
    ring_run,
    u16s,
    used_ring_size,
    valid_queue_size,
)

RXQ = 0
TXQ = 1
TX_HDR = bytes(NET_HDR_SIZE)  # no offloads; num_buffers 0 on TX


class Transport(Protocol):
    """The device's register interface, as the driver sees it."""

    def device_features(self) -> int: ...
    def set_driver_features(self, features: int) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None: ...
    def notify(self, index: int) -> None: ...


class VmmTransport:
    """The VMM's virtio-pci function when the device lives elsewhere
    (vhost-user): it offers ``features``, records the queues the driver sets
    up and, at DRIVER_OK, calls ``start(features taken, queues)``; a notify
    write goes to ``kick(index)``."""

    def __init__(self, features: int, start: Any, kick: Any) -> None:
        self.offered = features
        self.features = 0
        self.status = 0
        self.queues: dict[int, tuple[int, int, int, int]] = {}
        self._start = start
        self.notify = kick

    def device_features(self) -> int:
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self.features = features

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.status = status
        if status & STATUS_DRIVER_OK:
            self._start(self.features, self.queues)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        self.queues[index] = (size, desc, avail, used)


class DriverError(Exception):
    """The device refused the driver (features not accepted, reset needed)."""


def layout_bytes(queue_size: int, buf_size: int, tx_queue_size: int | None = None) -> int:
    """Bytes a driver's rings and buffers take from its ``base`` (page-aligned rings)."""
    tx_size = queue_size if tx_queue_size is None else tx_queue_size
    rings = sum(
        _align(_align(desc_table_size(n) + avail_ring_size(n), 4) + used_ring_size(n), 4096)
        for n in (queue_size, tx_size)
    )
    return rings + (queue_size + tx_size) * buf_size


def chain_buffers(buf_size: int) -> int:
    """Buffers of ``buf_size`` bytes the largest TX chain (65,562 bytes) takes."""
    return -(-MAX_TX_CHAIN_BYTES // buf_size)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class DriverQueue:
    """The driver side of one split virtqueue."""

    def __init__(self, mem: GuestMemory, size: int, base: int, event_idx: bool) -> None:
        if not valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two up to 32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.desc = base
        self.avail = base + desc_table_size(size)
        self.used = _align(self.avail + avail_ring_size(size), 4)
        self.end = _align(self.used + used_ring_size(size), 4096)
        mem.write(base, bytes(self.end - base))
        self.free = list(range(size - 1, -1, -1))
        self.in_flight: set[int] = set()  # heads posted, not yet returned
        self.chained: dict[int, list[int]] = {}  # head -> the rest of its chain
        self.avail_idx = 0
        self.published = 0
        self.last_used = 0
        # the descriptor table, the available ring and the used ring, kept
        self._rings = RingPages(
            mem,
            ((self.desc, desc_table_size(size)), (self.avail, avail_ring_size(size)),
             (self.used, used_ring_size(size))),
        )  # fmt: skip

    def add(self, base: int, stride: int, length: int, write: bool) -> tuple[int, int]:
        """Post the buffer of a free descriptor (buffer ``i`` is at ``base + i * stride``)
        into the next available slot, not yet published; returns (id, buffer GPA)."""
        i = self.free.pop()
        self.in_flight.add(i)
        gpa = base + i * stride
        self.mem.pack_into(
            DESC, self.desc + 16 * i, gpa, length, VIRTQ_DESC_F_WRITE if write else 0, 0
        )
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), i)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return i, gpa

    def add_many(self, base: int, stride: int, lengths: list[int], write: bool) -> list[int]:
        """:meth:`add` for each length, the descriptor table and the available
        ring resolved once (when each lies in one page); returns the buffers' GPAs.
        The ids come off the free list as :meth:`add` takes them; descriptors
        with consecutive ids are written as one run each
        (:func:`~xlio.virtio.id_runs`), the available entries in one run (two
        when the ring wraps)."""
        size = self.size
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        k = len(lengths)
        if p is None or not k:
            return [self.add(base, stride, n, write)[1] for n in lengths]
        free = self.free
        dpage, doff, apage, aoff = p[0], p[1], p[2], p[3] + 4
        flags = VIRTQ_DESC_F_WRITE if write else 0
        if k < RUN_MIN:  # one at a time
            put_desc = DESC.pack_into
            put_u16 = U16.pack_into
            in_flight = self.in_flight
            mask = size - 1
            idx = self.avail_idx
            out = []
            for n in lengths:
                i = free.pop()
                in_flight.add(i)
                gpa = base + i * stride
                put_desc(dpage, doff + 16 * i, gpa, n, flags, 0)
                put_u16(apage, aoff + 2 * (idx & mask), i)
                idx = (idx + 1) & 0xFFFF
                out.append(gpa)
            self.avail_idx = idx
            return out
        if k > len(free):
            raise IndexError("pop from empty list")  # as add() would, on the first id missing
        ids = free[-k:]
        ids.reverse()  # the order pop() takes them in
        del free[-k:]
        self.in_flight.update(ids)
        gpas = [base + i * stride for i in ids]
        put_desc = DESC.pack_into
        for at, n, step in id_runs(ids):  # each run of ids: one slice of the table
            if n == 1:
                put_desc(dpage, doff + 16 * ids[at], gpas[at], lengths[at], flags, 0)
                continue
            run_gpas, run_lens = gpas[at : at + n], lengths[at : at + n]
            if step < 0:  # the table's order is the ids' reversed
                run_gpas.reverse()
                run_lens.reverse()
            flat = [0] * (4 * n)  # addr, len, flags, next (0: no chain)
            flat[0::4], flat[1::4] = run_gpas, run_lens
            if flags:
                flat[2::4] = [flags] * n
            descs(n).pack_into(dpage, doff + 16 * min(ids[at], ids[at + n - 1]), *flat)
        start = self.avail_idx & (size - 1)
        first = min(k, size - start)
        u16s(first).pack_into(apage, aoff + 2 * start, *ids[:first])
        if first < k:
            u16s(k - first).pack_into(apage, aoff, *ids[first:])
        self.avail_idx = (self.avail_idx + k) & 0xFFFF
        return gpas

    def add_chain(self, base: int, stride: int, lengths: list[int]) -> list[int]:
        """Post one device-readable chain of ``len(lengths)`` free descriptors
        (descriptor ``i``'s buffer at ``base + i * stride``), linked with
        VIRTQ_DESC_F_NEXT in order, its head in the next available slot (not
        yet published); returns the buffers' GPAs in chain order."""
        ids = [self.free.pop() for _ in lengths]
        head = ids[0]
        self.in_flight.add(head)
        if len(ids) > 1:
            self.chained[head] = ids[1:]
        gpas = []
        for k, (i, n) in enumerate(zip(ids, lengths, strict=True)):
            gpa = base + i * stride
            last = k == len(ids) - 1
            flags, nxt = (0, 0) if last else (VIRTQ_DESC_F_NEXT, ids[k + 1])
            self.mem.pack_into(DESC, self.desc + 16 * i, gpa, n, flags, nxt)
            gpas.append(gpa)
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return gpas

    def publish(self) -> bool:
        """Expose the new available index; True if the device wants a kick."""
        new = self.avail_idx
        old = self.published
        if new == old:
            return False
        self.published = new
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        if p is not None:  # as below, in place
            U16.pack_into(p[2], p[3] + 2, new)
            if self.event_idx:
                return need_event(U16.unpack_from(p[4], p[5] + 4 + 8 * self.size)[0], new, old)
            return not U16.unpack_from(p[4], p[5])[0] & VIRTQ_USED_F_NO_NOTIFY
        self.mem.write_u16(self.avail + 2, new)
        if self.event_idx:
            event = self.mem.read_u16(self.used + 4 + 8 * self.size)
            return need_event(event, new, old)
        return not self.mem.read_u16(self.used) & VIRTQ_USED_F_NO_NOTIFY

    def take_used(self) -> tuple[list[int], list[int]]:
        """(descriptor ids, lengths) of every buffer the device returned since
        last time, each id back on the free list. A run of returns that the
        device made once each, of buffers in flight with no chain behind them
        (every RX return, every one-buffer TX frame) is taken in one go; any
        other, one element at a time."""
        ids: list[int] = []
        lens: list[int] = []
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        idx = U16.unpack_from(p[4], p[5] + 2)[0] if p else self.mem.read_u16(self.used + 2)
        last = self.last_used
        if last == idx:
            return ids, lens
        in_flight = self.in_flight
        free = self.free
        chained = self.chained
        mask = self.size - 1
        n = (idx - last) & 0xFFFF
        if p is not None and RUN_MIN <= n <= self.size and not chained:
            flat = ring_run(p[4], p[5] + 4, last & mask, n, self.size, 8)
            ids, lens = list(flat[0::2]), list(flat[1::2])
            if len(set(ids)) == n and in_flight.issuperset(ids):
                in_flight.difference_update(ids)
                free += ids
                self.last_used = idx
                return ids, lens
            ids, lens = [], []
        put_free = free.append
        put_id, put_len = ids.append, lens.append
        if p is not None:
            page, off = p[4], p[5] + 4
            elem = USED_ELEM.unpack_from
        while last != idx:
            if p is None:
                i, k = self.mem.unpack_from(USED_ELEM, self.used + 4 + 8 * (last & mask))
            else:
                i, k = elem(page, off + 8 * (last & mask))
            last = (last + 1) & 0xFFFF
            try:
                in_flight.remove(i)
            except KeyError:  # a device returning a buffer twice is ignored
                continue
            put_free(i)
            if chained and i in chained:
                free.extend(chained.pop(i))
            put_id(i)
            put_len(k)
        self.last_used = last
        return ids, lens

    def interrupts(self, enabled: bool) -> None:
        if self.event_idx:
            # interrupt when the device passes last_used; "disabled" puts the
            # event half the index space away
            gpa, value = (
                self.avail + 4 + 2 * self.size,
                (self.last_used if enabled else (self.last_used + 0x8000) & 0xFFFF),
            )
        else:
            gpa, value = self.avail, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        if p is not None:
            U16.pack_into(p[2], p[3] + gpa - self.avail, value)
        else:
            self.mem.write_u16(gpa, value)


class VirtioNetDriver:
    """L2's virtio-net driver (see the module docstring)."""

    def __init__(
        self,
        mem: GuestMemory,
        transport: Transport,
        *,
        queue_size: int = 256,
        event_idx: bool = True,
        buf_size: int = 2048,
        base: int = 1 << 20,
        tx_queue_size: int | None = None,
    ) -> None:
        self.mem = mem
        self.t = transport
        self.queue_size = queue_size
        self.tx_queue_size = queue_size if tx_queue_size is None else tx_queue_size
        self.want_event_idx = event_idx
        self.buf_size = buf_size
        self.base = base
        self.features = 0
        self.rx: DriverQueue | None = None
        self.tx: DriverQueue | None = None
        self.tx_busy = 0  # frames refused for want of a free TX descriptor
        self.tx_too_big = 0  # frames longer than a TX buffer, dropped (Linux's tx_dropped)
        self.resets = 0

    # ------------------------------------------------------------- control
    def probe(self) -> None:
        t = self.t
        t.set_status(0)
        t.set_status(STATUS_ACKNOWLEDGE)
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = t.device_features()
        want = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
        if self.want_event_idx:
            want |= 1 << VIRTIO_F_EVENT_IDX
        self.features = offered & want
        if not self.features >> VIRTIO_F_VERSION_1 & 1:
            t.set_status(STATUS_FAILED)
            raise DriverError("device does not offer VIRTIO_F_VERSION_1")
        t.set_driver_features(self.features)
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        t.set_status(status)
        if not t.get_status() & STATUS_FEATURES_OK:
            t.set_status(STATUS_FAILED)
            raise DriverError("device did not accept our features")
        event_idx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        size = self.queue_size
        rx = DriverQueue(self.mem, size, self.base, event_idx)
        tx = DriverQueue(self.mem, self.tx_queue_size, rx.end, event_idx)
        self.rx_bufs = tx.end
        self.tx_bufs = self.rx_bufs + size * self.buf_size
        for q, index in ((rx, RXQ), (tx, TXQ)):
            t.setup_queue(index, q.size, q.desc, q.avail, q.used)
        self.rx, self.tx = rx, tx
        tx.interrupts(False)
        rx.interrupts(True)
        t.set_status(status | STATUS_DRIVER_OK)
        for _ in range(size):
            rx.add(self.rx_bufs, self.buf_size, self.buf_size, write=True)
        if rx.publish():
            t.notify(RXQ)

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> VIRTIO_F_EVENT_IDX & 1)

    def needs_reset(self) -> bool:
        return bool(self.t.get_status() & STATUS_DEVICE_NEEDS_RESET)

    def reset(self) -> None:
        """Start over after DEVICE_NEEDS_RESET (virtio 1.x, 2.1.2)."""
        self.resets += 1
        self.probe()

    # ------------------------------------------------------------- data
    def send(self, frames: list[bytes], *, with_header: bool = False) -> int:
        """Queue frames for transmission, one kick per batch if needed; returns
        frames queued. ``with_header``: each frame already starts with its
        virtio-net header (a bridge relaying frames it received with theirs,
        as vhost-net hands a tap the guest's header)."""
        tx = self.tx
        assert tx is not None, "probe() first"
        tx.take_used()
        data = frames if with_header else [TX_HDR + f for f in frames]
        if data and len(data) <= len(tx.free) and max(map(len, data)) <= self.buf_size:
            return self._post(tx, data)  # the common case: a buffer a frame
        queued = 0
        pending = list(data)  # the caller's list stays as it was
        while pending:
            progress = self._post_chains(tx, pending)
            queued += progress
            del pending[:progress]
            if not pending:
                break
            if tx.publish():  # the ring is full: let the device drain, then go on
                self.t.notify(TXQ)
            before = len(tx.free)
            tx.take_used()
            if len(tx.free) == before and not progress:
                self.tx_busy += len(pending)  # the device returned nothing: dropped
                break
        if tx.publish():
            self.t.notify(TXQ)
        return queued

    def _post(self, tx: DriverQueue, data: list[bytes]) -> int:
        """Post header + frame of each, a buffer each."""
        gpas = tx.add_many(self.tx_bufs, self.buf_size, list(map(len, data)), write=False)
        if self.mem.write_many(gpas, data):  # visible to the device only at publish()
            raise MemoryFault(f"{self.mem.name}: a TX buffer outside the driver's memory")
        if tx.publish():
            self.t.notify(TXQ)
        return len(data)

    def _post_chains(self, tx: DriverQueue, frames: list[bytes]) -> int:
        """Post header + frame of each in order, each in as many buffers as it
        needs, until one does not fit the free descriptors; returns how many
        were taken (posted, or too big for any chain and counted in ``tx_too_big``)."""
        stride = self.buf_size
        write = self.mem.write
        taken = 0
        for data in frames:
            if len(data) > MAX_TX_CHAIN_BYTES:
                self.tx_too_big += 1  # over what any device takes: dropped
                taken += 1
                continue
            pieces = [data[k : k + stride] for k in range(0, len(data), stride)]
            if len(pieces) > tx.size:
                self.tx_too_big += 1  # a chain longer than the whole ring
                taken += 1
                continue
            if len(pieces) > len(tx.free):
                break
            gpas = tx.add_chain(self.tx_bufs, stride, [len(p) for p in pieces])
            for gpa, piece in zip(gpas, pieces, strict=True):
                write(gpa, piece)
            taken += 1
        return taken

    def receive(self, *, with_header: bool = False) -> list[bytes]:
        """The RX interrupt handler: frames received, buffers re-posted.
        ``with_header``: each frame with the virtio-net header the device
        wrote before it (for a bridge that hands it on)."""
        rx = self.rx
        assert rx is not None, "probe() first"
        ids, lens = rx.take_used()
        skip = 0 if with_header else NET_HDR_SIZE
        base, stride = self.rx_bufs + skip, self.buf_size
        if ids and (min(lens) < NET_HDR_SIZE or max(lens) > stride):  # a device's bad lengths
            kept = [(i, n) for i, n in zip(ids, lens, strict=True) if NET_HDR_SIZE <= n <= stride]
            gpas, sizes = [base + i * stride for i, _ in kept], [n - skip for _, n in kept]
        else:
            gpas = [base + i * stride for i in ids]
            sizes = [n - skip for n in lens] if skip else lens
        out = self.mem.read_many(gpas, sizes)
        if None in out:
            raise MemoryFault(f"{self.mem.name}: an RX buffer outside the driver's memory")
        rx.add_many(self.rx_bufs, self.buf_size, [self.buf_size] * len(ids), write=True)
        rx.interrupts(True)
        if rx.publish():
            self.t.notify(RXQ)
        return cast(list[bytes], out)
