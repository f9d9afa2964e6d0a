"""Virtio 1.x facts shared by drivers and devices: split-ring layout, flags, features.

From the virtio 1.x specification (2.7 "Split Virtqueues", 5.1 "Network
Device"): a queue of ``size`` entries (a power of two, at most 32768) is a
descriptor table (16 bytes per entry: ``addr u64, len u32, flags u16, next
u16``, 16-byte aligned), an available ring (``flags u16, idx u16,
ring[size] u16, used_event u16``, 2-byte aligned) and a used ring (``flags
u16, idx u16, ring[size] {id u32, len u32}, avail_event u16``, 4-byte
aligned), all little endian, with free-running 16-bit indices.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

MAX_QUEUE_SIZE = 32768

# descriptor flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# ring flags (without VIRTIO_F_EVENT_IDX)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# feature bits (virtio 1.x, 5.1.3 and 6)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# virtio-net header: flags and gso_type (virtio 1.x, 5.1.6)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

# device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len


#: Ring work in runs (one ``struct`` call for a run of ring entries or of
#: consecutive descriptors, a batch's checks over the whole batch) pays off
#: from this many entries; a shorter batch is done one entry at a time, as
#: before runs existed. ``python scripts/run_crossover.py`` (l0, µs per
#: frame with runs for every batch against none): TX 1.50x at 4 frames a
#: batch, 1.19x at 8, 1.12x at 12, 0.97x at 16, 0.80x at 64; RX within
#: 0.94-1.16x from 4 to 24 (noise), 0.91x at 32, 0.88x at 64. Used for
#: every batch, runs took a one-frame kick to 1.33-1.43x its time
#: (``scripts/bench_inproc.py``).
RUN_MIN = 16


@functools.cache
def u16s(n: int) -> struct.Struct:
    """``n`` little-endian u16 in a row: a run of available-ring entries."""
    return struct.Struct(f"<{n}H")


@functools.cache
def u32s(n: int) -> struct.Struct:
    """``n`` little-endian u32 in a row: a run of used elements is ``u32s(2 * k)``."""
    return struct.Struct(f"<{n}I")


@functools.cache
def descs(n: int) -> struct.Struct:
    """``n`` descriptors in a row of the descriptor table (flat: addr, len,
    flags, next, addr, ...)."""
    return struct.Struct("<" + "QIHH" * n)


def _is_run(ids: Sequence[int], at: int, k: int, step: int) -> bool:
    first = ids[at]
    return list(ids[at : at + k]) == list(range(first, first + step * k, step))


def id_runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``ids`` cut into runs of consecutive ids, each (where it starts, how many,
    +1 up or -1 down), longest first from the left. A run's length is found
    by bisection on "the first k form a run" (true for every k up to the
    run's length, whatever the ids), each test a comparison in C: a batch of
    a few runs costs a few dozen tests, not a step per id."""
    out = []
    n = len(ids)
    at = 0
    while at < n:
        if at + 1 == n:
            out.append((at, 1, 1))
            break
        step = ids[at + 1] - ids[at]
        if step not in (1, -1):
            out.append((at, 1, 1))
            at += 1
            continue
        lo, hi = 2, n - at  # the run is at least lo long; find the longest <= hi
        if not _is_run(ids, at, hi, step):
            while hi - lo > 1:  # invariant: lo is a run, hi is not
                mid = (lo + hi) // 2
                if _is_run(ids, at, mid, step):
                    lo = mid
                else:
                    hi = mid
            hi = lo
        out.append((at, hi, step))
        at += hi
    return out


def ring_run(
    page: bytearray, off: int, start: int, n: int, size: int, width: int
) -> tuple[int, ...]:
    """``n`` entries of one ring from slot ``start``, wrapping at ``size``
    slots (the ring's first slot at ``off`` in ``page``): u16 each for the
    available ring (``width`` 2), an (id, len) pair of u32 each for the used
    ring (``width`` 8, flat: id, len, id, len, ...)."""
    st, per = (u16s, 1) if width == 2 else (u32s, 2)
    head = min(n, size - start)
    first = st(head * per).unpack_from(page, off + width * start)
    if head == n:
        return first
    return first + st((n - head) * per).unpack_from(page, off)


#: virtio-net header with VERSION_1: flags u8, gso_type u8, hdr_len u16,
#: gso_size u16, csum_start u16, csum_offset u16, num_buffers u16.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12
#: Largest frame a device accepts on TX: 64 KiB of GSO payload plus headers
#: (Firecracker's limit, 65,562 bytes including the 12-byte header).
MAX_TX_CHAIN_BYTES = 65562
ETH_MIN = 14  # a frame shorter than an Ethernet header is malformed


def desc_table_size(size: int) -> int:
    return 16 * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    return 6 + 8 * size


def bit(features: int, b: int) -> bool:
    """Whether feature bit ``b`` is set in ``features``."""
    return bool(features >> b & 1)


def tx_offload_allowed(features: int, flags: int, gso_type: int) -> bool:
    """Whether a TX header's offload request is one the negotiated
    ``features`` allow: NEEDS_CSUM needs VIRTIO_NET_F_CSUM; a TCPv4 or TCPv6
    segmentation request needs HOST_TSO4 or HOST_TSO6 and checksum offload,
    which GSO implies (5.1.6.2); the ECN bit HOST_ECN. No other flag or GSO
    type is served (UDP fragmentation offload was never offered)."""
    if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return False
    if flags and not bit(features, VIRTIO_NET_F_CSUM):
        return False
    if gso_type & VIRTIO_NET_HDR_GSO_ECN and not bit(features, VIRTIO_NET_F_HOST_ECN):
        return False
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        return True
    need = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6}.get(gso)  # fmt: skip
    return need is not None and bit(features, need) and bit(features, VIRTIO_NET_F_CSUM)


def need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO_F_EVENT_IDX: notify iff ``event`` lies in ``[old, new)``, 16-bit wrapping."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0
