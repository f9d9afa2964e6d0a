"""xlio.sim: an in-process model of nested VMX and SVM, EPT and NPT, that charges every exit."""

from .arch import machine_for
from .config import Config
from .costs import Arch, CostModel
from .nested import ModelError, NestedVmx
from .nested_svm import NestedSvm
from .presets import PRESETS
from .svm import SvmExit
from .vmx import ExitReason, VmcsField

__all__ = [
    "PRESETS", "Arch", "Config", "CostModel", "ExitReason", "ModelError", "NestedSvm",
    "NestedVmx", "SvmExit", "VmcsField", "machine_for",
]  # fmt: skip
