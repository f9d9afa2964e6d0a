"""Nested SVM: what only AMD's SVM does, on :class:`sim.machine.NestedMachine`.

Theory of operation
-------------------
The levels and the two states (``L2`` running on VMCB02, ``L1`` handling a
reflected exit) are the machine's. What SVM changes, as Linux 6.1 does it
(``arch/x86/kvm/svm/nested.c``, ``svm.c``, ``vmenter.S``; REFERENCE 12):

* **VMCBs, not VMCSs.** L0 runs L1 on VMCB01 and L2 on VMCB02, which it
  builds from L1's VMCB12. VMCB12 is a page of L1's memory: L1's handler
  reads the exit code and writes the next RIP or an ``event_inj`` with plain
  loads and stores (``vmcb_access`` each), so no VMCS-access exit exists,
  and neither does shadowing, an operand choice or a register cache.
* **Reflection** is ``nested_svm_vmexit`` (``svm_vmexit``): L2's state and
  the exit fields are written into VMCB12, L0 switches to VMCB01, clears
  GIF, and ``nested_svm_transition_tlb_flush`` flushes the ASID L1 and L2
  share and syncs the MMU (``asid_flush``); the nested MMU context drops.
* **L1's run loop** (:class:`sim.svm.RunLoop`): a KVM L1 runs ``CLGI,
  VMLOAD, VMRUN, VMSAVE, VMLOAD (host), STGI`` around each entry. VMRUN
  always exits (L0 requires the intercept). VMLOAD/VMSAVE run in L1 without
  an exit with virtual VMLOAD/VMSAVE (``vls``), STGI/CLGI with virtual GIF
  (``vgif``); otherwise each is an exit L0 emulates (``handler.vmload``, ...).
  So an L2 CPUID is 2 exits with both, 7 with neither.
* **L1's VMRUN** is ``nested_svm_vmrun`` -> ``enter_svm_guest_mode``
  (``vmrun_emulate``): the control area copied and checked, the save area
  copied (its SEG, DT and DR groups only when VMCB12 marks them dirty and
  L0 honours clean bits: ``vmcb_save_copy``, ``clean_bits``), the MSR
  permission map merged (``msrpm_merge``), ``recalc_intercepts``, and the
  ASID flush again.
* **Interrupts for L2 always go through L1**: AVIC is inhibited while a vCPU
  runs L2, so there is no posted-interrupt path (``apicv`` is refused). L1
  injects through VMCB12's ``event_inj``; if L2 has interrupts off, L1 sets
  V_IRQ and intercepts VINTR, and the window opening (:meth:`l2_sti`) costs
  an ``SVM_EXIT_VINTR`` and its reflection.
* **NPT on NPT** is the shadow NPT MMU (``kvm_init_shadow_npt_mmu``, the
  same code as nested EPT): an L2 NPF always reaches L0 (``SVM_EXIT_NPF``
  stays with L0 in ``nested_svm_exit_special``); L0 fills its shadow if L1's
  NPT maps the page, else reflects it. :mod:`sim.vept` drives that. L1's
  TLB flush after an NPT12 change (INVEPT on VMX) is a ``TLB_CONTROL`` write
  in VMCB12, no exit; L0's sync of the shadow (``kvm_mmu_sync_roots`` on the
  KVM_REQ_MMU_SYNC of the next nested transition) is the work
  :meth:`sim.vept.VirtualEpt.invept` charges, counted in ``invept_emulated``.

The workloads speak :class:`~sim.vmx.ExitReason`; :data:`sim.svm.SVM_EXIT_FOR`
turns each into the #VMEXIT code the counters and traces show.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any

from .accounting import L1_HANDLERS, SYNTHESIZED
from .apic import NIC_VECTOR
from .config import Config
from .machine import L0, L1, L2, ModelError, NestedMachine
from .profiles import FRAGMENTS, PROFILES
from .svm import (
    KVM_RUN_LOOP,
    NESTED_SVM_VMEXIT_VMCB12,
    NO_SVM_EXIT,
    SVM_CR_WRITE,
    SVM_EXIT_FOR,
    VMCB02_SAVE_GROUPS,
    RunLoop,
    SvmExit,
    SvmInsn,
    Vmcb12Controls,
    route_l2_exit,
)
from .vmcs import Vmcs
from .vmx import ExitReason

__all__ = ["L0", "L1", "L2", "NestedSvm"]

#: Work rows of Stats.work this module charges.
L1_VMCB12 = "L1 VMCB12 accesses"
L1_SVM_INSNS = "L1 SVM instructions (virtualized)"


class NestedSvm(NestedMachine):
    """Nested SVM: see the module docstring."""

    EXIT_CODES = SvmExit
    l1_controls: Vmcb12Controls

    def __init__(self, config: Config, run_loop: RunLoop = KVM_RUN_LOOP) -> None:
        if config.apicv:
            raise ModelError("no AVIC for L2: Linux 6.1 inhibits it while a vCPU runs L2")
        super().__init__(config)
        c = self.costs
        self.run_loop = run_loop
        self.l1_controls = Vmcb12Controls()
        # per transition, fixed for the machine's life
        self._vmexit_l0 = c.svm_vmexit + c.asid_flush
        # a KVM L1 marks VMCB12 clean after each run; kvm-unit-tests leaves clean = 0
        self._copies_groups = not (c.clean_bits and run_loop.kvm)
        save = c.vmcb_save_copy if self._copies_groups else 0
        self._vmrun_l0 = c.vmrun_emulate + c.msrpm_merge + save + c.asid_flush
        # the run loop's instructions and INVLPGA (VMRUN is _nested_svm_vmrun's)
        self._insn_cost: dict[SvmInsn, tuple[bool, float]] = {
            i: self._insn(i) for i in SvmInsn if i is not SvmInsn.VMRUN
        }  # fmt: skip

    def _insn(self, insn: SvmInsn) -> tuple[bool, float]:
        """(exits, cycles) of one SVM instruction L1 executes."""
        c = self.costs
        feature = insn.virtualized_by
        if feature is not None and getattr(self.cfg, feature):
            return False, getattr(c, insn.value + "_native")
        return True, c.hw_exit + c.handlers[insn.value]

    def exit_code(self, reason: ExitReason, cr: int = -1) -> IntEnum:
        if reason is ExitReason.CR_ACCESS and cr in SVM_CR_WRITE:
            return SVM_CR_WRITE[cr]
        code = SVM_EXIT_FOR.get(reason)
        if code is None:
            raise ModelError(f"{reason.name} has no SVM counterpart in this model")
        return code

    def _route(self, reason: ExitReason, **where: int) -> int:
        if reason is ExitReason.APIC_ACCESS:
            # no AVIC: L2's xAPIC page is an MMIO range in L1's NPT; L0's walk
            # of NPT12 finds L1's reserved-bit entry and reflects the NPF
            return L1
        code = self.exit_code(reason, where.get("cr", -1))
        return route_l2_exit(code, self.l1_controls, **where)  # type: ignore[arg-type]

    def _vmcss(self) -> tuple[Vmcs, ...]:
        return ()  # VMCB12 is L1's memory: nothing is counted per field

    # ---------------------------------------------------------------- replay
    # SVM's state is smaller than VMX's: no register cache of VMCS fields, no
    # dirty vmcs12, no posted-interrupt descriptor (no AVIC for L2). So is its
    # signature, and the replayer's hot line reads just these seven fields.
    _SIG_LAYOUT = (
        ("", "state"), ("", "l2_halted"), ("", "l1_halted"), ("", "_l1_background"),
        ("l1_controls", None), ("l2_apic", "irr"), ("l2_apic", "isr"),
    )  # fmt: skip

    def _signature_reader(self) -> Callable[[], tuple[Any, ...]]:
        ctl = self.l1_controls
        apic = self.l2_apic

        def sig() -> tuple[Any, ...]:
            return (self.state, self.l2_halted, self.l1_halted, self._l1_background, ctl.st,
                    apic.irr, apic.isr)  # fmt: skip

        return sig

    # ---------------------------------------------------------------- L1's instructions
    def l1_svm_insns(self, insns: tuple[SvmInsn, ...], cause: str) -> None:
        """L1 executes ``insns`` (not VMRUN): each exits or runs in L1."""
        s = self._stats
        for insn in insns:
            exits, cycles = self._insn_cost[insn]
            if exits:
                self._charge_l1_exits(insn.code, cycles - self.costs.hw_exit, cause)
            else:
                s.cycles_l1 += cycles
                s.work[L1_SVM_INSNS] += cycles
            if s.trace is not None:
                what = insn.code.name if exits else insn.name
                how = "emulated by L0" if exits else "virtualized"
                self._trace("L1", "exit" if exits else "insn", what, how, cause)

    def l1_exit(
        self, reason: ExitReason, handler: str, *, cause: str, count: int = 1,
        background: bool = False,
    ) -> None:  # fmt: skip
        """As on VMX, except what is no exit on SVM (:data:`sim.svm.NO_SVM_EXIT`):
        L1's TLB flush for L2 is a VMCB12 TLB_CONTROL write."""
        if reason in NO_SVM_EXIT:
            if not background:
                self._require_l1("an L1 TLB flush")
            self._vmcb12_access(count, "tlb_control")
            return
        super().l1_exit(reason, handler, cause=cause, count=count, background=background)

    def l1_invlpga(self) -> None:
        """L1 invalidates one of L2's TLB entries with INVLPGA: always intercepted."""
        self._require_l1("INVLPGA")
        self.l1_svm_insns((SvmInsn.INVLPGA,), "invlpga")

    def _vmcb12_access(self, n: int, what: str) -> None:
        cycles = n * self.costs.vmcb_access
        self._stats.cycles_l1 += cycles
        self._stats.work[L1_VMCB12] += cycles
        if self._stats.trace is not None:
            self._trace("L1", "vmcb12", what, f"{n} fields")

    # ---------------------------------------------------------------- reflection
    def _reflect(
        self, reason: IntEnum, profile_name: str, l0_extra: float, hw: float,
        hw_reason: IntEnum,
    ) -> None:  # fmt: skip
        """nested_svm_vmexit, L1's run loop after VMRUN, then L1's handler."""
        self._nested_svm_vmexit(reason, profile_name, l0_extra, hw, hw_reason)
        s = self._stats
        c = self.costs
        self.l1_svm_insns(self.run_loop.after, "l1-vmrun-loop")
        if not self.run_loop.kvm:
            return  # the test's own handler is not timed by the model
        profile = PROFILES[profile_name]
        h1 = c.l1_exit_framework + self._l1_handler[profile.handler]
        s.cycles_l1 += h1
        s.work[L1_HANDLERS] += h1
        if s.trace is not None:
            self._trace("L1", "handler", profile_name, "exit framework + handler")
        n = sum(len(FRAGMENTS[f]) for f in profile.fragments)  # a VMCB12 field per access
        if n:
            self._vmcb12_access(n, profile_name)
        if profile.returns_to_user:
            # svm.c: the user-return MSRs (TSC_AUX alone) restored, then set
            # again, and svm_prepare_switch_to_guest VMSAVEs the host save
            # area again after a return to userspace
            n_msr = 2 * c.user_return_msrs
            self.l1_exit(ExitReason.MSR_WRITE, "msr_write", cause="l1-host-switch", count=n_msr)
            self.l1_svm_insns((SvmInsn.VMSAVE,), "l1-host-switch")
        if profile.sets_controls:  # enable_irq_window: V_IRQ + VINTR intercept
            self.l1_controls.intercepts |= {SvmExit.SVM_EXIT_VINTR}
        if profile.clears_controls:
            self.l1_controls.intercepts -= {SvmExit.SVM_EXIT_VINTR}

    def _nested_svm_vmexit(
        self, reason: IntEnum, profile_name: str, l0_extra: float, hw: float,
        hw_reason: IntEnum,
    ) -> None:  # fmt: skip
        """L0 reflects an L2 #VMEXIT (nested_svm_vmexit): L2's state and the exit
        fields into VMCB12 (:data:`sim.svm.NESTED_SVM_VMEXIT_VMCB12`), VMCB01
        loaded, GIF cleared, the shared ASID flushed and the MMU synced
        (nested_svm_transition_tlb_flush), L1 entered after its VMRUN."""
        s = self._stats
        s.reflected += 1
        l0 = self._vmexit_l0
        s.cycles_l0 += l0
        if hw:
            s.exit(L2, hw_reason, hw + l0 + l0_extra)
        else:
            s.work[SYNTHESIZED] += l0 + l0_extra
        s.crossings += 1  # L0 -> L1, after its VMRUN
        self.state = L1
        if s.trace is not None:
            how = "reflected to L1" if reason is hw_reason else f"reflected to L1 as {reason.name}"
            self._trace("L2", "exit", hw_reason.name, how, profile_name)
            written = f"{len(NESTED_SVM_VMEXIT_VMCB12)} fields written, ASID flushed"
            self._trace("L0", "vmcb12", "nested_svm_vmexit", written)

    def _run_fragment(self, name: str) -> None:
        n = len(FRAGMENTS[name])  # a VMCB12 field per access
        if n:
            self._vmcb12_access(n, name)

    # ---------------------------------------------------------------- interrupts
    def l1_interrupt_l2(self, vector: int = NIC_VECTOR) -> None:
        """L1 raises an interrupt for L2: ``event_inj`` if L2 takes interrupts now,
        else V_IRQ with the VINTR intercept (svm_enable_irq_window): the window
        exit comes when L2 sets IF (:meth:`l2_sti`)."""
        ctl = self.l1_controls
        if ctl.l2_if:
            super().l1_interrupt_l2(vector)
            return
        self._require(L1, "L1 injecting into L2")
        ctl.v_irq = True
        ctl.intercepts |= {SvmExit.SVM_EXIT_VINTR}
        self._vmcb12_access(2, "int_ctl V_IRQ, VINTR intercept")

    def l0_interrupt_l1(self) -> None:
        """As on VMX, plus what SVM adds for an interrupt to L1 (no AVIC for L1,
        off by default in 6.1). Taken while L2 runs, the reflected SVM_EXIT_INTR
        enters L1 with GIF=0 and interrupts off: L0 asks for the window
        (svm_enable_irq_window: V_IRQ with the VINTR intercept; vGIF lets STGI
        pass, and the window opens when L1 enables interrupts), an L1
        SVM_EXIT_VINTR at which L0 injects. However it arrives, L1's handler
        ends with an x2APIC EOI that L0 intercepts."""
        window = self.state == L2
        super().l0_interrupt_l1()
        background = self.state != L1  # a woken L1 that resumes L2 at once
        if window:
            self.l1_exit(ExitReason.INTERRUPT_WINDOW, "intr_window", cause="l1-irq")
        self.l1_exit(ExitReason.MSR_WRITE, "eoi", cause="l1-irq", background=background)

    def l0_interrupt_l1_vcpu(self, *, halted: bool) -> None:
        """As on VMX, plus the intercepted x2APIC EOI of L1's handler (no AVIC)."""
        super().l0_interrupt_l1_vcpu(halted=halted)
        self.l1_exit(ExitReason.MSR_WRITE, "eoi", cause="l1-irq", background=True)

    def l2_cli(self) -> None:
        """L2 disables interrupts (CLI): no exit; VMCB12's save area says IF=0."""
        self._require(L2, "L2 CLI")
        self.l1_controls.l2_if = False

    def l2_sti(self) -> None:
        """L2 enables interrupts. With a V_IRQ pending and VINTR intercepted the
        window opens with an ``SVM_EXIT_VINTR``: L0 reflects it, L1 clears the
        intercept, injects through ``event_inj`` and VMRUNs."""
        self._require(L2, "L2 STI")
        ctl = self.l1_controls
        ctl.l2_if = True
        if not ctl.v_irq or SvmExit.SVM_EXIT_VINTR not in ctl.intercepts:
            return
        window = self.l2_exit(
            ExitReason.INTERRUPT_WINDOW, "intr_window_inject", l0_handler="intr_window"
        )
        if window != L1:
            raise ModelError("a VINTR exit L1 asked for must reach L1")
        ctl.v_irq = False
        ctl.intercepts -= {SvmExit.SVM_EXIT_VINTR}
        super().l1_interrupt_l2()
        self.l1_vmresume()

    # ---------------------------------------------------------------- entry
    def l1_vmresume(self) -> None:
        """L1's run loop up to VMRUN, and the VMRUN L0 emulates (nested_svm_vmrun)."""
        self._require(L1, "VMRUN")
        self.l1_svm_insns(self.run_loop.before, "l1-vmrun-loop")
        self._nested_svm_vmrun()

    def _nested_svm_vmrun(self) -> None:
        """L1's VMRUN exits and L0 emulates it (nested_svm_vmrun ->
        enter_svm_guest_mode): VMCB12's control area copied and checked,
        nested_vmcb02_prepare_save (its SEG/DT/DR groups unless clean,
        :data:`sim.svm.VMCB02_SAVE_GROUPS`), the MSR permission map merged
        (nested_svm_vmrun_msrpm), recalc_intercepts, the ASID flushed, and
        VMCB02 run: L2 is back."""
        s = self._stats
        self._charge_l1_exits(SvmExit.SVM_EXIT_VMRUN, self._vmrun_l0, "vmrun")  # to L0, to L2
        s.nested_entries += 1
        self.state = L2
        if s.trace is not None:
            self._trace("L1", "exit", "SVM_EXIT_VMRUN", "nested_svm_vmrun", "")
            groups = "copied" if self._copies_groups else "clean, skipped"
            self._trace("L0", "vmcb02", "nested_vmcb02_prepare_save",
                        f"{'/'.join(VMCB02_SAVE_GROUPS)} {groups}, ASID flushed")  # fmt: skip

    def l1_intercepts_guest_paging(self) -> None:
        """L1 without NPT for L2 (kvm_amd npt=0 in L1; svm.c init_vmcb): #PF, CR3
        writes and INVLPG intercepted in VMCB12."""
        self.l1_controls.intercepts |= {
            SvmExit.SVM_EXIT_EXCP_PF, SvmExit.SVM_EXIT_WRITE_CR3, SvmExit.SVM_EXIT_INVLPG,
        }  # fmt: skip

    def l1_set_io_passthrough(self, ports: frozenset[int]) -> None:
        """L1 clears ``ports`` in its I/O permission map for L2 (delegation), or sets all."""
        self.l1_controls.io_passthrough = ports
