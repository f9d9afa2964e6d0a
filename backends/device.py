"""Virtio-net device logic: TX chains become frames, frames fill RX chains.

Sans-IO and level-agnostic: the same :class:`NetDevice` is L0's device for
L1's own NIC, L1's backend for L2's NIC (classic path) and L0's direct
service of L2's NIC; what differs is the memory view it is given and who
charges the model for its work. Frames cross it *with* their 12-byte
virtio-net header, as they do through a tap opened with IFF_VNET_HDR.

Metrics use Firecracker's names. Bad guest input is contained as described
in :mod:`xlio.backends.virtqueue`: a dropped chain counts ``tx_fails`` or
``rx_fails`` plus its reason in ``errors``; a frame shorter than the header
plus an Ethernet header, or a chain longer than 65,562 bytes, counts
``tx_malformed_frames``, as does a header asking for an offload that was
never negotiated (checksum or GSO); a frame whose source MAC is not the one
the device was configured with is dropped and counted in
``tx_spoofed_mac_count``. A broken queue (also a used ring that cannot be
written) sets ``needs_reset`` (the device's DEVICE_NEEDS_RESET status bit)
and the device stops touching its rings until the driver resets it.
"""

from __future__ import annotations

from collections import Counter

from xlio.sim.memory import GuestMemory, MemoryFault
from xlio.virtio import ETH_MIN, MAX_TX_CHAIN_BYTES, NET_HDR, NET_HDR_SIZE

from .virtqueue import ChainError, DeviceQueue, QueueBroken, Segments

METRICS = (
    "rx_packets_count",
    "rx_bytes_count",
    "rx_fails",
    "no_rx_avail_buffer",
    "tx_packets_count",
    "tx_bytes_count",
    "tx_fails",
    "tx_malformed_frames",
    "tap_read_fails",
    "tap_write_fails",
    "tx_spoofed_mac_count",
)
#: The Ethernet source address inside header + frame.
SRC_MAC = slice(NET_HDR_SIZE + 6, NET_HDR_SIZE + 12)

#: RX header without mergeable buffers: no offloads, num_buffers = 1.
RX_HDR = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)


class NetDevice:
    """Device side of a virtio-net function (see the module docstring)."""

    def __init__(
        self,
        mem: GuestMemory,
        rx: DeviceQueue,
        tx: DeviceQueue,
        name: str,
        *,
        mac: bytes | None = None,
    ) -> None:
        self.mem = mem
        self.rxq = rx
        self.txq = tx
        self.name = name
        self.mac = mac  # the MAC the device was configured with; None: no check
        self.metrics: Counter[str] = Counter({k: 0 for k in METRICS})
        self.errors: Counter[str] = Counter()
        self.needs_reset = False
        self._consumed = 0  # frames the current rx() call has consumed

    def _broken(self, e: QueueBroken) -> None:
        self.needs_reset = True
        self.errors[str(e)] += 1

    # ------------------------------------------------------------- TX
    def tx(self, limit: int = 1 << 30) -> tuple[list[bytes], bool]:
        """Drain up to ``limit`` TX chains: (header+frame per good chain, interrupt?)."""
        out: list[bytes] = []
        if not self.needs_reset:
            try:
                self._tx(out, limit)
                self.txq.set_notify(True)  # drained: ask for a kick at the next buffer
            except QueueBroken as e:
                self._broken(e)
        return out, self._publish(self.txq)

    def _tx(self, out: list[bytes], limit: int) -> None:
        """Drain in batches of at most 256 chains: the rings are resolved once per
        batch, used entries written together, packet counters added per batch."""
        q = self.txq
        m = self.metrics
        read = self.mem.read
        mac = self.mac
        done = 0
        while done < limit:
            want = min(256, limit - done)
            chains, broken = q.pop_many(want)
            if not chains and broken is None:
                return
            done += len(chains)
            used: list[tuple[int, int]] = []
            packets = 0
            nbytes = 0
            try:
                for chain in chains:
                    if isinstance(chain, ChainError):
                        self._drop(used, chain.head, chain.reason, "tx_fails")
                        continue
                    head, readable, writable = chain
                    if writable:
                        self._drop(used, head, "device-writable descriptor on TX", "tx_fails")
                        continue
                    total = readable[0][1] if len(readable) == 1 else sum(n for _, n in readable)
                    if total < NET_HDR_SIZE + ETH_MIN or total > MAX_TX_CHAIN_BYTES:
                        m["tx_malformed_frames"] += 1
                        self._drop(used, head, "frame length out of bounds", None)
                        continue
                    try:
                        if len(readable) == 1:
                            data = read(readable[0][0], total)
                        else:
                            data = b"".join(read(a, n) for a, n in readable)
                    except MemoryFault:
                        self._drop(used, head, "buffer not mapped in guest memory", "tx_fails")
                        continue
                    if data[0] or data[1]:  # flags, gso_type: no offload was negotiated
                        m["tx_malformed_frames"] += 1
                        self._drop(used, head, "offload not negotiated", None)
                        continue
                    if mac is not None and data[SRC_MAC] != mac:
                        m["tx_spoofed_mac_count"] += 1
                        self._drop(used, head, "source MAC not the device's", None)
                        continue
                    out.append(data)
                    packets += 1
                    nbytes += total - NET_HDR_SIZE
                    used.append((head, 0))
            finally:
                self._settle(q, "tx", used, packets, nbytes)
            if broken is not None:
                raise broken
            if len(chains) < want:  # pop_many read the index again and found no more
                return

    def _settle(
        self, q: DeviceQueue, way: str, used: list[tuple[int, int]], packets: int, nbytes: int
    ) -> None:
        """The end of a batch: its counters added, its used entries written."""
        self.metrics[f"{way}_packets_count"] += packets
        self.metrics[f"{way}_bytes_count"] += nbytes
        q.push_many(used)

    def _drop(self, used: list[tuple[int, int]], head: int, reason: str, fails: str | None) -> None:
        """Count a dropped chain (``reason``, and the ``fails`` metric unless None:
        the malformed-frame drops have their own); its head goes back with length
        0 with the batch's used entries."""
        if fails is not None:
            self.metrics[fails] += 1
        self.errors[reason] += 1
        used.append((head, 0))

    def _publish(self, q: DeviceQueue) -> bool:
        try:
            return q.publish()
        except QueueBroken as e:
            self._broken(e)
            return False

    # ------------------------------------------------------------- RX
    def rx(self, frames: list[bytes]) -> tuple[int, bool]:
        """Put ``frames`` (header+frame each) into RX buffers: (consumed, interrupt?).

        A frame that finds no buffer is counted in ``no_rx_avail_buffer`` and
        left for the caller, which retries after the driver adds buffers; the
        device then asks for a kick so that it hears about them. While it has
        buffers it wants no kicks (vhost's handle_rx).
        """
        self._consumed = 0
        if not self.needs_reset:
            try:
                if self._rx(frames) and self._consumed:
                    self.rxq.set_notify(False)
            except QueueBroken as e:
                self._broken(e)
        return self._consumed, self._publish(self.rxq)

    def _rx(self, frames: list[bytes]) -> bool:
        """Fill buffers, counting frames consumed in ``_consumed`` (a frame is
        consumed also when its chain is bad: it is lost with it); False when
        the driver ran out of buffers. Batches as :meth:`_tx` does."""
        q = self.rxq
        m = self.metrics
        write = self.mem.write
        pos = 0
        count = len(frames)
        while pos < count:
            chains, broken = q.pop_many(min(256, count - pos))
            used: list[tuple[int, int]] = []
            packets = 0
            nbytes = 0
            try:
                for chain in chains:
                    data = frames[pos]
                    pos += 1
                    self._consumed += 1
                    if isinstance(chain, ChainError):
                        self._drop(used, chain.head, chain.reason, "rx_fails")
                        continue
                    head, readable, segments = chain
                    if readable:
                        self._drop(used, head, "readable descriptor on RX", "rx_fails")
                        continue
                    need = len(data)
                    if (
                        segments[0][1] if len(segments) == 1 else sum(n for _, n in segments)
                    ) < need:
                        self._drop(used, head, "RX buffer too small for the frame", "rx_fails")
                        continue
                    try:
                        if len(segments) == 1:
                            write(segments[0][0], data)
                        else:
                            self._scatter(segments, data)
                    except MemoryFault:
                        self._drop(used, head, "buffer not mapped in guest memory", "rx_fails")
                        continue
                    used.append((head, need))
                    packets += 1
                    nbytes += need - NET_HDR_SIZE
            finally:
                self._settle(q, "rx", used, packets, nbytes)
            if broken is not None:
                raise broken
            if not chains:
                m["no_rx_avail_buffer"] += 1
                q.set_notify(True)
                return False
        return True

    def _scatter(self, segments: Segments, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        for gpa, n in segments:
            if pos >= len(view):
                break
            k = min(n, len(view) - pos)
            self.mem.write(gpa, view[pos : pos + k])
            pos += k


def with_rx_header(frame: bytes) -> bytes:
    """A frame as the device hands it to RX: the header first."""
    return RX_HDR + frame
