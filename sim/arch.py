"""Which machine models a configuration: nested VMX or nested SVM, by the preset's arch."""

from __future__ import annotations

from .config import Config
from .costs import Arch
from .machine import NestedMachine
from .nested import NestedVmx
from .nested_svm import NestedSvm

MACHINES: dict[Arch, type[NestedMachine]] = {Arch.VMX: NestedVmx, Arch.SVM: NestedSvm}


def machine_for(config: Config) -> NestedMachine:
    """A fresh machine of the configuration's architecture (:attr:`Config.arch`)."""
    return MACHINES[config.arch](config)
