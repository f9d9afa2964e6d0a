"""The virtual EPT model: format, schemes, optimizations, and the EPT02 invariant."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xlio.measure import UsageError, measure
from xlio.sim.costs import TURTLES_2010
from xlio.sim.ept import (
    EPT_LARGE,
    EPT_READ,
    EPT_RWX,
    EPT_WRITE,
    PAGE_2M,
    PAGE_4K,
    EptTable,
    entry_pa,
    is_misconfig,
    is_present,
    leaf_entry,
)
from xlio.sim.l1mmu import L1Mmu
from xlio.sim.memory import HostMemory, MemoryFault
from xlio.sim.nested import Config, NestedVmx
from xlio.sim.vept import VirtualEpt

MiB = 1 << 20


def totals(workload: str, **opts) -> dict:
    path = opts.pop("path", "l1")
    return measure(workload, path, "turtles-2010", options=opts)["totals"]


# ---------------------------------------------------------------- format
def test_entry_format() -> None:
    e = leaf_entry(0x1234_5000, EPT_RWX, PAGE_4K)
    assert e & EPT_RWX == 7 and entry_pa(e) == 0x1234_5000 and (e >> 3) & 7 == 6  # WB
    assert not e & EPT_LARGE
    assert leaf_entry(0x4020_0000, EPT_READ, PAGE_2M) & EPT_LARGE
    assert is_misconfig(EPT_WRITE) and not is_present(0) and is_present(EPT_READ)


@pytest.mark.parametrize("shift", [PAGE_4K, PAGE_2M])
def test_four_level_walk_in_bytes(shift: int) -> None:
    host = HostMemory(64 * MiB)
    t = EptTable(host, host.alloc_frame, host.free_frame, shift, "t")
    gpa = (5 << 39) | (3 << 30) | (7 << 21) | ((9 << 12) if shift == PAGE_4K else 0)
    t.map(gpa, 0x20_0000 if shift == PAGE_2M else 0x5000)
    off = 0x123
    assert t.translate(gpa + off) == (0x20_0000 if shift == PAGE_2M else 0x5000) + off
    entry, reads = t.walk(gpa)
    assert reads == (4 if shift == PAGE_4K else 3) and is_present(entry)
    assert t.translate(gpa + (1 << shift)) is None
    assert t.present == 1 and t.unmap(gpa) and t.present == 0
    # the tables are real bytes in memory: the root's entry points at the PDPT
    root_entry = host.read_u64(t.root, 5)
    assert is_present(root_entry) and (entry_pa(root_entry) >> 12) in t.table_frames


def test_memory_bounds_are_checked() -> None:
    host = HostMemory(1 * MiB)
    with pytest.raises(MemoryFault):
        host.read(host.nframes, 0, 8)
    with pytest.raises(MemoryFault):
        host.write(1, 4090, b"12345678")
    assert host.read(3, 0, 4) == bytes(4) and host.resident_bytes() == 0  # sparse


# ---------------------------------------------------------------- headline effects
def small(**kw) -> dict:
    base = {"working_set_mib": 4, "l2_mem_gib": 1, "l1_mem_gib": 2}
    base.update(kw)
    return base


def test_first_touch_reflects_each_page_to_l1() -> None:
    t = totals("ept-touch", **small())
    pages = 4 * MiB >> 12
    assert t["ept_violations_reflected"] == pages and t["reflected"] == pages
    assert t["ept_violations_l0"] == pages  # the retry after L1 mapped it
    assert t["invept_emulated"] == pages  # a naive L1 INVEPTs every change


def test_static_ept_removes_reflected_first_touch_and_ept02_prebuild_the_rest() -> None:
    pages = 4 * MiB >> 12
    t = totals("ept-touch", **small(static_ept=True))
    assert t["ept_violations_reflected"] == 0 and t["reflected"] == 0
    assert t["ept_violations_l0"] == pages
    t2 = totals("ept-touch", **small(static_ept02=True))
    assert t2["ept_violations_l0"] == 0 and t2["l0_exits"] == 0


def test_avoid_invept_removes_only_the_unneeded_ones() -> None:
    assert totals("ept-touch", **small(avoid_invept=True))["invept_emulated"] == 0
    churn = dict(small(), rate=400, seconds=0.5, touch_hz=10)
    naive = totals("ept-churn", **churn)
    smart = totals("ept-churn", **churn, avoid_invept=True)
    evictions = 400 * 0.5 / 2
    assert naive["invept_emulated"] == 2 * evictions  # evict + swap-in
    assert smart["invept_emulated"] == evictions  # evictions still need theirs
    assert smart["invept_skipped"] == evictions


@pytest.mark.parametrize("ws", [1, 2, 4])
def test_vtlb_invept_costs_work_proportional_to_ept02_working_set(ws: int) -> None:
    m = NestedVmx(Config.from_preset(TURTLES_2010))
    host = HostMemory(64 * MiB)
    vept = VirtualEpt(m, host, 32 * MiB, PAGE_4K, "vtlb")
    mmu = L1Mmu(m, vept, 16 * MiB, avoid_invept=True)
    mmu.prebuild()
    pages = ws * MiB >> 12
    vept.l2_touch(0, pages, mmu.l2_fault)
    m.reset_stats()
    with m.l1_background():
        vept.invept()
    s = m.stats
    assert s.ept02_entries_zapped == pages
    c = TURTLES_2010
    assert s.cycles_l0 == c.handlers["invept"] + c.lock + pages * c.ept02_zap
    vept.l2_touch(0, pages, mmu.l2_fault)  # the rebuild: one L0-handled exit per entry
    assert s.ept02_entries_built == pages and s.ept_violations_l0 == pages


def test_shadow_invept_is_cheap_and_ept12_writes_trap() -> None:
    churn = dict(small(), rate=400, seconds=0.5, touch_hz=10)
    sh = totals("ept-churn", **churn, virtual_ept="shadow")
    vt = totals("ept-churn", **churn, virtual_ept="vtlb")
    assert sh["ept02_entries_zapped"] == 100  # only the evicted pages' entries
    assert vt["ept02_entries_zapped"] > 10 * sh["ept02_entries_zapped"]
    assert sh["ept12_writes_trapped"] == 200 and vt["ept12_writes_trapped"] == 0
    assert sh["lock_acquisitions"] >= sh["ept12_writes_trapped"]


def test_swap_in_l0_removes_ept12_churn() -> None:
    churn = dict(small(), rate=400, seconds=0.5, touch_hz=10)
    for scheme in ("vtlb", "shadow"):
        l1 = totals("ept-churn", **churn, virtual_ept=scheme, swap="l1")
        l0 = totals("ept-churn", **churn, virtual_ept=scheme, swap="l0")
        assert l1["reflected"] > 0 and l1["invept_emulated"] > 0
        assert l0["reflected"] == 0 and l0["invept_emulated"] == 0
        assert l0["ept12_writes_trapped"] == 0 and l0["l1_exits"] == 0
        assert l0["cycles_per_second"] < l1["cycles_per_second"]


def test_defer_rebuild_cuts_exits_not_entries() -> None:
    churn = dict(small(), rate=400, seconds=0.5, touch_hz=10)
    now = totals("ept-churn", **churn)
    later = totals("ept-churn", **churn, defer_rebuild=True)
    assert later["ept_violations_l0"] * 4 < now["ept_violations_l0"]
    assert later["ept02_entries_built"] >= now["ept02_entries_built"] * 0.9


def test_two_mib_pages() -> None:
    t = totals("ept-touch", **small(working_set_mib=64, page_size="2m", avoid_invept=True))
    assert t["ept_violations_reflected"] == 32 and t["ept02_entries_built"] == 32


def test_bad_memory_options_are_usage_errors() -> None:
    for bad in ({"virtual_ept": "magic"}, {"page_size": "1g"}, {"swap": "l2"},
                {"working_set_mib": 10**9}, {"l1_mem_gib": 1, "l2_mem_gib": 2}):  # fmt: skip
        with pytest.raises(UsageError):
            measure("ept-touch", "l1", "turtles-2010", options=bad)


# ---------------------------------------------------------------- the invariant
PAGES = [*range(0, 24), *range(510, 530)]  # two leaf tables of EPT12 and EPT02


class EptMachine(RuleBasedStateMachine):
    """Random L1 map/unmap/remap, INVEPT, L0 swap, L2 touches and translations.

    After every step: each present EPT02 entry is EPT12 composed with EPT01,
    and the translation service never returns what EPT12 no longer maps.
    """

    scheme = "vtlb"
    defer = False
    avoid = False

    @initialize()
    def build(self) -> None:
        self.m = NestedVmx(Config.from_preset(TURTLES_2010))
        self.host = HostMemory(64 * MiB)
        self.vept = VirtualEpt(self.m, self.host, 16 * MiB, PAGE_4K, self.scheme, self.defer)
        self.mmu = L1Mmu(self.m, self.vept, 4 * MiB, avoid_invept=self.avoid)

    def mapped(self, p: int) -> bool:
        return self.mmu.l1_page_of(p) is not None

    @rule(p=st.sampled_from(PAGES))
    def l1_map(self, p: int) -> None:
        if not self.mapped(p):
            self.mmu.map_page(p)

    @rule(p=st.sampled_from(PAGES))
    def l1_unmap(self, p: int) -> None:
        if self.mapped(p):
            self.mmu.evict(p)

    @rule(p=st.sampled_from(PAGES))
    def l1_remap(self, p: int) -> None:
        if self.mapped(p):
            self.mmu.remap_page(p)

    @rule()
    def l1_invept(self) -> None:
        with self.m.l1_background():
            self.vept.invept()

    @rule(p=st.sampled_from(PAGES))
    def l0_swap(self, p: int) -> None:
        l1 = self.mmu.l1_page_of(p)
        if l1 is not None and l1 not in self.vept.swapped_out:
            self.vept.l0_swap_out(l1, p)

    @rule(first=st.sampled_from(PAGES), n=st.integers(1, 20))
    def l2_touch(self, first: int, n: int) -> None:
        self.vept.l2_touch(first, n, self.mmu.l2_fault)
        for p in range(first, first + n):
            assert self.mapped(p)  # L2 touched it: L1 mapped it on the reflected fault

    @rule(p=st.sampled_from(PAGES), off=st.integers(0, 4095))
    def translate(self, p: int, off: int) -> None:
        try:
            hpa = self.vept.translate((p << 12) + off)
        except MemoryFault:
            assert not self.mapped(p)
            return
        l1 = self.mmu.l1_page_of(p)
        assert l1 is not None, "translation of a page EPT12 no longer maps"
        assert hpa == (self.vept.resolve_l1_frame(l1) << 12) + off

    @invariant()
    def ept02_is_the_composition(self) -> None:
        if hasattr(self, "vept"):
            self.vept.check_consistent()
            assert self.m.state == 2


def _machine_test(scheme: str, defer: bool, avoid: bool) -> Any:
    cls: Any = type(f"EptMachine_{scheme}_{defer}_{avoid}", (EptMachine,), {
        "scheme": scheme, "defer": defer, "avoid": avoid})  # fmt: skip
    cls.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    return cls.TestCase


TestVtlb = _machine_test("vtlb", False, False)
TestVtlbDeferAvoid = _machine_test("vtlb", True, True)
TestShadow = _machine_test("shadow", False, False)
TestShadowAvoid = _machine_test("shadow", False, True)
TestKvm = _machine_test("kvm", False, False)
TestKvmAvoid = _machine_test("kvm", False, True)


class KvmUnsyncMachine(EptMachine):
    """KVM's scheme: leaves go unsync on L1's first write and resync at INVEPT."""

    scheme = "kvm"
    avoid = True

    @invariant()
    def unsync_leaves_are_writable_and_never_protected(self) -> None:
        if hasattr(self, "vept"):
            assert not set(self.vept._unsync) & set(self.vept._wp)
            assert not set(self.vept._unsync) & self.vept._upper

    @rule()
    def invept_resyncs_every_unsync_leaf(self) -> None:
        before = self.m.stats.ept12_leaves_resynced
        n = len(self.vept._unsync)
        with self.m.l1_background():
            self.vept.invept()
        assert not self.vept._unsync
        assert self.m.stats.ept12_leaves_resynced == before + n


KvmUnsyncMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
TestKvmUnsync = KvmUnsyncMachine.TestCase
