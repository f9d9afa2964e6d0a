"""Micro-workloads: one guest operation, run on a path, charged by the model.

A workload's ``build`` runs once before counting starts (control plane: L1
delegating a port to L0) and returns the operation to repeat. Paths:

``single``  a plain VM of L0 does the operation (baseline).
``l1``      nested; L1 handles L2's I/O (the classic path).
``l0``      nested; L1 has delegated L2's device to L0, which serves it directly.
            Only I/O can bypass L1: for CPUID and VMCALL, ``l0`` is ``l1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .nested import L1, NestedVmx
from .vmx import ExitReason

PATHS = ("single", "l1", "l0")

#: The legacy virtio-pci notify register of L2's NIC: BAR0 (I/O) + 0x10, with
#: BAR0 where QEMU usually places the first virtio device's I/O BAR.
VIRTIO_NOTIFY_PORT = 0xC050


Op = Callable[[], None]
Builder = Callable[[NestedVmx, str, dict[str, Any]], Op]


def _reflectable(m: NestedVmx, reason: ExitReason, handler: str, **kw: Any) -> None:
    if m.l2_exit(reason, handler, **kw) == L1:
        m.l1_vmresume()


def _simple(reason: ExitReason, handler: str) -> Builder:
    def build(m: NestedVmx, path: str, opts: dict[str, Any]) -> Op:
        return lambda: _reflectable(m, reason, handler)

    return build


def _port_io(handler: str) -> Builder:
    def build(m: NestedVmx, path: str, opts: dict[str, Any]) -> Op:
        if path == "l0":  # control plane: L1 delegates the notify port to L0
            m.l1_set_io_passthrough(frozenset({VIRTIO_NOTIFY_PORT}))
        return lambda: _reflectable(m, ExitReason.IO_INSTRUCTION, handler, port=VIRTIO_NOTIFY_PORT)

    return build


def _mmio_kick(m: NestedVmx, path: str, opts: dict[str, Any]) -> Op:
    # EPT misconfigurations are L0's first; L0 finds L1's MMIO marker in EPT12
    # (classic path) or its own delegated notify page (direct path), where the
    # fast-MMIO bus needs no decode because L0's exit information is trusted.
    to_l1 = path == "l1"
    return lambda: _reflectable(
        m, ExitReason.EPT_MISCONFIG, "mmio_kick", to_l1=to_l1, l0_handler="io_kick"
    )


@dataclass(frozen=True)
class Workload:
    name: str
    build: Builder
    description: str
    per: str = "op"  # what per_op counts: an operation, a frame, a request, a second


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("cpuid", _simple(ExitReason.CPUID, "cpuid"), "one CPUID in the guest"),
        Workload("vmcall", _simple(ExitReason.VMCALL, "vmcall"), "one no-op hypercall"),
        Workload(
            "io-kick", _port_io("io_kick"),
            "one port-I/O virtio kick, in-kernel backend (ioeventfd)",
        ),
        Workload(
            "io-user", _port_io("io_user"),
            "one port I/O handled by the hypervisor's userspace device model",
        ),
        Workload("mmio-kick", _mmio_kick, "one MMIO virtio kick (EPT misconfiguration)"),
    )
}  # fmt: skip
