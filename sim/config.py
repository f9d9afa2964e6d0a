"""A nested VMX machine's configuration: the cost preset plus every switch.

Resolved once (:meth:`Config.from_preset`: the preset's defaults, then the
user's overrides), frozen for the machine's life: the model memoizes
compiled handler fragments and replayed operations on that promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .costs import CostModel
from .profiles import CACHE_MODES

OPERANDS = ("register", "memory")


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
    trace: bool = False

    @classmethod
    def from_preset(cls, costs: CostModel, **overrides: Any) -> Config:
        """Defaults from the preset (shadowing, cache mode, APICv), then the overrides."""
        base: dict[str, Any] = {
            "shadow_vmcs": costs.shadow_vmcs,
            "cache_reg": costs.cache_reg,
            "apicv": costs.apicv,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(costs=costs, **base)
        if cfg.operand not in OPERANDS:
            raise ValueError(f"operand must be one of {', '.join(OPERANDS)}")
        if cfg.cache_reg not in CACHE_MODES:
            raise ValueError(f"cache_reg must be one of {', '.join(CACHE_MODES)}")
        return cfg

    def describe(self) -> dict[str, Any]:
        return {
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
