"""A nested VMX machine's configuration: the cost preset plus every switch.

Resolved once (:meth:`Config.from_preset`: the preset's defaults, then the
user's overrides), frozen for the machine's life: the model memoizes
compiled handler fragments and replayed operations on that promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .costs import Arch, CostModel
from .profiles import CACHE_MODES

OPERANDS = ("register", "memory")

#: Switches that exist on one architecture only: (switch, arch, why not on the other).
ARCH_ONLY: tuple[tuple[str, Arch, str], ...] = (
    ("shadow_vmcs", Arch.VMX, "VMCS shadowing is VMX's; SVM has no VMREAD/VMWRITE"),
    ("operand", Arch.VMX, "VMREAD/VMWRITE operands are VMX's; L1 reads VMCB12 as memory"),
    ("cache_reg", Arch.VMX, "L1's cache of VMCS fields is VMX's; VMCB12 is memory"),
    ("vmcs_exits", Arch.VMX, "VMCS-access exits are VMX's; SVM has none"),
    ("vls", Arch.SVM, "virtual VMLOAD/VMSAVE is AMD's"),
    ("vgif", Arch.SVM, "virtual GIF is AMD's"),
)
#: Why an SVM L2 has no APICv (AVIC) to switch on.
NO_AVIC_FOR_L2 = "Linux 6.1 inhibits AVIC while a vCPU runs L2 (APICV_INHIBIT_REASON_NESTED)"


#: A switch's value that means "not used": passing it on the other architecture is harmless.
_NEUTRAL: dict[str, Any] = {"operand": "register", "vmcs_exits": True, "shadow_vmcs": False,
                            "vls": False, "vgif": False}  # fmt: skip


@dataclass(frozen=True)
class Config:
    """A resolved configuration: the cost preset plus every switch."""

    costs: CostModel
    nested: bool = True
    shadow_vmcs: bool = False
    vmcs_exits: bool = True  # False: Turtles' hypothetical exitless VMREAD/VMWRITE
    operand: str = "register"
    cache_reg: str = "base"
    apicv: bool = False  # APICv at L0 and, nested, exposed to L1 for L2
    virtual_idle: bool = False  # DVH's virtual idle: L0 keeps L2's HLT
    vls: bool = False  # SVM: virtual VMLOAD/VMSAVE for L1
    vgif: bool = False  # SVM: virtual GIF for L1
    trace: bool = False

    @property
    def arch(self) -> Arch:
        return Arch(self.costs.arch)

    @classmethod
    def from_preset(cls, costs: CostModel, **overrides: Any) -> Config:
        """Defaults from the preset (shadowing, cache mode, APICv, vls, vgif), then
        the overrides. A switch of the other architecture raises ValueError, as
        does APICv on SVM (AVIC is inhibited while a vCPU runs L2)."""
        arch = Arch(costs.arch)
        given = {k: v for k, v in overrides.items() if v is not None}
        for switch, only, why in ARCH_ONLY:
            if switch in given and only is not arch and given[switch] != _NEUTRAL.get(switch):
                raise ValueError(
                    f"{switch.replace('_', '-')} is not for {arch.value.upper()}: {why}"
                )
        if arch is Arch.SVM and given.get("apicv"):
            raise ValueError(f"apicv is not for SVM L2: {NO_AVIC_FOR_L2}")
        base: dict[str, Any] = {
            "shadow_vmcs": costs.shadow_vmcs,
            "cache_reg": costs.cache_reg,
            "apicv": costs.apicv,
            "vls": costs.vls,
            "vgif": costs.vgif,
        }
        base.update(given)
        cfg = cls(costs=costs, **base)
        if cfg.operand not in OPERANDS:
            raise ValueError(f"operand must be one of {', '.join(OPERANDS)}")
        if cfg.cache_reg not in CACHE_MODES:
            raise ValueError(f"cache_reg must be one of {', '.join(CACHE_MODES)}")
        return cfg

    def describe(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"arch": self.arch.value}
        if self.arch is Arch.SVM:
            arch |= {"vls": self.vls, "vgif": self.vgif}
        return arch | {
            "preset": self.costs.name,
            "clock_ghz": self.costs.clock_ghz,
            "nested": self.nested,
            "shadow_vmcs": self.shadow_vmcs,
            "vmcs_exits": self.vmcs_exits,
            "operand": self.operand,
            "cache_reg": self.cache_reg,
            "dirty_tracking": self.costs.dirty_tracking,
            "apicv": self.apicv,
            "virtual_idle": self.virtual_idle,
            "costs": {k: p.value for k, p in sorted(self.costs.params.items())},
            "costs_set": {
                k: p.source for k, p in sorted(self.costs.params.items()) if p.kind == "user"
            },
        }
