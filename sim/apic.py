"""L2's local APIC as L1 sees it: the posted-interrupt descriptor L1 set up
for L2 and the IRR and ISR of L2's virtual-APIC page.

Posting (SDM 29.6) sets a vector's bit in the descriptor's PIR and its ON
bit; posted-interrupt processing, at the next VM entry or on the
notification vector, moves PIR into the virtual-APIC page's IRR and clears
ON; the guest's EOI ends its highest pending vector. :class:`~sim.nested.NestedVmx`
decides *when* each happens (with APICv or through L1's injection); these
classes only keep the bits.
"""

from __future__ import annotations

#: The vector of L2's virtio-net interrupt (any device vector would do).
NIC_VECTOR = 0x31


class PostedInterruptDescriptor:
    """A posted-interrupt descriptor (SDM 29.6): the PIR bitmap and ON."""

    __slots__ = ("pir", "on")

    def __init__(self) -> None:
        self.pir = 0
        self.on = False

    def post(self, vector: int) -> None:
        self.pir |= 1 << vector
        self.on = True


class VirtualApicPage:
    """The IRR and ISR of a virtual-APIC page (what L1 sees of L2's APIC)."""

    __slots__ = ("irr", "isr", "delivered")

    def __init__(self) -> None:
        self.irr = 0
        self.isr = 0
        self.delivered = 0

    def accept(self, pid: PostedInterruptDescriptor) -> None:
        """Posted-interrupt processing: PIR moves into IRR and ON clears."""
        if pid.on:
            self.irr |= pid.pir
            pid.pir = 0
            pid.on = False

    def eoi(self) -> None:
        """The guest handled its highest pending vector and ends it."""
        if self.irr:
            v = self.irr.bit_length() - 1
            self.irr &= ~(1 << v)
            self.delivered += 1
