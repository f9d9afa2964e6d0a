"""The guest's paging under each MMU configuration, profiles and the whole-program estimate.

Hand counts follow KVM's handlers (REFERENCE section 13) and the L1 handler
profiles of ``sim.profiles``: in ``base`` register-cache mode (turtles-2010)
every VMREAD/VMWRITE but RIP's and RSP's exits, and L1's entry epilogue adds
2 VMREADs (RFLAGS, interruptibility) and 2 VMWRITEs (TPR threshold, entry
interruption info) before its VMRESUME.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlio.estimate import estimate, parse_scale_to
from xlio.measure import UsageError, measure
from xlio.profile import Profile, ProfileError, from_dict, load, profile, to_toml
from xlio.profiles import SHIPPED
from xlio.sim.config import Config
from xlio.sim.guest_mmu import GuestPaging, Paging
from xlio.sim.nested import NestedVmx
from xlio.sim.presets import PRESETS

EPILOGUE = 4  # entry epilogue VMCS exits in base mode
TOUCHFORK = """
import mmap, os, sys
n, k = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(-1, n * 4096)
for i in range(n):
    m[i * 4096] = 1
for _ in range(k):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


def paging(preset: str, mode: Paging) -> tuple[NestedVmx, GuestPaging]:
    m = NestedVmx(Config.from_preset(PRESETS[preset], nested=mode.nested))
    return m, GuestPaging(m, mode)


def test_a_page_fault_under_shadow_on_ept_is_three_reflected_events() -> None:
    """inject: L2 exit, 5 VMREADs (exit reason, IDT vectoring, interruption
    info, error code, qualification) + 2 VMWRITEs (entry interruption info,
    error code) + epilogue + VMRESUME = 13; the guest's PTE write to its
    synced leaf (unsync): L2 exit + 5 reads + epilogue + VMRESUME = 11; the
    fill: the same 11."""
    m, g = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    g.page_fault(0)
    s = m.stats
    assert (s.l2_exits, s.reflected) == (3, 3)
    assert s.l0_exits == (1 + 7 + EPILOGUE + 1) + 2 * (1 + 5 + EPILOGUE + 1) == 35
    assert s.by_cause["vmresume"] == 3
    # with VMCS shadowing every field access is exitless: the L2 exits and VMRESUMEs
    m, g = paging("kvm-2019", Paging.SHADOW_ON_EPT)
    g.page_fault(0)
    assert m.stats.l0_exits == 6


@pytest.mark.parametrize("event", ["page_fault", "pte_write", "cr3_load", "invlpg"])
@pytest.mark.parametrize("mode", [Paging.SINGLE, Paging.NESTED_EPT])
def test_with_ept_no_paging_event_exits(event: str, mode: Paging) -> None:
    m, g = paging("turtles-2010", mode)
    getattr(g, event)(*((0,) if event in ("page_fault", "pte_write") else ()))
    assert m.stats.l0_exits == 0 and m.stats.cycles == 0


def test_invlpg_and_cr3_load_hand_counts() -> None:
    """INVLPG under shadow-on-EPT: L2 exit; L1 reads exit reason, IDT
    vectoring, qualification, instruction length, RIP, interruptibility and
    writes interruptibility (6 + 1); epilogue 4; RIP's deferred write 1; its
    INVVPID 1; VMRESUME 1: 15. Single-level shadow: one exit."""
    m, g = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    g.invlpg()
    assert m.stats.l0_exits == 1 + 7 + EPILOGUE + 1 + 1 + 1 == 15
    assert m.stats.by_cause["l1-tlb-flush"] == 1
    m, g = paging("turtles-2010", Paging.SINGLE_SHADOW)
    g.invlpg()
    g.cr3_load()
    assert (m.stats.l0_exits, m.stats.l2_exits, m.stats.l1_exits) == (2, 2, 0)
    # CR3 load: as INVLPG, plus the new shadow root written to GUEST_CR3
    m, g = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    g.cr3_load()
    assert m.stats.l0_exits == 15 + 1


def test_a_full_tlb_flush_is_two_cr4_writes_under_a_shadow_mmu() -> None:
    """Each CR4 write: L2 exit; 6 VMREADs (exit reason, IDT vectoring,
    qualification, instruction length, RIP, interruptibility) and 3 VMWRITEs
    (interruptibility, CR4 read shadow, guest CR4); epilogue 4; RIP's
    deferred write; INVVPID; VMRESUME: 17. With EPT, PGE is the guest's bit."""
    m, g = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    g.pte_write(3)
    before = m.stats.l0_exits
    g.tlb_flush_all()
    assert m.stats.l0_exits - before == 2 * (1 + 9 + EPILOGUE + 1 + 1 + 1) == 34
    assert g.unsync == set()
    m, g = paging("turtles-2010", Paging.NESTED_EPT)
    g.tlb_flush_all()
    assert m.stats.l0_exits == 0


def test_shadow_on_shadow_traps_l1s_shadow_table_writes() -> None:
    a, ga = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    b, gb = paging("turtles-2010", Paging.SHADOW_ON_SHADOW)
    for g in (ga, gb):
        g.page_fault(0)
    # the unsync and the fill each write one shadow entry: two more L1 exits
    assert b.stats.l1_exits - a.stats.l1_exits == 2
    assert b.stats.by_cause["l1-shadow-fill"] == 1 and b.stats.by_cause["l1-shadow-unsync"] == 1


def test_unsynced_leaf_writes_do_not_trap_and_the_resync_costs_what_the_model_says() -> None:
    m, g = paging("turtles-2010", Paging.SHADOW_ON_EPT)
    g.pte_write(7)
    first = m.stats.l0_exits
    assert first == 11
    for _ in range(100):
        g.pte_write(7)  # unsynced: the guest writes its table without an exit
    assert m.stats.l0_exits == first
    g.pte_write(8)
    assert m.stats.l0_exits == 2 * first and g.unsync == {7, 8}
    before = m.stats.cycles
    g.cr3_load()
    with_two = m.stats.cycles - before
    assert g.unsync == set()
    before = m.stats.cycles
    g.cr3_load()  # nothing unsynced now
    bare = m.stats.cycles - before
    c = m.costs
    assert with_two - bare == pytest.approx(2 * c.handlers["sync_page"] * c.l1_pollution)
    g.pte_write(7)  # re-protected at the resync: traps again
    assert m.stats.l0_exits == 2 * first + 16 + 16 + first


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["pf", "w", "cr3", "inv"]), st.integers(0, 5)), max_size=40
    )
)
def test_unsync_state_invariant(ops: list[tuple[str, int]]) -> None:
    """Whatever the guest does: after a CR3 load nothing is unsynced; a leaf
    is unsynced exactly when written (or faulted) since the last CR3 load;
    each leaf traps on a write at most once per CR3 interval; nested EPT never exits."""
    m, g = paging("kvm-2019", Paging.SHADOW_ON_EPT)
    e, ge = paging("kvm-2019", Paging.NESTED_EPT)
    written: set[int] = set()
    traps_since: dict[int, int] = {}
    for op, leaf in ops:
        before = g.traps["pte_unsync"]
        for x in (g, ge):
            if op == "pf":
                x.page_fault(leaf)
            elif op == "w":
                x.pte_write(leaf)
            elif op == "cr3":
                x.cr3_load()
            else:
                x.invlpg()
        if op in ("pf", "w"):
            traps_since[leaf] = traps_since.get(leaf, 0) + g.traps["pte_unsync"] - before
            assert traps_since[leaf] <= 1
            written.add(leaf)
        if op == "cr3":
            written.clear()
            traps_since.clear()
        assert g.unsync == written
    assert e.stats.l0_exits == 0


def test_paging_micro_workloads_in_measure_and_trace() -> None:
    r = measure("guest-pf", "l1", "turtles-2010", count=100, options={"l2_mmu": "shadow-on-ept"})
    assert r["per_op"]["l0_exits"] == 35
    r = measure("guest-pf", "l1", "turtles-2010", count=100)  # nested EPT: nothing
    assert r["per_op"]["l0_exits"] == 0
    r = measure("guest-pf", "single", "turtles-2010", count=10, options={"l2_mmu": "shadow-on-ept"})
    assert r["per_op"]["l0_exits"] == 3
    r = measure("timer-tick", "l1", "kvm-2019", count=10)
    assert r["per_op"]["l2_exits"] >= 1 and r["per_op"]["reflected"] >= 1
    with pytest.raises(UsageError):
        measure("cpuid", "l1", "turtles-2010", options={"l2_mmu": "shadow-on-ept"})
    p = xlio("trace", "--workload", "invlpg", "--path", "l1", "--l2-mmu", "shadow-on-ept",
             "--preset", "turtles-2010")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "INVLPG" in p.stdout and "INVVPID" in p.stdout


# ---------------------------------------------------------------- profiles
def xlio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio", *args], capture_output=True, text=True, timeout=timeout
    )


def _counts(tmp: Path, n: int, k: int, use_perf: bool | None) -> dict[str, float]:
    prog = tmp / "touchfork.py"
    prog.write_text(TOUCHFORK)
    p = profile([sys.executable, str(prog), str(n), str(k)], use_perf=use_perf)
    return {key: v * p.run["cpu_seconds"] for key, v in p.rates.items()}


@pytest.mark.parametrize("use_perf", [None, False], ids=["perf-if-it-works", "no-perf"])
def test_profile_recovers_pages_touched_and_forks(tmp_path: Path, use_perf: bool | None) -> None:
    """A program that touches N pages and forks K times: against a run with
    fewer pages, the faults recover the pages added, and against a run with
    fewer forks the forks added (each within 5%; a fork's child faults too,
    so each is varied alone)."""
    a = _counts(tmp_path, 2_000, 20, use_perf)
    b = _counts(tmp_path, 22_000, 20, use_perf)
    c = _counts(tmp_path, 2_000, 220, use_perf)
    assert b["minor_faults"] - a["minor_faults"] == pytest.approx(20_000, rel=0.05)
    assert c["forks"] - a["forks"] == pytest.approx(200, rel=0.05)


def test_profile_file_round_trip_and_bad_profiles(tmp_path: Path) -> None:
    prog = tmp_path / "t.py"
    prog.write_text(TOUCHFORK)
    out = tmp_path / "p.toml"
    r = xlio("profile", "-o", str(out), "--", sys.executable, str(prog), "1000", "2")
    assert r.returncode == 0, r.stderr
    p = load(str(out))
    assert p.rates["minor_faults"] > 0 and p.run["cpu_seconds"] > 0
    assert load(str(out)).rates == p.rates
    j = xlio("estimate", str(out), "--json")
    doc = json.loads(j.stdout)
    assert doc["rates"] == pytest.approx(p.rates) and doc["provenance"]["command"]
    good = out.read_text()
    bad = {
        "missing": None,
        "toml": "[rates\nminor_faults = 1",
        "negative": good.replace("minor_faults = ", "minor_faults = -", 1),
        "text": good.replace("forks = ", 'forks = "many" #', 1),
        "unknown": good.replace("[rates]\n", "[rates]\nhugepages = 3\n", 1),
        "table": good + "\n[extra]\nx = 1\n",
    }
    for name, text in bad.items():
        f = tmp_path / f"{name}.toml"
        if text is not None:
            f.write_text(text)
        r = xlio("estimate", str(f))
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xlio estimate: error: "), (name, lines)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert xlio("estimate", str(binary)).returncode == 2


def test_profile_of_a_failing_or_missing_command(tmp_path: Path) -> None:
    out = tmp_path / "p.toml"
    for cmd, says in ((["false"], "status 1"), (["no-such-command-xlio"], "not found")):
        r = xlio("profile", "-o", str(out), "--", *cmd)
        assert r.returncode == 2 and says in r.stderr and "no profile written" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()
    assert xlio("profile").returncode == 2


# ---------------------------------------------------------------- estimate
def _profile(**rates: float) -> Profile:
    base = {k: 0.0 for k in ("minor_faults", "major_faults", "context_switches", "forks",
                             "execs", "syscalls", "tlb_flushes", "timer_ticks",
                             "block_requests", "cr3_loads", "invlpgs", "pte_writes",
                             "first_touches")}  # fmt: skip
    base.update(rates)
    return from_dict({"rates": base, "run": {"cpu_seconds": 10.0, "wall_seconds": 11.0}}, "test")


def test_scale_to_changes_only_the_cpu_work() -> None:
    p = _profile(minor_faults=50_000, context_switches=500, cr3_loads=500, pte_writes=60_000,
                 timer_ticks=250, invlpgs=1_000, forks=20, execs=20)  # fmt: skip
    plain = estimate(p, "turtles-2010")
    scaled = estimate(p, "turtles-2010", scale_to=parse_scale_to("single=25"))
    rows = {r["config"]: r for r in scaled["rows"]}
    assert rows["single"]["seconds"] == pytest.approx(25)
    for a, b in zip(plain["rows"], scaled["rows"], strict=True):
        # more or less of the same program: every row by the same factor, the rates as they were
        assert b["seconds"] / a["seconds"] == pytest.approx(scaled["scale"])
        assert b["slowdown_vs_native"] == pytest.approx(a["slowdown_vs_native"])
        assert b["breakdown"]["per_cpu_second"] == a["breakdown"]["per_cpu_second"]
    assert scaled["rates"] == plain["rates"]
    assert estimate(p, "turtles-2010") == plain  # deterministic
    order = [r["config"] for r in plain["rows"]]
    assert order == [m.value for m in Paging]
    secs = {r["config"]: r["seconds"] for r in plain["rows"]}
    assert secs["native"] < secs["single"] <= secs["l2-nested-ept"] < secs["l2-shadow-on-ept"]
    assert secs["l2-shadow-on-ept"] < secs["l2-shadow-on-shadow"]


def test_scale_to_refuses_what_does_not_exist() -> None:
    for bad in ("single", "l3=25", "single=0", "single=-4", "single=abc", "single=nan"):
        with pytest.raises(UsageError):
            parse_scale_to(bad)
    r = xlio("estimate", "kbuild", "--scale-to", "bogus=3")
    assert r.returncode == 2
    assert r.stderr.startswith("xlio estimate: error: argument --scale-to: needs CONFIG=SECONDS")


def test_shipped_kbuild_profile() -> None:
    assert "kbuild" in SHIPPED
    p = load(SHIPPED["kbuild"])
    assert "make ARCH=x86_64 -j1 bzImage" in p.provenance["command"]
    r = xlio("estimate", "kbuild", "--preset", "turtles-2010", "--scale-to", "single=25", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [row["config"] for row in doc["rows"]] == [m.value for m in Paging]
    r = xlio("estimate", "kbuild", "--l2-mmu", "shadow-on-ept", "--json")
    assert [row["config"] for row in json.loads(r.stdout)["rows"]][-1] == "l2-shadow-on-ept"


def test_profile_toml_writer_escapes(tmp_path: Path) -> None:
    p = _profile(minor_faults=1.5)
    p.provenance["command"] = 'sh -c "echo \\ hi"'
    f = tmp_path / "x.toml"
    f.write_text(to_toml(p))
    assert load(str(f)).provenance["command"] == p.provenance["command"]
    with pytest.raises(ProfileError):
        from_dict({"rates": {}, "run": {"cpu_seconds": 1, "wall_seconds": 1}}, "x")
    assert os.path.exists(SHIPPED["kbuild"])
