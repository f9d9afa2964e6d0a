"""xlio.sim: an in-process model of nested VMX and EPT that charges every exit."""

from .config import Config
from .costs import CostModel
from .nested import ModelError, NestedVmx
from .presets import PRESETS
from .vmx import ExitReason, VmcsField

__all__ = ["PRESETS", "Config", "CostModel", "ExitReason", "ModelError", "NestedVmx", "VmcsField"]
