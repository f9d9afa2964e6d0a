"""The nested VMX exit model: routing, reflection, profiles, costs, switches."""

from __future__ import annotations

import pytest

from xlio.measure import measure
from xlio.sim.costs import TURTLES_2010
from xlio.sim.nested import Config, ModelError, NestedVmx
from xlio.sim.presets import PRESETS
from xlio.sim.profiles import EMPTY_CACHE, FRAGMENTS, PROFILES, READ, WRITE, compile_fragment
from xlio.sim.routing import L1Controls, route_l2_exit
from xlio.sim.vmcs import MERGE_RARE, REFLECT_HOT_SYNC
from xlio.sim.vmx import (
    KVM_L1_CPU_BASED,
    KVM_L1_PIN_BASED,
    SHADOW_FIELDS_RO,
    SHADOW_FIELDS_RW,
    CpuBased,
    ExitReason,
    VmcsField,
    field_is_read_only,
    field_width,
)
from xlio.sim.workloads import VIRTIO_NOTIFY_PORT

R = ExitReason
F = VmcsField


def per_op(workload: str, path: str = "l1", preset: str = "turtles-2010", **kw) -> dict:
    return measure(workload, path, preset, count=10, **kw)["per_op"]


# ---------------------------------------------------------------- vocabulary
def test_field_encoding_bits() -> None:
    assert field_width(F.GUEST_RIP) == 64 and field_width(F.VM_EXIT_REASON) == 32
    assert field_width(F.GUEST_CS_SELECTOR) == 16 and field_width(F.EPT_POINTER) == 64
    assert field_is_read_only(F.EXIT_QUALIFICATION) and field_is_read_only(F.VM_EXIT_REASON)
    assert not field_is_read_only(F.GUEST_RIP)
    # KVM's lists: 11 read-only fields, 24 read-write fields, all read-only ones are exit info
    assert len(SHADOW_FIELDS_RO) == 11 and len(SHADOW_FIELDS_RW) == 24
    assert all(
        field_is_read_only(f)
        for f in SHADOW_FIELDS_RO
        if f not in (F.GUEST_CS_AR_BYTES, F.GUEST_SS_AR_BYTES)
    )


# ---------------------------------------------------------------- routing
@pytest.fixture
def kvm_l1() -> L1Controls:
    return L1Controls(cpu_based=KVM_L1_CPU_BASED, pin_based=KVM_L1_PIN_BASED)


@pytest.mark.parametrize(
    "reason",
    [R.EXTERNAL_INTERRUPT, R.EPT_VIOLATION, R.EPT_MISCONFIG, R.PREEMPTION_TIMER, R.PML_FULL],
)
def test_l0_owned_exits_stay_in_l0(reason: ExitReason, kvm_l1: L1Controls) -> None:
    assert route_l2_exit(reason, kvm_l1) == 0


@pytest.mark.parametrize(
    "reason",
    [R.CPUID, R.TRIPLE_FAULT, R.XSETBV, R.VMCALL, R.VMREAD, R.VMWRITE, R.INVEPT, R.VMRESUME],
)
def test_always_l1_exits(reason: ExitReason) -> None:
    nothing = L1Controls(cpu_based=0, pin_based=0)
    assert route_l2_exit(reason, nothing) == 1


def test_controls_decide_hlt_rdtsc(kvm_l1: L1Controls) -> None:
    assert route_l2_exit(R.HLT, kvm_l1) == 1  # KVM sets HLT exiting
    assert route_l2_exit(R.RDTSC, kvm_l1) == 0  # ... but not RDTSC exiting
    kvm_l1.cpu_based |= CpuBased.RDTSC_EXITING
    assert route_l2_exit(R.RDTSC, kvm_l1) == 1
    assert route_l2_exit(R.HLT, L1Controls(cpu_based=0, pin_based=0)) == 0


def test_io_routing_unconditional_and_bitmap(kvm_l1: L1Controls) -> None:
    assert route_l2_exit(R.IO_INSTRUCTION, kvm_l1, port=0x3F8) == 1  # KVM: unconditional
    kvm_l1.cpu_based = (kvm_l1.cpu_based & ~CpuBased.UNCOND_IO_EXITING) | CpuBased.USE_IO_BITMAPS
    kvm_l1.io_passthrough = frozenset({VIRTIO_NOTIFY_PORT})
    assert route_l2_exit(R.IO_INSTRUCTION, kvm_l1, port=VIRTIO_NOTIFY_PORT) == 0
    assert route_l2_exit(R.IO_INSTRUCTION, kvm_l1, port=0x3F8) == 1


def test_msr_routing_by_bitmap(kvm_l1: L1Controls) -> None:
    assert route_l2_exit(R.MSR_WRITE, kvm_l1, msr=0xC0000100) == 0  # bitmap clear
    kvm_l1.msr_bitmap = frozenset({0xC0000100})
    assert route_l2_exit(R.MSR_WRITE, kvm_l1, msr=0xC0000100) == 1
    assert route_l2_exit(R.MSR_READ, L1Controls(cpu_based=0, pin_based=0), msr=0x10) == 1


# ---------------------------------------------------------------- Turtles figures
def test_turtles_cpuid_13_exits() -> None:
    p = per_op("cpuid")
    assert p["l0_exits"] == 13 and p["l2_exits"] == 1 and p["reflected"] == 1
    assert p["vmcs_emulated"] == 11 and p["l1_exits"] == 12
    assert p["crossings"] == 26


def test_turtles_cpuid_split_and_cycles() -> None:
    r = measure("cpuid", "l1", "turtles-2010", count=1)
    reasons = {(row["level"], row["reason"]): row["count"] for row in r["by_reason"]}
    assert reasons == {
        ("L2", "CPUID"): 1,
        ("L1", "VMREAD"): 7,
        ("L1", "VMWRITE"): 4,
        ("L1", "VMRESUME"): 1,
    }
    lv = r["cycles_by_level"]
    # Turtles: about 12k switching, 38.5k in L0, 8k in L1, 58k in all
    assert lv["switch"] == 13_000 and lv["L0"] == 38_500 and lv["L1"] == 8_000
    assert 50_000 < r["per_op"]["cycles"] < 65_000


def test_no_vmcs_exits_gives_two() -> None:
    assert per_op("cpuid", vmcs_exits=False)["l0_exits"] == 2


def test_single_level_cpuid_one_exit() -> None:
    p = per_op("cpuid", path="single")
    assert p["l0_exits"] == 1 and p["reflected"] == 0 and p["l1_exits"] == 0
    assert 2_000 <= p["cycles"] <= 3_000  # Turtles: about 2,600 in a guest


def test_turtles_io_user_31_exits_14_without_vmcs_traps() -> None:
    assert per_op("io-user")["l0_exits"] == 31
    assert per_op("io-user", vmcs_exits=False)["l0_exits"] == 14


def test_cpuid_and_vmcall_cannot_bypass_l1() -> None:
    for w in ("cpuid", "vmcall"):
        assert per_op(w, path="l0") == per_op(w, path="l1")


def test_direct_path_io_kick_has_no_l1_involvement() -> None:
    p = per_op("io-kick", path="l0")
    assert p["l0_exits"] == 1 and p["reflected"] == 0 and p["l1_exits"] == 0
    assert per_op("io-kick", path="l1")["reflected"] == 1


# ---------------------------------------------------------------- shadowing
def _trapped_from_trace(workload: str, preset: str, **kw) -> set[str]:
    r = measure(workload, "l1", preset, count=1, trace=True, **kw)
    return {
        e[2]
        for e in r["trace"]
        if e[0] == "L1" and e[1] in ("VMREAD", "VMWRITE") and e[3] == "trapped"
    }


def test_shadow_vmcs_cpuid_and_io_kick_trap_only_vmresume() -> None:
    for w in ("cpuid", "io-kick"):
        r = measure(w, "l1", "shadow-vmcs", count=5)
        l1_reasons = {row["reason"] for row in r["by_reason"] if row["level"] == "L1"}
        assert l1_reasons == {"VMRESUME"}, w
        assert r["per_op"]["l0_exits"] == 2 and r["per_op"]["vmcs_emulated"] == 0
        assert _trapped_from_trace(w, "shadow-vmcs") == set()


def test_mmio_kick_is_an_ept_violation_reflected_as_a_misconfig_decoded_with_shadowed_fields() -> (
    None
):
    # L2's write exits to L0 as an EPT violation (L0 does not install L1's MMIO
    # marker in EPT02); L0 finds the marker in EPT12 and injects EPT_MISCONFIG;
    # L1's EMULTYPE_SKIP decode in 64-bit mode reads only shadowed fields
    assert _trapped_from_trace("mmio-kick", "shadow-vmcs") == set()
    r = measure("mmio-kick", "l1", "shadow-vmcs", count=3, trace=True)
    assert {(row["level"], row["reason"]) for row in r["by_reason"]} == {
        ("L2", "EPT_VIOLATION"),
        ("L1", "VMRESUME"),
    }
    assert any(
        tuple(e[:4]) == ("L2", "exit", "EPT_VIOLATION", "reflected to L1 as EPT_MISCONFIG")
        for e in r["trace"]
    )
    assert per_op("mmio-kick", preset="shadow-vmcs")["l0_exits"] == 2
    # Turtles-era KVM (no shadowing): every decode read traps
    assert per_op("mmio-kick")["vmcs_emulated"] == 15


def test_shadow_switch_on_turtles_preset() -> None:
    assert per_op("cpuid", shadow_vmcs=True)["l0_exits"] == 2
    assert per_op("cpuid", preset="shadow-vmcs", shadow_vmcs=False)["l0_exits"] > 2


# ---------------------------------------------------------------- operands and cache
@pytest.mark.parametrize("workload", ["cpuid", "vmcall", "io-kick", "io-user", "mmio-kick"])
def test_memory_operand_costs_more_same_exits(workload: str) -> None:
    reg = per_op(workload, operand="register")
    mem = per_op(workload, operand="memory")
    assert mem["l0_exits"] == reg["l0_exits"]
    extra = TURTLES_2010.vmcs_memory_extra * reg["vmcs_emulated"]
    assert mem["cycles"] == pytest.approx(reg["cycles"] + extra)
    assert mem["cycles"] > reg["cycles"]


def _logical_reads(profile: str) -> list[int]:
    frags = (*PROFILES[profile].fragments, "entry_epilogue")
    return [a.field for fr in frags for a in FRAGMENTS[fr] if a.op == READ]


def test_extended_cache_cuts_every_profile_with_a_repeated_read() -> None:
    checked = 0
    for name in PROFILES:
        reads = _logical_reads(name)
        repeated = len(reads) != len(set(reads))
        results = {}
        for mode in ("base", "extended"):
            m = NestedVmx(Config.from_preset(TURTLES_2010, cache_reg=mode))
            m.l2_exit(PROFILES[name].reason, name, to_l1=True)
            m.l1_vmresume()
            results[mode] = m.stats.vmcs_emulated
        if repeated:
            checked += 1
            assert results["extended"] < results["base"], name
        assert results["extended"] <= results["base"], name
    assert checked >= 5


def _vmcs_instructions(workload: str, **kw) -> tuple[set[str], set[str]]:
    r = measure(workload, "l1", "turtles-2010", count=1, trace=True, **kw)
    reads = {e[2] for e in r["trace"] if e[1] == "VMREAD"}
    writes = {e[2] for e in r["trace"] if e[1] == "VMWRITE"}
    return reads, writes


def test_extended_io_kick_is_modern_kvms_list() -> None:
    reads, writes = _vmcs_instructions("io-kick", cache_reg="extended")
    assert reads == {
        "VM_EXIT_REASON", "IDT_VECTORING_INFO_FIELD", "EXIT_QUALIFICATION", "GUEST_RFLAGS",
        "VM_EXIT_INSTRUCTION_LEN", "GUEST_RIP", "GUEST_INTERRUPTIBILITY_INFO",
    }  # fmt: skip
    assert writes == {"GUEST_RIP"}
    assert per_op("io-kick", cache_reg="extended")["vmcs_emulated"] == 8


def test_compile_fragment_base_defers_rip_and_repeats_others() -> None:
    acc = FRAGMENTS["skip_instruction"] + FRAGMENTS["entry_epilogue"]
    instrs, state = compile_fragment(acc, EMPTY_CACHE, "base")
    reads = [f for op, f in instrs if op == READ]
    writes = [f for op, f in instrs if op == WRITE]
    assert reads.count(F.GUEST_INTERRUPTIBILITY_INFO) == 2
    assert F.GUEST_RIP not in writes and state[1] == (F.GUEST_RIP,)  # deferred to entry
    instrs2, _ = compile_fragment(acc, EMPTY_CACHE, "extended")
    assert [f for op, f in instrs2 if op == READ].count(F.GUEST_INTERRUPTIBILITY_INFO) == 1
    assert not [f for op, f in instrs2 if op == WRITE]


# ---------------------------------------------------------------- reflection and merge
def test_reflection_syncs_vmcs02_into_vmcs12() -> None:
    m = NestedVmx(Config.from_preset(TURTLES_2010))
    for _ in range(3):
        m.l2_exit(R.CPUID, "cpuid")
        m.l1_vmresume()
    assert all(m.vmcs12.writes()[f] >= 3 for f in REFLECT_HOT_SYNC)
    assert all(m.vmcs02.reads()[f] == 3 for f in REFLECT_HOT_SYNC)
    # the Turtles-era KVM has no dirty tracking: the full merge on every entry
    assert m.stats.merges_full == 3 and m.vmcs02.writes()[MERGE_RARE[0]] == 3


def test_dirty_tracking_skips_rare_merge_until_vmcs12_is_dirty() -> None:
    m = NestedVmx(Config.from_preset(PRESETS["shadow-vmcs"]))
    m.l2_exit(R.CPUID, "cpuid")
    m.l1_vmresume()
    assert m.stats.merges_full == 0
    m.l1_set_io_passthrough(frozenset({VIRTIO_NOTIFY_PORT}))  # writes exec controls
    m.l2_exit(R.CPUID, "cpuid")
    m.l1_vmresume()
    assert m.stats.merges_full == 1
    before = m.stats.cycles_l0
    m.l2_exit(R.CPUID, "cpuid")
    m.l1_vmresume()
    assert (
        m.stats.merges_full == 1
        and m.stats.cycles_l0 - before < PRESETS["shadow-vmcs"].merge_rare + 20_000
    )


def test_trapped_write_outside_rw_shadow_list_dirties() -> None:
    m = NestedVmx(Config.from_preset(PRESETS["shadow-vmcs"]))
    m.l2_exit(R.EPT_MISCONFIG, "mmio_kick", to_l1=True)  # writes only GUEST_RIP (RW list)
    assert not m.vmcs12_dirty
    m._execute(((WRITE, F.EPT_POINTER),), "test")
    assert m.vmcs12_dirty


# ---------------------------------------------------------------- arithmetic and state
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("workload", ["cpuid", "io-kick", "io-user", "mmio-kick"])
def test_cost_arithmetic_adds_up(preset: str, workload: str) -> None:
    r = measure(workload, "l1", preset, count=7)
    t = r["totals"]
    lv = r["cycles_by_level"]
    assert t["cycles"] == pytest.approx(sum(lv.values()))
    # every exit's row = round trip + L0's work for it; L1's own cycles are not an exit's
    assert sum(row["cycles"] for row in r["by_reason"]) == pytest.approx(lv["switch"] + lv["L0"])
    assert sum(row["count"] for row in r["by_reason"]) == t["l0_exits"]
    assert t["l0_exits"] == t["l2_exits"] + t["l1_exits"]
    assert t["time_us"] == pytest.approx(t["cycles"] / (PRESETS[preset].clock_ghz * 1000))
    assert lv["switch"] == t["l0_exits"] * PRESETS[preset].hw_exit
    assert r["per_op"]["cycles"] == pytest.approx(t["cycles"] / 7)


def test_state_machine_rejects_impossible_transitions() -> None:
    m = NestedVmx(Config.from_preset(TURTLES_2010))
    with pytest.raises(ModelError):
        m.l1_vmresume()
    with pytest.raises(ModelError):
        m.l1_exit(R.MSR_WRITE, "msr_write", cause="x")
    m.l2_exit(R.CPUID, "cpuid")
    with pytest.raises(ModelError):
        m.l2_exit(R.CPUID, "cpuid")


def test_l1_interrupt_while_l2_runs_forces_a_reflected_exit() -> None:
    m = NestedVmx(Config.from_preset(TURTLES_2010))
    m.l0_interrupt_l1()
    assert m.state == 1 and m.stats.reflected == 1 and m.stats.irqs_injected_l1 == 1
    m.l1_interrupt_l2()
    m.l1_vmresume()
    assert m.stats.irqs_injected_l2 == 1
    assert m.vmcs12.reads()[F.VM_EXIT_INTR_INFO] >= 1


def test_trace_off_by_default_and_complete_when_on() -> None:
    assert "trace" not in measure("cpuid", "l1", "turtles-2010", count=2)
    r = measure("cpuid", "l1", "turtles-2010", count=2, trace=True)
    vmcs = [e for e in r["trace"] if e[1] in ("VMREAD", "VMWRITE")]
    assert len(vmcs) == 22 and all(e[3] == "trapped" for e in vmcs)
