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

from .virtqueue import ChainError, DeviceQueue, QueueBroken

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
        q = self.txq
        m = self.metrics
        done = 0
        while done < limit:
            try:
                chain = q.pop()
            except ChainError as e:
                self._drop_tx(e.head, e.reason)
                done += 1
                continue
            if chain is None:
                return
            done += 1
            if chain.writable:
                self._drop_tx(chain.head, "device-writable descriptor on TX")
                continue
            readable = chain.readable
            total = readable[0][1] if len(readable) == 1 else sum(n for _, n in readable)
            if total < NET_HDR_SIZE + ETH_MIN or total > MAX_TX_CHAIN_BYTES:
                m["tx_malformed_frames"] += 1
                self._drop_tx(chain.head, "frame length out of bounds", fail=False)
                continue
            try:
                if len(chain.readable) == 1:
                    gpa, n = chain.readable[0]
                    data = self.mem.read(gpa, n)
                else:
                    data = b"".join(self.mem.read(a, n) for a, n in chain.readable)
            except MemoryFault:
                self._drop_tx(chain.head, "buffer not mapped in guest memory")
                continue
            if data[0] or data[1]:  # flags, gso_type: no offload was negotiated
                m["tx_malformed_frames"] += 1
                self._drop_tx(chain.head, "offload not negotiated", fail=False)
                continue
            if self.mac is not None and data[SRC_MAC] != self.mac:
                m["tx_spoofed_mac_count"] += 1
                self._drop_tx(chain.head, "source MAC not the device's", fail=False)
                continue
            out.append(data)
            m["tx_packets_count"] += 1
            m["tx_bytes_count"] += total - NET_HDR_SIZE
            q.push(chain.head, 0)

    def _drop_tx(self, head: int, reason: str, fail: bool = True) -> None:
        if fail:
            self.metrics["tx_fails"] += 1
        self.errors[reason] += 1
        self.txq.push(head, 0)

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
        the driver ran out of buffers."""
        q = self.rxq
        m = self.metrics
        for data in frames:
            try:
                chain = q.pop()
            except ChainError as e:
                self._consumed += 1
                self._drop_rx(e.head, e.reason)
                continue
            if chain is None:
                m["no_rx_avail_buffer"] += 1
                q.set_notify(True)
                return False
            self._consumed += 1
            if chain.readable:
                self._drop_rx(chain.head, "readable descriptor on RX")
                continue
            need = len(data)
            if sum(n for _, n in chain.writable) < need:
                self._drop_rx(chain.head, "RX buffer too small for the frame")
                continue
            try:
                self._scatter(chain.writable, data)
            except MemoryFault:
                self._drop_rx(chain.head, "buffer not mapped in guest memory")
                continue
            q.push(chain.head, need)
            m["rx_packets_count"] += 1
            m["rx_bytes_count"] += need - NET_HDR_SIZE
        return True

    def _scatter(self, segments: list[tuple[int, int]], data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        for gpa, n in segments:
            if pos >= len(view):
                break
            k = min(n, len(view) - pos)
            self.mem.write(gpa, view[pos : pos + k])
            pos += k

    def _drop_rx(self, head: int, reason: str) -> None:
        self.metrics["rx_fails"] += 1
        self.errors[reason] += 1
        self.rxq.push(head, 0)


def with_rx_header(frame: bytes) -> bytes:
    """A frame as the device hands it to RX: the header first."""
    return RX_HDR + frame
