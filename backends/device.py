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
never negotiated (checksum or GSO: :func:`~xlio.virtio.tx_offload_allowed`;
a negotiated one passes through with its header to the wire, as vhost-net
hands it to a tap opened with IFF_VNET_HDR); a frame whose source MAC is not the one
the device was configured with is dropped and counted in
``tx_spoofed_mac_count``. A broken queue (also a used ring that cannot be
written) sets ``needs_reset`` (the device's DEVICE_NEEDS_RESET status bit)
and the device stops touching its rings until the driver resets it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain as chain_from
from itertools import repeat
from operator import ge, itemgetter
from typing import cast

from xlio.sim.memory import GuestMemory, MemoryFault
from xlio.virtio import (
    ETH_MIN,
    MAX_TX_CHAIN_BYTES,
    NET_HDR,
    NET_HDR_SIZE,
    RUN_MIN,
    VIRTIO_NET_F_MRG_RXBUF,
    tx_offload_allowed,
)

from .virtqueue import Chain, ChainError, DeviceQueue, QueueBroken, Segments, simple_chains

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
#: Each direction's packet and byte counters.
_COUNTS = {way: (f"{way}_packets_count", f"{way}_bytes_count") for way in ("rx", "tx")}
#: The Ethernet source address inside header + frame.
SRC_MAC = slice(NET_HDR_SIZE + 6, NET_HDR_SIZE + 12)

_NO_OFFLOAD = repeat(b"\0\0")  # flags and gso_type both 0: what a batch is checked against
_SRC_MAC_OF = itemgetter(SRC_MAC)
Used = tuple[list[int], list[int]]  # a batch's used entries: heads, and their lengths

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
        features: int = 0,
    ) -> None:
        self.mem = mem
        self.rxq = rx
        self.txq = tx
        self.name = name
        self.mac = mac  # the MAC the device was configured with; None: no check
        self.features = features  # negotiated: which TX offloads a header may ask for
        #: VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX buffers
        self.mergeable = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
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
                # drained: ask for a kick at the next buffer, then look again, as
                # vhost_enable_notify does: a driver on another CPU may have
                # published one after the drain and before the ask (it saw no
                # need to kick then), and would wait for ever on a suppressed kick
                self.txq.set_notify(True)
                while len(out) < limit and self.txq.pending():
                    self._tx(out, limit - len(out))
                    self.txq.set_notify(True)
                return out, self.txq.publish()
            except QueueBroken as e:
                self._broken(e)
        return out, self._publish(self.txq)

    def _tx(self, out: list[bytes], limit: int) -> None:
        """Drain in batches of at most 256 chains: the rings are resolved once per
        batch, the chains' shapes checked, their buffers read together
        (:meth:`GuestMemory.read_many`), the frames checked, used entries
        written together and packet counters added per batch.

        The batch's simple chains (:meth:`DeviceQueue.pop_batch`: one readable
        descriptor each) are checked together: when every length is in
        bounds and every frame read passes every check, they are accepted as
        a whole; if any of them fails, each goes through the per-chain checks
        below, which count why, as every other chain does."""
        q = self.txq
        mac = self.mac
        drop = self._drop
        lo, hi = NET_HDR_SIZE + ETH_MIN, MAX_TX_CHAIN_BYTES
        done = 0
        while done < limit:
            want = min(256, limit - done)
            heads, gpas, lens, rest, broken = q.pop_batch(want, write=False)
            taken = len(heads) + len(rest)
            if not taken and broken is None:
                return
            done += taken
            used: Used = ([], [])  # heads returned one by one, with their lengths
            accepted: list[int] = []  # heads of the simple chains accepted as a whole
            first = len(out)
            try:
                if heads and (min(lens) < lo or max(lens) > hi):
                    rest[:0] = simple_chains(heads, gpas, lens, write=False)
                    heads, gpas, lens = [], [], []
                good: list[tuple[int, int]] = []  # (head, descriptors) of rest's good chains
                for chain in rest:
                    if isinstance(chain, ChainError):
                        drop(used, chain.head, chain.reason, "tx_fails")
                        continue
                    head, readable, writable = chain
                    if writable:
                        drop(used, head, "device-writable descriptor on TX", "tx_fails")
                        continue
                    k = len(readable)
                    total = readable[0][1] if k == 1 else sum(n for _, n in readable)
                    if total < lo or total > hi:
                        self.metrics["tx_malformed_frames"] += 1
                        drop(used, head, "frame length out of bounds", None)
                        continue
                    for a, n in readable:
                        gpas.append(a)
                        lens.append(n)
                    good.append((head, k))
                datas = self.mem.read_many(gpas, lens)
                n_simple = len(heads)
                if n_simple >= RUN_MIN and self._all_sendable(datas[:n_simple]):
                    out += cast(list[bytes], datas[:n_simple])
                    accepted = heads
                    checks: Iterable[tuple[int, int]] = good
                    at = n_simple
                else:  # each simple chain as one of one descriptor, then the rest's
                    singles = zip(heads, repeat(1))
                    checks = chain_from(singles, good) if good else singles
                    at = 0
                for head, k in checks:
                    if k == 1:
                        data = datas[at]
                    else:
                        parts = datas[at : at + k]
                        data = None if None in parts else b"".join(parts)  # type: ignore[arg-type]
                    at += k
                    if data is None:
                        drop(used, head, "buffer not mapped in guest memory", "tx_fails")
                    elif (data[0] or data[1]) and not tx_offload_allowed(
                        self.features, data[0], data[1]
                    ):  # flags, gso_type: an offload that was not negotiated
                        self.metrics["tx_malformed_frames"] += 1
                        drop(used, head, "offload not negotiated", None)
                    elif mac is not None and data[SRC_MAC] != mac:
                        self.metrics["tx_spoofed_mac_count"] += 1
                        drop(used, head, "source MAC not the device's", None)
                    else:
                        out.append(data)
                        used[0].append(head)
                        used[1].append(0)
            finally:
                packets = len(out) - first
                nbytes = sum(map(len, out[first:] if first else out)) - NET_HDR_SIZE * packets
                self._settle(q, "tx", used, packets, nbytes, accepted, [0] * len(accepted))
            if broken is not None:
                raise broken
            if taken < want:  # pop_batch read the index again and found no more
                return

    def _all_sendable(self, datas: list[bytes | None]) -> bool:
        """Whether every one of a batch's frames passes the per-frame checks of
        :meth:`_tx` (read, no offload asked for, the device's source MAC), each
        test over the whole batch at once; False sends the batch through them
        one frame at a time, which count the reason."""
        if None in datas:
            return False
        frames = cast(list[bytes], datas)
        mac = self.mac
        return all(map(bytes.startswith, frames, _NO_OFFLOAD)) and (
            mac is None or all(map(mac.__eq__, map(_SRC_MAC_OF, frames)))
        )

    def _settle(
        self,
        q: DeviceQueue,
        way: str,
        used: Used,
        packets: int,
        nbytes: int,
        heads: Sequence[int] = (),
        lengths: Sequence[int] = (),
    ) -> None:
        """The end of a batch: its counters added, its used entries written
        (each of ``heads`` with its length from ``lengths``, then ``used``)."""
        packets_key, bytes_key = _COUNTS[way]
        self.metrics[packets_key] += packets
        self.metrics[bytes_key] += nbytes
        if heads:
            q.push_many(heads, lengths)
        if used[0]:
            q.push_many(*used)

    def _drop(self, used: Used, head: int, reason: str, fails: str | None) -> None:
        """Count a dropped chain (``reason``, and the ``fails`` metric unless None:
        the malformed-frame drops have their own); its head goes back with length
        0 with the batch's used entries."""
        if fails is not None:
            self.metrics[fails] += 1
        self.errors[reason] += 1
        used[0].append(head)
        used[1].append(0)

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
                return self._consumed, self.rxq.publish()
            except QueueBroken as e:
                self._broken(e)
        return self._consumed, self._publish(self.rxq)

    def _rx(self, frames: list[bytes]) -> bool:
        """Fill buffers, counting frames consumed in ``_consumed`` (a frame is
        consumed also when its chain is bad: it is lost with it); False when
        the driver ran out of buffers. Batches as :meth:`_tx` does: each
        batch's single-buffer frames are written together
        (:meth:`GuestMemory.write_many`)."""
        q = self.rxq
        drop = self._drop
        pos = 0
        count = len(frames)
        while pos < count:
            heads, gpas, lens, rest, broken = q.pop_batch(min(256, count - pos), write=True)
            taken = len(heads) + len(rest)
            self._consumed += taken  # one frame per chain, good or not
            used: Used = ([], [])  # heads dropped or scattered, with their lengths
            filled: list[int] = []  # heads written, with their lengths
            filled_sizes: list[int] = []
            packets = nbytes = 0
            try:
                # the simple chains (one writable buffer each) in a row: written
                # together when every frame fits its buffer, else one by one below
                datas = frames[pos : pos + len(heads)]
                if heads and not all(map(ge, lens, map(len, datas))):
                    rest[:0] = simple_chains(heads, gpas, lens, write=True)
                    heads, gpas, datas = [], [], []
                pos += len(heads)
                merged = 0  # buffers beyond a frame's first, when frames span several
                short = False  # a frame that spans buffers found too few
                j = 0
                while j < len(rest):
                    chain = rest[j]
                    j += 1
                    data = frames[pos]
                    pos += 1
                    if isinstance(chain, ChainError):
                        drop(used, chain.head, chain.reason, "rx_fails")
                        continue
                    head, readable, segments = chain
                    if readable:
                        drop(used, head, "readable descriptor on RX", "rx_fails")
                        continue
                    need = len(data)
                    if self.mergeable and len(segments) == 1 and segments[0][1] < need:
                        more = self._merge(chain, data, rest, j, heads, gpas, datas, used)
                        if more is None:  # not enough buffers yet: the frame waits
                            pos -= 1
                            self._consumed -= 1 + (len(rest) - j)
                            short = True
                            break
                        self._consumed -= more[0]
                        j += more[0]
                        merged += more[1]
                        continue
                    if len(segments) == 1:
                        if segments[0][1] < need:
                            drop(used, head, "RX buffer too small for the frame", "rx_fails")
                            continue
                        gpas.append(segments[0][0])
                        datas.append(data)
                        heads.append(head)
                        continue
                    if sum(n for _, n in segments) < need:
                        drop(used, head, "RX buffer too small for the frame", "rx_fails")
                        continue
                    try:
                        self._scatter(segments, data)
                    except MemoryFault:
                        drop(used, head, "buffer not mapped in guest memory", "rx_fails")
                        continue
                    used[0].append(head)
                    used[1].append(need)
                    packets += 1
                    nbytes += need - NET_HDR_SIZE
                failed = self.mem.write_many(gpas, datas)
                if failed:
                    for i in failed:
                        drop(used, heads[i], "buffer not mapped in guest memory", "rx_fails")
                    bad = set(failed)
                    heads = [h for i, h in enumerate(heads) if i not in bad]
                    datas = [d for i, d in enumerate(datas) if i not in bad]
                sizes = list(map(len, datas))
                packets += len(heads) - merged
                nbytes += sum(sizes) - NET_HDR_SIZE * (len(heads) - merged)
                filled, filled_sizes = heads, sizes
            finally:
                self._settle(q, "rx", used, packets, nbytes, filled, filled_sizes)
            if broken is not None:
                raise broken
            if short:  # a kick once the driver adds buffers beyond those it has
                if q.kick_beyond_known():
                    continue
                self.metrics["no_rx_avail_buffer"] += 1
                return False
            if not taken:
                q.set_notify(True)  # out of buffers: a kick when there are more...
                if q.pending():  # ...unless the driver added some meanwhile (see tx)
                    continue
                self.metrics["no_rx_avail_buffer"] += 1
                return False
        return True

    def _merge(
        self, first: Chain, data: bytes, rest: list[Chain | ChainError], j: int,
        heads: list[int], gpas: list[int], datas: list[bytes], used: Used,
    ) -> tuple[int, int] | None:  # fmt: skip
        """VIRTIO_NET_F_MRG_RXBUF: ``data`` over ``first`` and as many further
        one-buffer chains as it takes, in ring order (the batch's ``rest`` from
        ``j``, then the ring), each buffer filled in turn, the header's
        ``num_buffers`` their count (virtio 1.x, 5.1.6.4). The buffers join
        the batch's writes, consecutive, as the driver reads them back.
        Returns (chains taken from ``rest``, buffers beyond the first); None
        when the ring has too few buffers now: then the chains it took from
        the ring go back (vhost's ``vhost_discard_vq_desc``) and the frame
        waits for a kick. A bad chain among them drops the frame."""
        q = self.rxq
        bufs = [(first[0], first[2][0])]
        room = first[2][0][1]
        if room < NET_HDR_SIZE:  # the header must lie in the first buffer (5.1.6.4)
            self._drop(used, first[0], "RX buffer too small for the header", "rx_fails")
            return 0, 0
        from_rest = popped = 0
        while room < len(data):
            if j + from_rest < len(rest):
                c = rest[j + from_rest]
                from_rest += 1
            else:
                got: Chain | ChainError | None
                try:
                    got = q.pop()
                except ChainError as e:
                    got = e
                if got is None:
                    q.unpop(popped + from_rest + 1)
                    return None
                c = got
                popped += 1
            if isinstance(c, ChainError) or c[1] or len(c[2]) != 1:
                bad = c.head if isinstance(c, ChainError) else c[0]
                for i, h in enumerate([b[0] for b in bufs] + [bad]):  # one frame failed
                    self._drop(used, h, "bad buffer in a merged frame", None if i else "rx_fails")
                return from_rest, 0
            bufs.append((c[0], c[2][0]))
            room += c[2][0][1]
        k = len(bufs)
        view = memoryview(data)
        at = 0
        for i, (h, (gpa, n)) in enumerate(bufs):
            chunk = bytes(view[at : at + n])
            if i == 0:  # num_buffers, the header's last field
                chunk = chunk[:10] + k.to_bytes(2, "little") + chunk[12:]
            heads.append(h)
            gpas.append(gpa)
            datas.append(chunk)
            at += n
        return from_rest, k - 1

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
