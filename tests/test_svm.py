"""Nested SVM (sim.nested_svm): Linux 6.1's hand counts, the epyc-2019 calibration,
the --arch grammar, and the invariants the VMX model keeps."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlio.measure import measure
from xlio.sim import svm_tests, vmexit
from xlio.sim.arch import machine_for
from xlio.sim.config import Config
from xlio.sim.machine import L1, L2
from xlio.sim.nested import NestedVmx
from xlio.sim.nested_svm import NestedSvm
from xlio.sim.presets import EPYC_2019_TARGETS, PRESETS
from xlio.sim.svm import SvmExit
from xlio.sim.vmx import ExitReason as R
from xlio.sim.workloads import WORKLOADS

EPYC = PRESETS["epyc-2019"]
MiB = 1 << 20


def machine(**switches: object) -> NestedSvm:
    m = machine_for(Config.from_preset(EPYC, **switches))  # type: ignore[arg-type]
    assert isinstance(m, NestedSvm)
    return m


def exits_by_reason(m: NestedSvm) -> dict[tuple[str, str], int]:
    return {(r["level"], r["reason"]): r["count"] for r in m.stats.reason_rows()}


def nested_cpuid(costs: object = EPYC, **switches: object) -> NestedSvm:
    m = machine_for(Config.from_preset(costs, **switches))  # type: ignore[arg-type]
    assert isinstance(m, NestedSvm)
    assert m.l2_exit(R.CPUID, "cpuid") == L1
    m.l1_vmresume()
    return m


# ------------------------------------------------------------- hand counts (REFERENCE 12)
def test_an_l2_cpuid_is_two_exits_with_vls_and_vgif() -> None:
    m = nested_cpuid(vls=True, vgif=True)
    assert m.stats.l0_exits == 2
    assert exits_by_reason(m) == {("L2", "SVM_EXIT_CPUID"): 1, ("L1", "SVM_EXIT_VMRUN"): 1}


def test_an_l2_cpuid_is_seven_exits_with_neither() -> None:
    m = nested_cpuid(vls=False, vgif=False)
    assert m.stats.l0_exits == 7
    assert exits_by_reason(m) == {
        ("L2", "SVM_EXIT_CPUID"): 1,
        ("L1", "SVM_EXIT_VMSAVE"): 1,  # after VMRUN returns
        ("L1", "SVM_EXIT_VMLOAD"): 2,  # the host save area, then the guest's before VMRUN
        ("L1", "SVM_EXIT_STGI"): 1,
        ("L1", "SVM_EXIT_CLGI"): 1,
        ("L1", "SVM_EXIT_VMRUN"): 1,
    }


@pytest.mark.parametrize(("vls", "vgif", "exits"), [(True, False, 4), (False, True, 5)])
def test_each_switch_removes_its_own_instructions(vls: bool, vgif: bool, exits: int) -> None:
    assert nested_cpuid(vls=vls, vgif=vgif).stats.l0_exits == exits


def test_no_vmcs_access_exit_ever_happens_on_svm() -> None:
    for name in WORKLOADS:
        for path in ("single", "l1", "l0"):
            r = measure(name, path, EPYC, count=3)
            reasons = {row["reason"] for row in r["by_reason"]}
            assert reasons <= {e.name for e in SvmExit}, (name, path, reasons)
            assert r["totals"]["vmcs_emulated"] == 0 and r["totals"]["vmcs_exitless"] == 0
            assert "vmcs-access" not in r["by_cause"], (name, path)
    for lvl in (1, 2):
        for t in vmexit.run(EPYC, lvl).values():
            assert "VMREAD" not in t.get("path", "") and "VMWRITE" not in t.get("path", "")


def test_an_interrupt_that_finds_l2_blocked_costs_the_window_exit_and_its_reflection() -> None:
    def deliver(blocked: bool) -> NestedSvm:
        m = machine()
        if blocked:
            m.l2_cli()
        m.l0_interrupt_l2()  # no AVIC for L2: through L1 (INTR exit, reflected)
        assert m.state == L2
        m.l2_sti()
        return m

    open_, blocked = deliver(False), deliver(True)
    assert ("L2", "SVM_EXIT_VINTR") not in exits_by_reason(open_)
    assert exits_by_reason(blocked)[("L2", "SVM_EXIT_VINTR")] == 1
    assert blocked.stats.reflected == open_.stats.reflected + 1
    assert blocked.stats.l0_exits == open_.stats.l0_exits + 2  # VINTR and L1's VMRUN
    assert blocked.l2_apic.irr and not blocked.l1_controls.v_irq  # injected, V_IRQ consumed
    assert SvmExit.SVM_EXIT_VINTR not in blocked.l1_controls.intercepts


def test_an_npf_l1_maps_is_one_exit_not_reflected_and_one_it_does_not_is_reflected() -> None:
    pages = 4 * MiB >> 12
    opts = {"working_set_mib": 4, "l2_mem_gib": 1, "l1_mem_gib": 2}
    mapped = measure("ept-touch", "l1", EPYC, options={**opts, "static_ept": True})["totals"]
    assert mapped["reflected"] == 0 and mapped["l1_exits"] == 0
    # each NPF is one exit that L0 fills from L1's NPT (pte_prefetch: 8 pages a fault)
    assert mapped["l2_exits"] == mapped["ept_violations_l0"] == pages // 8
    assert mapped["ept02_entries_built"] == pages
    unmapped = measure("ept-touch", "l1", EPYC, options=opts)["totals"]
    assert unmapped["reflected"] == unmapped["ept_violations_reflected"] == pages
    # and each reflected one refaults after L1's VMRUN: L0 fills it then
    assert unmapped["l2_exits"] == pages + unmapped["ept_violations_l0"]
    assert unmapped["ept_violations_l0"] == pages


def test_invlpga_is_always_intercepted() -> None:
    m = machine(vls=True, vgif=True)
    m.l2_exit(R.CPUID, "cpuid")
    m.l1_invlpga()
    assert exits_by_reason(m)[("L1", "SVM_EXIT_INVLPGA")] == 1


def test_avic_is_never_used_for_l2() -> None:
    with pytest.raises(ValueError, match="AVIC"):
        Config.from_preset(EPYC, apicv=True)
    m = machine()
    m.l0_interrupt_l2()  # the direct path's interrupt still goes through L1
    assert m.stats.reflected == 1 and m.stats.posted_interrupts == 0


# ------------------------------------------------------------- calibration and the tests
@pytest.mark.parametrize("line", ["VMRUN", "VMEXIT"])
def test_epyc_2019_reproduces_latency_run_exit_within_ten_percent(line: str) -> None:
    got = svm_tests.latency_run_exit(EPYC)[line]
    want = EPYC_2019_TARGETS[line][0]
    assert abs(got - want) <= 0.10 * want, (got, want)


def test_calibrated_parameters_say_so_and_nothing_else_is_fitted() -> None:
    calibrated = {k for k, p in EPYC.params.items() if p.kind == "calibrated"}
    assert calibrated == {"vmrun_emulate", "svm_vmexit"}
    assert all(p.source for p in EPYC.params.values())


def test_the_latency_tests_without_vls_and_vgif_add_the_exits_of_l1s_run_loop() -> None:
    with_ = svm_tests.latency_run_exit(EPYC)
    without = svm_tests.latency_run_exit(EPYC, vls=False, vgif=False)
    c = EPYC
    exit_cost = c.hw_exit  # each emulated CLGI/VMLOAD adds an exit plus its handler
    assert without["VMRUN"] - with_["VMRUN"] == pytest.approx(
        2 * exit_cost + c.handlers["clgi"] + c.handlers["vmload"]
        - c.clgi_native - c.vmload_native
    )  # fmt: skip
    insn = svm_tests.latency_svm_insn(EPYC)
    assert insn == {"VMLOAD": 306, "VMSAVE": 282, "STGI": 54, "CLGI": 53}


def xlio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio", *args], capture_output=True, text=True, timeout=120
    )


def test_xlio_vmexit_prints_svm_tests_in_their_own_form() -> None:
    r = xlio("vmexit", "--preset", "epyc-2019", "--level", "1", "latency_run_exit",
             "latency_svm_insn")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"    Latency VMRUN : max: \d+ min: \d+ avg: 3830", lines[0])
    assert re.fullmatch(r"    Latency VMEXIT: max: \d+ min: \d+ avg: 3648", lines[1])
    assert lines[2] == "PASS: latency_run_exit"
    assert re.fullmatch(r"    Latency STGI:   max: \d+ min: \d+ avg: \d+", lines[5])
    assert lines[-1] == "PASS: latency_svm_insn"


def test_arch_svm_alone_means_epyc_2019_and_the_reports_name_svm_exits() -> None:
    r = xlio("measure", "--arch", "svm", "--workload", "cpuid", "--count", "10")
    assert r.returncode == 0, r.stderr
    assert "preset epyc-2019" in r.stdout and "SVM_EXIT_VMRUN" in r.stdout
    assert "vmcs" not in r.stdout.lower().replace("vmcb", "")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ("measure", "--workload", "cpuid", "--arch", "svm", "--shadow-vmcs"),
            "--shadow-vmcs: not for svm",
        ),
        (
            ("measure", "--workload", "cpuid", "--arch", "svm", "--operand", "memory"),
            "--operand: not for svm",
        ),
        (
            ("measure", "--workload", "cpuid", "--arch", "svm", "--cache-reg", "base"),
            "--cache-reg: not for svm",
        ),
        (
            ("measure", "--workload", "cpuid", "--arch", "svm", "--no-vmcs-exits"),
            "--no-vmcs-exits: not for svm",
        ),
        (("measure", "--workload", "cpuid", "--arch", "svm", "--apicv"), "--apicv: not for svm"),
        (("measure", "--workload", "cpuid", "--preset", "kvm-2019", "--vls"), "--vls: not for vmx"),
        (("vmexit", "--no-vgif"), "--vgif: not for vmx"),
        (
            ("measure", "--workload", "cpuid", "--preset", "kvm-2019", "--arch", "svm"),
            "--arch: svm does not match",
        ),
        (
            ("measure", "--workload", "cpuid", "--preset", "epyc-2019", "--arch", "vmx"),
            "--arch: vmx does not match",
        ),
        (("netperf", "--arch", "arm"), "invalid choice: 'arm'"),
        (("vmexit", "--preset", "epyc-2019", "latency_run_exit"), "use --level 1"),
        (("vmexit", "--level", "1", "latency_svm_insn"), "needs an SVM preset"),
        (("demo", "--preset", "epyc-2019", "--set", "arch=vmx"), "arch is the preset's"),
    ],
)
def test_a_switch_of_the_other_architecture_is_one_line_and_exit_2(
    args: tuple[str, ...], says: str
) -> None:
    r = xlio(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_costs_file_on_an_intel_base_is_refused_with_arch_svm(tmp_path: object) -> None:
    from pathlib import Path

    f = Path(str(tmp_path)) / "mine.toml"
    f.write_text('base = "kvm-2019"\n[params]\nhw_exit = 1000\n')
    r = xlio("vmexit", "--costs", str(f), "--arch", "svm", "cpuid")
    assert r.returncode == 2 and "base kvm-2019" in r.stderr and "vmx" in r.stderr, r.stderr
    amd = Path(str(tmp_path)) / "amd.toml"
    amd.write_text('base = "epyc-2019"\n[params]\nasid_flush = 600\n')
    r = xlio("vmexit", "--costs", str(amd), "--arch", "svm", "cpuid")
    assert r.returncode == 0 and r.stdout.startswith("cpuid "), r.stderr


# ------------------------------------------------------------- invariants
OPS = st.lists(st.sampled_from(["cpuid", "io", "eoi", "hlt", "irq", "cli_irq_sti", "npf"]),
               max_size=25)  # fmt: skip


def _play(m: NestedSvm, ops: list[str]) -> None:
    for op in ops:
        if op == "cpuid":
            if m.l2_exit(R.CPUID, "cpuid") == L1:
                m.l1_vmresume()
        elif op == "io":
            if m.l2_exit(R.IO_INSTRUCTION, "io_kick", port=0xC050) == L1:
                m.l1_vmresume()
        elif op == "eoi":
            m.l2_eoi()
        elif op == "hlt":
            m.l2_hlt()
            m.l0_interrupt_l2()
        elif op == "irq":
            m.l0_interrupt_l2()
        elif op == "cli_irq_sti":
            m.l2_cli()
            m.l0_interrupt_l2()
            m.l2_sti()
        elif m.l2_exit(R.EPT_VIOLATION, "ept_violation", to_l1=True) == L1:
            m.l1_vmresume()
        assert m.state == L2 and not m.l2_halted


@settings(max_examples=60, deadline=None)
@given(ops=OPS, vls=st.booleans(), vgif=st.booleans())
def test_exits_add_up_and_every_path_ends_in_l2(ops: list[str], vls: bool, vgif: bool) -> None:
    m = machine(vls=vls, vgif=vgif)
    _play(m, ops)
    s = m.stats
    assert s.l0_exits == s.l2_exits + s.l1_exits
    assert s.vmcs_emulated == 0
    assert sum(r["count"] for r in s.reason_rows()) == s.l0_exits
    assert sum(r["cycles"] for r in s.reason_rows()) + sum(s.work.values()) == pytest.approx(
        s.cycles
    )  # every cycle is an exit's or a named work row's
    traced = machine(vls=vls, vgif=vgif, trace=True)  # the trace's code paths charge the same
    _play(traced, ops)
    assert traced.stats.cycles == pytest.approx(s.cycles)
    assert traced.stats.l0_exits == s.l0_exits


def test_the_factory_picks_the_architecture_of_the_preset() -> None:
    assert isinstance(machine_for(Config.from_preset(PRESETS["kvm-2019"])), NestedVmx)
    assert isinstance(machine_for(Config.from_preset(EPYC)), NestedSvm)


def test_clean_bits_skip_the_save_area_groups_for_a_kvm_l1_not_for_the_test() -> None:
    """6.1 skips VMCB12's SEG/DT/DR groups when L1 marks them clean (a KVM L1
    does after each run); kvm-unit-tests' latency_run_exit leaves clean = 0."""
    from xlio.sim.presets import override

    honours = override(EPYC, {"clean_bits": True}, "test")
    saved = nested_cpuid().stats.cycles - nested_cpuid(honours).stats.cycles
    assert saved == EPYC.vmcb_save_copy > 0
    assert svm_tests.latency_run_exit(honours) == svm_tests.latency_run_exit(EPYC)


SVM_TESTS_LOG = """\
PASS: tsc_adjust
    Latency VMRUN : max: 49300 min: 3720 avg: {vmrun}
    Latency VMEXIT: max: 607780 min: 3540 avg: {vmexit}
PASS: latency_run_exit
    Latency VMLOAD: max: 29720 min: 300 avg: 306
    Latency VMSAVE: max: 31660 min: 280 avg: 282
    Latency STGI:   max: 18860 min: 40 avg: 54
    Latency CLGI:   max: 16060 min: 40 avg: 53
PASS: latency_svm_insn
"""


def test_calibrate_reads_svm_tests_lines_and_fits_an_amd_host(tmp_path: object) -> None:
    """A user's own svm_tests.c run (and vmexit.c's) calibrates an SVM preset; the
    written file reproduces the latency lines it was fitted to."""
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "l1.txt").write_text("cpuid 1400\nvmcall 1900\n" + SVM_TESTS_LOG.format(
        vmrun=4200, vmexit=3900))  # fmt: skip
    (d / "l2.txt").write_text("cpuid 9800\n")
    out = d / "mine.toml"
    r = xlio("calibrate", "--base", "epyc-2019", "--vmexit", f"l1={d / 'l1.txt'}",
             "--vmexit", f"l2={d / 'l2.txt'}", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "latency_run_exit.VMRUN" in r.stdout
    v = xlio("vmexit", "--costs", str(out), "--level", "1", "latency_run_exit")
    assert v.returncode == 0, v.stderr
    got = [int(x.split("avg: ")[1]) for x in v.stdout.splitlines() if "avg:" in x]
    assert abs(got[0] - 4200) <= 0.01 * 4200 and abs(got[1] - 3900) <= 0.01 * 3900, v.stdout
    bad = xlio("calibrate", "--base", "kvm-2019", "--vmexit", f"l1={d / 'l1.txt'}")
    assert bad.returncode == 2 and "need an SVM base" in bad.stderr


def test_an_interrupt_for_l1_while_l2_runs_is_four_exits_with_vls_and_vgif() -> None:
    """REFERENCE 12: INTR (reflected, GIF=0 in L1), the window (an L1 VINTR exit:
    svm_enable_irq_window with vGIF), L1's intercepted x2APIC EOI, VMRUN."""
    m = machine(vls=True, vgif=True)
    m.l0_interrupt_l1()
    m.l1_vmresume()
    assert exits_by_reason(m) == {
        ("L2", "SVM_EXIT_INTR"): 1, ("L1", "SVM_EXIT_VINTR"): 1, ("L1", "SVM_EXIT_MSR"): 1,
        ("L1", "SVM_EXIT_VMRUN"): 1,
    }  # fmt: skip
    assert m.stats.reflected == 1
