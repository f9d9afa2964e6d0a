"""kvm-unit-tests' ``x86/svm_tests.c`` latency tests, run on the model.

Theory of operation
-------------------
In these tests the kvm-unit-tests binary *is* the L1 hypervisor: it runs in
a KVM guest on an AMD host (L0) and VMRUNs a tiny L2 of its own. Its run
loop (``x86/svm.c`` ``test_run``) is ``CLGI, VMLOAD, VMRUN, VMSAVE, STGI``
with the TSC read before CLGI and after STGI (:data:`sim.svm.TEST_RUN_LOOP`):

``latency_run_exit``
    L2's loop is ``rdtsc; vmmcall``. *VMRUN latency* is from L1's TSC read
    before CLGI to L2's first instruction: CLGI, VMLOAD and the VMRUN that
    exits to L0 (``nested_svm_vmrun``) and enters L2. *VMEXIT latency* is
    from L2's read before VMMCALL to L1's read after STGI: the VMMCALL exit,
    ``nested_svm_vmexit``, the entry into L1, VMSAVE and STGI. The model
    plays exactly these steps on a :class:`~sim.nested_svm.NestedSvm` whose
    L1 is the test, not KVM (no exit framework, no handler).
``latency_svm_insn``
    L1 times VMLOAD, VMSAVE, STGI and CLGI one by one: each runs in L1
    (virtual VMLOAD/VMSAVE, virtual GIF) or exits to L0, which emulates it.

The model is deterministic, so ``max``, ``min`` and ``avg`` of a line are the
same figure; the real test's spread (interrupts, cache misses) is not modeled.
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .costs import Arch, CostModel
from .nested_svm import NestedSvm
from .svm import TEST_RUN_LOOP, SvmInsn
from .vmx import ExitReason

LATENCY_TESTS = ("latency_run_exit", "latency_svm_insn")
#: Each line a test prints (``Latency VMRUN : ...``) -> its test.
LATENCY_LINES = {"VMRUN": "latency_run_exit", "VMEXIT": "latency_run_exit",
                 "VMLOAD": "latency_svm_insn", "VMSAVE": "latency_svm_insn",
                 "STGI": "latency_svm_insn", "CLGI": "latency_svm_insn"}  # fmt: skip
_INSNS = (("VMLOAD", SvmInsn.VMLOAD), ("VMSAVE", SvmInsn.VMSAVE), ("STGI", SvmInsn.STGI),
          ("CLGI", SvmInsn.CLGI))  # fmt: skip


def _test_l1(costs: CostModel, vls: bool | None, vgif: bool | None) -> NestedSvm:
    if Arch(costs.arch) is not Arch.SVM:
        raise ValueError(f"{costs.name} is not an SVM preset")
    cfg = Config.from_preset(costs, nested=True, vls=vls, vgif=vgif)
    return NestedSvm(cfg, run_loop=TEST_RUN_LOOP)


def latency_run_exit(
    costs: CostModel, *, vls: bool | None = None, vgif: bool | None = None
) -> dict[str, float]:
    """VMRUN and #VMEXIT latency in cycles, as the test measures them from L1."""
    m = _test_l1(costs, vls, vgif)
    before = m.stats.cycles
    m.l2_exit(ExitReason.VMCALL, "vmcall")  # L2's VMMCALL, intercepted by the test
    vmexit = m.stats.cycles - before
    before = m.stats.cycles
    m.l1_vmresume()
    return {"VMRUN": m.stats.cycles - before, "VMEXIT": vmexit}


def latency_svm_insn(
    costs: CostModel, *, vls: bool | None = None, vgif: bool | None = None
) -> dict[str, float]:
    """Cycles of VMLOAD, VMSAVE, STGI and CLGI executed by L1."""
    m = _test_l1(costs, vls, vgif)
    m.l2_exit(ExitReason.VMCALL, "vmcall")  # the test runs in L1, after a #VMEXIT
    out = {}
    for name, insn in _INSNS:
        before = m.stats.cycles
        m.l1_svm_insns((insn,), "latency_svm_insn")
        out[name] = m.stats.cycles - before
    return out


def run(costs: CostModel, names: list[str] | None = None, *, vls: bool | None = None,
        vgif: bool | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """The wanted latency tests (both when ``names`` is empty), by test then line."""
    wanted = names or list(LATENCY_TESTS)
    unknown = [n for n in wanted if n not in LATENCY_TESTS]
    if unknown:
        raise KeyError(", ".join(unknown))
    tests = {"latency_run_exit": latency_run_exit, "latency_svm_insn": latency_svm_insn}
    return {n: tests[n](costs, vls=vls, vgif=vgif) for n in LATENCY_TESTS if n in wanted}


def format_lines(results: dict[str, dict[str, Any]]) -> str:
    """The test's own output: ``    Latency VMRUN : max: N min: N avg: N``, then PASS."""
    out = []
    for name, lines in results.items():
        width = max(len(k) for k in lines)
        for label, cycles in lines.items():
            n = int(round(cycles))
            tag = f"{label}:".ljust(width + 1) if name == "latency_svm_insn" else f"{label:<6}:"
            out.append(f"    Latency {tag} max: {n} min: {n} avg: {n}")
        out.append(f"PASS: {name}")
    return "\n".join(out)
