"""The ``xlio`` command as a user runs it: a real subprocess, real output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def xlio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_measure_json_contract() -> None:
    p = xlio("measure", "--workload", "cpuid", "--path", "l1", "--preset", "turtles-2010", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for part in ("per_op", "totals"):
        for k in (
            "l0_exits",
            "l2_exits",
            "l1_exits",
            "reflected",
            "vmcs_emulated",
            "crossings",
            "cycles",
        ):
            assert k in r[part]
    assert r["per_op"]["l0_exits"] == 13
    assert {"level", "reason", "count", "cycles"} <= set(r["by_reason"][0])
    assert r["config"]["preset"] == "turtles-2010" and r["config"]["path"] == "l1"


def test_measure_switches_reach_the_model() -> None:
    p = xlio("measure", "--workload", "cpuid", "--no-vmcs-exits", "--json", "--count", "3")
    assert json.loads(p.stdout)["per_op"]["l0_exits"] == 2
    p = xlio(
        "measure", "--workload", "io-kick", "--preset", "turtles-2010", "--shadow-vmcs", "--json"
    )
    assert json.loads(p.stdout)["per_op"]["l0_exits"] == 2
    p = xlio("measure", "--workload", "io-kick", "--cache-reg", "extended", "--json")
    assert json.loads(p.stdout)["per_op"]["vmcs_emulated"] == 8
    p = xlio("measure", "--workload", "cpuid", "--operand", "memory", "--json")
    assert json.loads(p.stdout)["config"]["operand"] == "memory"


def test_measure_text_report_reads_like_perf_kvm_stat() -> None:
    p = xlio("measure", "--workload", "io-user", "--path", "l1")
    assert p.returncode == 0
    out = p.stdout
    assert "VMREAD" in out and "MSR_WRITE" in out and "IO_INSTRUCTION" in out
    assert "l0_exits" in out and "31" in out


def test_memory_workload_options_reach_the_model() -> None:
    small = ("--working-set", "4", "--l2-mem", "1", "--l1-mem", "2")
    p = xlio("measure", "--workload", "ept-churn", *small, "--rate", "400", "--seconds", "0.5",
             "--touch-hz", "10", "--swap", "l0", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["per"] == "second" and r["config"]["swap"] == "l0"
    assert r["totals"]["cycles_per_second"] == r["totals"]["cycles"] / 0.5
    assert r["totals"]["reflected"] == 0
    p = xlio("measure", "--workload", "ept-touch", *small, "--static-ept", "--json")
    assert json.loads(p.stdout)["totals"]["ept_violations_reflected"] == 0
    p = xlio("measure", "--workload", "ept-touch", *small, "--virtual-ept", "shadow")
    assert p.returncode == 0 and "ept12_writes_trapped" in p.stdout


def test_demo_side_by_side() -> None:
    p = xlio("demo", "--count", "20")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(line.startswith("l1 ") for line in lines) and "L1 path / L0 direct path" in p.stdout
    d = json.loads(xlio("demo", "--count", "20", "--json").stdout)
    assert set(d["paths"]) == {"single", "l1", "l0"}
    assert d["paths"]["l1"]["reflected"] == 3
    assert d["l1_over_l0"] > 1
    v = json.loads(xlio("demo", "--count", "20", "--preset", "kvm-2019", "--virtual-idle",
                        "--json").stdout)  # fmt: skip
    assert v["paths"]["l0"]["reflected"] == 0 and v["l1_over_l0"] > 1


def test_network_workload_options() -> None:
    p = xlio("measure", "--workload", "tx", "--path", "l0", "--count", "64", "--batch", "8",
             "--frame-size", "1514", "--no-event-idx", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["per"] == "frame" and r["count"] == 64
    assert r["per_op"]["l0_exits"] == 1 / 8
    assert r["devices"]["l0-direct"]["tx_bytes_count"] == 64 * 1514


@pytest.mark.parametrize(
    "args",
    [
        ("measure", "--workload", "tx", "--batch", "512"),
        ("measure", "--workload", "echo", "--frame-size", "20"),
        ("measure", "--workload", "rx", "--queue-size", "100"),
        ("demo", "--count", "0"),
        ("measure", "--workload", "ept-touch", "--virtual-ept", "magic"),
        ("measure", "--workload", "ept-churn", "--seconds", "-1"),
        ("measure", "--workload", "ept-touch", "--page-size", "1g"),
        ("measure", "--workload", "ept-touch", "--working-set", "999999"),
        ("measure", "--workload", "nope"),
        ("measure", "--workload", "cpuid", "--count", "0"),
        ("measure", "--workload", "cpuid", "--count", "many"),
        ("measure", "--workload", "cpuid", "--path", "l3"),
        ("measure", "--workload", "cpuid", "--preset", "bogus"),
        ("measure", "--workload", "cpuid", "--operand", "stack"),
        ("measure", "--workload", "cpuid", "--cache-reg", "huge"),
        ("frobnicate",),
    ],
)
def test_user_mistakes_are_one_line_and_status_2(args: tuple[str, ...]) -> None:
    p = xlio(*args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
