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


@pytest.mark.parametrize(
    "args",
    [
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
