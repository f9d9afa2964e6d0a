"""Today's KVM: the kvm-2019 preset, xlio vmexit, APICv, HLT, MMIO and userspace I/O."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xlio.backends.datapath import datapath_options, make_datapath
from xlio.measure import make_config, measure
from xlio.sim.nested import NestedVmx
from xlio.sim.presets import KVM_2019_TARGETS, PRESETS
from xlio.sim.vmexit import TESTS, run_test

KVM = PRESETS["kvm-2019"]


def test_kvm_2019_lands_on_its_calibration_figures() -> None:
    nested = run_test("cpuid", KVM, 2)["cycles"]
    assert nested == pytest.approx(KVM_2019_TARGETS["nested cpuid"][0], rel=0.10)
    assert 1_020 * 0.8 <= run_test("cpuid", KVM, 1)["cycles"] <= 1_100 * 1.2
    assert run_test("vmcall", KVM, 1)["cycles"] == pytest.approx(1_529, rel=0.20)
    # every parameter has a value and a source, and says what kind of source
    for name, p in KVM.params.items():
        assert p.source and p.kind in ("published", "calibrated", "derived", "estimate"), name


def test_turtles_still_gives_turtles_figure() -> None:
    assert run_test("cpuid", PRESETS["turtles-2010"], 2)["cycles"] == 59_500  # Turtles: ~58k
    assert run_test("cpuid", PRESETS["turtles-2010"], 1)["cycles"] == 2_500  # Turtles: ~2.6k


def test_vmexit_cli_prints_kvm_unit_tests_lines_and_json() -> None:
    run = [sys.executable, "-m", "xlio", "vmexit", "--preset", "kvm-2019", "--level", "2"]
    want = ["cpuid", "mov_dr", "self_ipi_sti_nop"]
    p = subprocess.run([*run, *want], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "cpuid 13142"
    assert "mov_dr (skipped)" in lines
    assert any(line.startswith("  ipi self_ipi_sti_nop ") for line in lines)
    j = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True).stdout)
    assert j["preset"] == "kvm-2019" and j["level"] == 2
    assert j["tests"]["cpuid"] == 13_142 and j["tests"]["mov_dr"] is None
    assert list(j["tests"]) == [t.name for t in TESTS]
    bad = subprocess.run([*run, "nosuchtest"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_apicv_changes_which_apic_accesses_exit() -> None:
    # xAPIC ICR writes still exit (APIC_WRITE); the x2APIC self-IPI is virtualized
    on = run_test("self_ipi_sti_nop", KVM, 1, apicv=True)
    off = run_test("self_ipi_sti_nop", KVM, 1, apicv=False)
    assert on["exits"] == 1 and off["exits"] == 3
    assert run_test("x2apic_self_ipi_sti_nop", KVM, 1, apicv=True)["cycles"] is None
    assert run_test("x2apic_self_ipi_sti_nop", KVM, 1, apicv=False)["exits"] == 3


def test_unshadowed_vmcs12_field_traps_even_with_shadowing() -> None:
    # TSC_ADJUST in L2: L1 rewrites TSC_OFFSET, which KVM does not shadow
    r = measure("cpuid", "l1", "kvm-2019", count=1)
    assert r["per_op"]["vmcs_emulated"] == 0
    adj = run_test("wr_tsc_adjust_msr", KVM, 2)
    assert adj["exits"] == 3  # the WRMSR, the trapped VMWRITE, VMRESUME


def test_direct_path_posts_through_l1s_descriptor_for_l2() -> None:
    m = NestedVmx(make_config("kvm-2019", "l0"))
    dp = make_datapath(m, "l0", datapath_options({}))
    from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
    from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size

    before = m.stats.reflected
    for i in range(5):
        dp.wire.inject(
            [udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 200, i)]
        )
        dp.pump()
    # no L1 involvement, and L1's view of L2's APIC is exactly right: every
    # posted interrupt moved from the descriptor into the IRR and was EOI'd
    assert m.stats.reflected == before
    assert not m.l2_pid.on and m.l2_pid.pir == 0
    assert m.l2_apic.irr == 0 and m.l2_apic.delivered == m.stats.irqs_injected_l2 == 5
    assert m.stats.posted_interrupts == 5


@pytest.mark.parametrize("path", ["l1", "l0"])
def test_an_idle_l2_halts_its_hlt_is_reflected_and_l1_halts(path: str) -> None:
    r = measure("echo", path, "kvm-2019", count=16)
    rows = {(x["level"], x["reason"]): x["count"] for x in r["by_reason"]}
    assert rows[("L2", "HLT")] == 16  # L2's HLT, reflected to L1 (HLT exiting)
    assert rows[("L1", "HLT")] == 16  # L1 blocks L2's vCPU and halts its own
    assert r["totals"]["wakeups"] == 32  # L0 wakes L1, L1 wakes L2's vCPU thread
    # the halt costs exactly the HLT path: L2's exit + reflection + L1's HLT exit
    m = NestedVmx(make_config("kvm-2019", "l1"))
    before = m.stats.cycles
    m.l2_hlt()
    assert m.l2_halted and m.l1_halted
    hlt_path = m.stats.cycles - before
    per_req = measure("echo", path, "kvm-2019", count=16)["per_op"]["cycles"]
    assert hlt_path < per_req
    # virtual idle keeps the HLT in L0: nothing of it reaches L1
    v = measure("echo", path, "kvm-2019", count=16, virtual_idle=True)
    vrows = {(x["level"], x["reason"]) for x in v["by_reason"]}
    assert ("L1", "HLT") not in vrows and ("L2", "HLT") in vrows
    assert v["per_op"]["cycles"] < per_req


def test_single_level_halt_and_wake_need_no_exit_but_the_hlt() -> None:
    r = measure("echo", "single", "kvm-2019", count=16)
    reasons = {x["reason"]: x["count"] for x in r["by_reason"]}
    assert reasons == {"HLT": 16, "IO_INSTRUCTION": 16}  # the halt and the TX kick


def test_user_space_io_costs_user_return_msrs_today_and_cr0_ts_in_2010() -> None:
    t = measure("io-user", "l1", "turtles-2010", count=2)
    assert t["per_op"]["l0_exits"] == 31  # Turtles: 31
    k = measure("io-user", "l1", "kvm-2019", count=2)
    reasons = {(x["level"], x["reason"]): x["count"] / 2 for x in k["by_reason"]}
    assert reasons[("L1", "MSR_WRITE")] == 8 and ("L1", "CR_ACCESS") not in reasons


def test_pollution_applies_to_l1_exit_path_not_to_backend_data_work() -> None:
    def l1_cycles(size: int) -> float:
        r = measure("tx", "l1", "turtles-2010", count=8, options={"frame_size": size})
        return r["cycles_by_level"]["L1"] / 8

    per_byte = (l1_cycles(1060) - l1_cycles(60)) / 1000
    assert per_byte == pytest.approx(PRESETS["turtles-2010"].copy_byte)


def test_kvm_scheme_invept_cost_follows_changes_not_working_set() -> None:
    def invept_l0_cycles(ws: int) -> float:
        r = measure(
            "ept-churn", "l1", "kvm-2019",
            options={"working_set_mib": ws, "rate": 400, "seconds": 0.5},
        )  # fmt: skip
        return r["per_op"]["cycles"]

    small, big = invept_l0_cycles(4), invept_l0_cycles(32)
    assert big < small * 1.5  # vtlb would grow about 8x
    r = measure("ept-touch", "l1", "kvm-2019", options={"working_set_mib": 1, "static_ept": True})
    # prefetch: one L0 fault per 8 pages on a sequential first touch
    assert r["totals"]["ept_violations_l0"] == 256 // 8


def test_exceptions_follow_vmcs12s_exception_bitmap_and_nmis_stay_with_l0() -> None:
    from xlio.sim.routing import KVM_L1_EXCEPTION_BITMAP, L1Controls, route_l2_exit
    from xlio.sim.vmx import ExitReason

    ctl = L1Controls(cpu_based=0, pin_based=0)
    assert KVM_L1_EXCEPTION_BITMAP >> 6 & 1  # #UD
    assert route_l2_exit(ExitReason.EXCEPTION_NMI, ctl, vector=6) == 1  # #UD: L1 asked
    assert route_l2_exit(ExitReason.EXCEPTION_NMI, ctl, vector=2) == 0  # NMI: L0's
    assert route_l2_exit(ExitReason.EXCEPTION_NMI, ctl, vector=3) == 0  # #BP: not in the bitmap
    # CR0 writes by the guest/host mask: TS is guest-owned, WP is L1's before 6.4
    assert route_l2_exit(ExitReason.CR_ACCESS, ctl, cr=0, bits=1 << 3) == 0
    assert route_l2_exit(ExitReason.CR_ACCESS, ctl, cr=0, bits=1 << 16) == 1


@pytest.mark.parametrize("level", [1, 2])
def test_mmio_routing_at_both_levels(level: int) -> None:
    from xlio.sim.vmexit import run_test

    r = run_test("pci-mem", KVM, level)
    if level == 1:  # L0's fast-MMIO bus: one EPT misconfiguration, L0's
        assert r["path"] == "L2 EPT_MISCONFIG"
    else:  # an EPT violation in L0, injected into L1 as a misconfiguration
        assert r["path"] == "L1 VMRESUME, L2 EPT_VIOLATION, reflected x1"
    assert run_test("pci-mem", KVM, level)["cycles"] > run_test("pci-io", KVM, level)["cycles"]


@pytest.mark.parametrize("preset", ["turtles-2010", "kvm-2019"])
def test_every_vmexit_exit_of_a_nested_guest_is_l1s(preset: str) -> None:
    # each exit a vmexit.c test takes is one L1 asked for (CPUID, I/O, APIC
    # exits, a HLT or an interrupt window L1 enabled, ...): all reflected,
    # and each reflection ends with one VMRESUME
    from xlio.sim.nested import Config, NestedVmx
    from xlio.sim.vmexit import _play, rows_for

    costs = PRESETS[preset]
    for t in TESTS:
        rows = None if t.skip else rows_for(t, costs, costs.apicv)
        if not rows:
            continue
        m = NestedVmx(Config.from_preset(costs, nested=True))
        for step in rows:
            _play(m, step)
        s = m.stats
        assert s.l2_exits == s.reflected == s.nested_entries == len(rows), t.name
