"""The loopback wire: L0's side of the network joined to an in-process peer.

Frames leave L0's device with their 12-byte virtio-net header (as through a
tap with IFF_VNET_HDR); the wire strips it for the peer and adds a plain RX
header to what the peer sends back. The peer is an :class:`Endpoint` that
answers ARP, ICMP echo and UDP echo, and can originate traffic
(:meth:`LoopbackWire.inject`). Deterministic, no I/O, no root.
"""

from __future__ import annotations

from collections import deque

from xlio.packets import Endpoint, ip4, mac
from xlio.virtio import NET_HDR_SIZE

from .device import with_rx_header
from .netns import GUEST_IP as GUEST_IP_TEXT
from .netns import HOST_IP

PEER_MAC = mac("02:00:00:00:00:01")
PEER_IP = ip4(HOST_IP)
GUEST_MAC = mac("02:00:00:00:00:02")
GUEST_IP = ip4(GUEST_IP_TEXT)


class Inbox:
    """Frames (header + frame) waiting for L0's RX path, what every wire has."""

    def __init__(self) -> None:
        self.to_guest: deque[bytes] = deque()

    def take(self, limit: int) -> list[bytes]:
        """Up to ``limit`` frames waiting for L0's RX path."""
        q = self.to_guest
        if len(q) <= limit:  # all of it (a request at a time, a burst's tail)
            out = list(q)
            q.clear()
            return out
        return [q.popleft() for _ in range(limit)]

    def put_back(self, frames: list[bytes]) -> None:
        """Frames L0 could not place yet stay at the head of the line."""
        self.to_guest.extendleft(reversed(frames))


class LoopbackWire(Inbox):
    """L0's wire to a peer endpoint (see the module docstring)."""

    def __init__(self, peer: Endpoint | None = None, capture: bool = False) -> None:
        super().__init__()
        self.peer = peer or Endpoint(PEER_MAC, PEER_IP)
        self.seen_by_peer: list[bytes] | None = [] if capture else None
        self.frames_to_peer = 0

    def transmit(self, hdr_frames: list[bytes]) -> None:
        """L0 puts frames on the wire; the peer answers at once."""
        for hf in hdr_frames:
            frame = hf[NET_HDR_SIZE:]
            self.frames_to_peer += 1
            if self.seen_by_peer is not None:
                self.seen_by_peer.append(frame)
            for reply in self.peer.handle(frame):
                self.to_guest.append(with_rx_header(reply))

    def inject(self, frames: list[bytes]) -> None:
        """The peer originates frames toward the guest."""
        self.to_guest.extend(with_rx_header(f) for f in frames)
