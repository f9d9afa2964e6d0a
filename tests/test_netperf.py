"""The timed model: vhost and NAPI behaviour, halting, conservation, determinism, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from xlio.backends.netperf import NetperfModel, NetperfOptions, Path
from xlio.backends.netperf import Test as NetTest
from xlio.netperf import netperf
from xlio.sim.nested import Config, NestedVmx
from xlio.sim.presets import PRESETS

KVM = PRESETS["kvm-2019"]
TURTLES = PRESETS["turtles-2010"]


def run(costs, test: NetTest, path: Path, **kw) -> dict:
    """One run; without the guest's timer tick unless ``ticks=True`` (these
    tests count the datapath's own exits per packet)."""
    switches = {k: kw.pop(k) for k in ("apicv", "virtual_idle") if k in kw}
    kw.setdefault("ticks", False)
    opts = NetperfOptions(test, path, duration=kw.pop("duration", 0.03), **kw)
    return NetperfModel(costs, opts, **switches).run()


def test_turtles_single_level_stream_lands_on_the_calibration() -> None:
    r = run(TURTLES, NetTest.TCP_STREAM, Path.SINGLE, duration=0.2)
    assert r["throughput_mbps"] == pytest.approx(935, rel=0.03)  # Turtles: ~935 Mb/s
    assert r["cpu"]["cpu0"] == pytest.approx(0.48, abs=0.02)  # at ~48% CPU


def test_a_backend_that_keeps_up_with_a_slow_guest_takes_every_kick() -> None:
    slow_guest = replace(KVM, guest_tx_packet=200_000, guest_rx_packet=100_000)
    r = run(slow_guest, NetTest.UDP_STREAM, Path.SINGLE, size=1000)
    # one datagram per send(): the backend is asleep each time, so every one kicks
    assert r["per_packet"]["kicks"] == pytest.approx(1.0, abs=0.01)
    assert r["per_packet"]["l0_exits"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("path", [Path.SINGLE, Path.L1])
def test_a_backend_that_falls_behind_polls_and_the_kick_rate_falls(path: Path) -> None:
    fast = run(KVM, NetTest.UDP_STREAM, path, size=1000)
    slow_backend = replace(KVM, backend_frame=40_000)
    slow = run(slow_backend, NetTest.UDP_STREAM, path, size=1000)
    assert slow["per_packet"]["kicks"] < fast["per_packet"]["kicks"] / 4
    assert slow["per_packet"]["kicks"] < 0.05


def test_an_idle_rr_guest_halts_between_transactions_at_the_hlt_paths_cost() -> None:
    r = run(KVM, NetTest.TCP_RR, Path.L0, duration=0.02)
    tps = r["transactions_per_s"]
    assert r["exits_per_s"]["L2 HLT"] == pytest.approx(tps, rel=0.02)
    assert r["exits_per_s"]["L1 HLT"] == pytest.approx(tps, rel=0.02)  # L1 halts too
    # what one halt costs in the timed run is what the HLT path of the model
    # costs: L2's HLT reflected to L1, L1 halting its vCPU (exits and L0's work
    # by the exit rows; L1's handler cycles are L1's, in no row)
    m = NestedVmx(Config.from_preset(KVM, nested=True))
    m.l2_hlt()
    hlt_path_rows = m.stats.cycles_switch + m.stats.cycles_l0
    model = NetperfModel(KVM, NetperfOptions(NetTest.TCP_RR, Path.L0, duration=0.02))
    model.run()
    rows = {(x["level"], x["reason"]): x for x in model.m.stats.reason_rows()}
    l2, l1 = rows[("L2", "HLT")], rows[("L1", "HLT")]
    assert l2["count"] == l1["count"]
    assert (l2["cycles"] + l1["cycles"]) / l2["count"] == pytest.approx(hlt_path_rows)
    v = run(KVM, NetTest.TCP_RR, Path.L0, duration=0.02, virtual_idle=True)
    assert "L1 HLT" not in v["exits_per_s"]
    assert v["transactions_per_s"] > tps


@pytest.mark.parametrize(
    ("test", "path"),
    [(NetTest.TCP_STREAM, Path.L1), (NetTest.UDP_STREAM, Path.SINGLE),
     (NetTest.UDP_STREAM, Path.L1), (NetTest.TCP_RR, Path.L0), (NetTest.UDP_RR, Path.L1)],
)  # fmt: skip
def test_every_packet_is_received_dropped_or_still_on_its_way(test: NetTest, path: Path) -> None:
    m = NetperfModel(TURTLES, NetperfOptions(test, path, duration=0.03))
    m.run()
    a = m.conservation()
    assert a["guest_sent"] == a["peer_received"] + a["dropped_to_peer"] + a["in_flight_to_peer"]
    assert a["peer_sent"] == a["guest_received"] + a["dropped_to_guest"] + a["in_flight_to_guest"]
    if test is NetTest.UDP_STREAM and path is Path.SINGLE:
        assert a["dropped_to_peer"] > 0  # the guest outruns 1 GbE: the NIC queue drops


def test_same_seed_same_result() -> None:
    a = run(TURTLES, NetTest.UDP_RR, Path.L1, seed=7)
    b = run(TURTLES, NetTest.UDP_RR, Path.L1, seed=7)
    assert a == b


def test_apicv_and_tso_show_in_kvm_2019_at_10g() -> None:
    r = run(KVM, NetTest.TCP_STREAM, Path.L0, link="10g", duration=0.01)
    assert r["throughput_mbps"] > 9_000  # TSO: the link, not per-packet costs, limits it
    assert "L2 EXTERNAL_INTERRUPT" not in r["exits_per_s"]  # posted interrupts


def test_netperf_cli_json_and_errors() -> None:
    cmd = [sys.executable, "-m", "xlio", "netperf"]
    p = subprocess.run(
        [*cmd, "-t", "TCP_RR", "--path", "l1", "--duration", "0.01", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("throughput_mbps", "packets_per_s", "transactions_per_s", "latency_us", "cpu",
                "cpu_busiest", "exits_per_s", "per_packet", "config"):  # fmt: skip
        assert key in r, key
    assert set(r["latency_us"]) == {"p50", "p90", "p99"}
    assert all(0 <= u <= 1.01 for u in r["cpu"].values())
    assert "l0_exits" in r["per_packet"] and r["config"]["test"] == "TCP_RR"
    text = subprocess.run([*cmd, "--duration", "0.01"], capture_output=True, text=True)
    assert "Throughput (10^6 bits/s)" in text.stdout and "bottleneck" in text.stdout
    for bad in (["-t", "TCP_CRR"], ["--link", "40g"], ["--duration", "100"], ["--path", "x"]):
        e = subprocess.run([*cmd, *bad], capture_output=True, text=True)
        assert e.returncode == 2 and "error" in e.stderr, bad


def test_netperf_function_validates() -> None:
    from xlio.measure import UsageError

    with pytest.raises(UsageError):
        netperf("TCP_STREAM", "single", l1_backend_vcpu="third")


@pytest.mark.parametrize("path", [Path.SINGLE, Path.L1])
def test_the_guests_tick_runs_at_its_hz_while_it_runs_and_costs_what_the_model_says(path) -> None:
    """The guest ticks at guest_hz while it runs and not while it halts (NOHZ
    idle): the nested stream saturates its CPU and ticks at guest_hz, the
    single-level one (about half a CPU) about half as often; each tick is
    the machine operation GuestPaging.timer_tick charges; an RR guest, which
    halts between transactions, ticks less."""
    on = run(TURTLES, NetTest.TCP_STREAM, path, duration=0.1, ticks=True)
    off = run(TURTLES, NetTest.TCP_STREAM, path, duration=0.1)
    running = on["cpu"]["cpu0"]
    assert on["timer_ticks_per_s"] == pytest.approx(TURTLES.guest_hz * running, rel=0.15)
    assert off["timer_ticks_per_s"] == 0
    from xlio.sim.guest_mmu import GuestPaging, Paging

    m = NestedVmx(Config.from_preset(TURTLES, nested=path is not Path.SINGLE))
    GuestPaging(m, Paging.SINGLE if path is Path.SINGLE else Paging.NESTED_EPT).timer_tick()
    tick = m.stats
    assert tick.l0_exits >= 1
    if path is Path.SINGLE:  # the CPU has room: the ticks' exits come on top of the datapath's
        added = sum(on["exits_per_s"].values()) - sum(off["exits_per_s"].values())
        assert added == pytest.approx(on["timer_ticks_per_s"] * tick.l0_exits, rel=0.15)
    else:  # a saturated CPU: the ticks' cycles come out of the datapath's
        assert on["throughput_mbps"] <= off["throughput_mbps"] + 1e-9
    rr = run(KVM, NetTest.TCP_RR, path, duration=0.1, ticks=True)
    assert 0 < rr["timer_ticks_per_s"] < KVM.guest_hz  # it halts between transactions
