"""The ``xlio`` command as a user runs it: a real subprocess, real output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def xlio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio", *args], capture_output=True, text=True, timeout=120
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


# ---------------------------------------------------------------- every option, malformed
MALFORMED = ("-1", "0", "99999999999999999999", "abc", "inf", "nan", "", "1e400")


#: (command, option) -> malformed values that are in fact valid there
def _a_socket() -> str:
    """A unix socket that exists for the module's run (``guest`` takes one)."""
    import atexit
    import shutil
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="xlio-cli-")
    atexit.register(shutil.rmtree, d, True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, "vu.sock"))
    atexit.register(s.close)
    return os.path.join(d, "vu.sock")


_LISTENING = _a_socket()
VALID_THERE = {
    ("netperf", "--seed"): {"0"},
    ("serve", "--pcap"): set(MALFORMED) - {""},  # file names (tested apart below)
    ("serve", "--vhost-user"): set(MALFORMED) - {""},  # socket names
    ("guest", "--run"): set(MALFORMED) - {""},  # shell commands
    ("sweep", "--csv"): set(MALFORMED) - {""},  # file names
    ("sweep", "--json"): set(MALFORMED) - {""},
    ("sweep", "--metric"): {"abc", "inf", "nan"},  # keys: checked by --of (test_reports)
    ("profile", "--output"): set(MALFORMED) - {""},  # file names
    ("estimate", "--plot"): set(MALFORMED) - {""},
    ("calibrate", "--output"): set(MALFORMED) - {""},  # file names
    ("calibrate", "--hold-out"): set(MALFORMED) - {""},  # test names: checked against the input
    **{(c, "--seed"): {"0"} for c in ("measure", "vmexit", "compare", "estimate", "sensitivity")},
    ("sensitivity", "--figure"): {"abc", "inf", "nan"},  # keys: checked against the run
    ("sensitivity", "--plot"): set(MALFORMED) - {""},
    **{(c, "--cache"): set(MALFORMED) - {""}  # directory names
       for c in ("measure", "vmexit", "netperf", "compare", "estimate", "sweep", "sensitivity")},
}  # fmt: skip
REQUIRED = {
    "measure": ["--workload", "cpuid"],
    "trace": ["--workload", "cpuid"],
    "sweep": ["--workload", "tx", "--param", "batch=1,2"],
    "estimate": ["kbuild"],
    "calibrate": ["--vmexit", "l1=/dev/null"],
    "guest": ["--vhost-user", _LISTENING],
}


def _value_options() -> list[tuple[str, str]]:
    import argparse

    from xlio.cli import build_parser

    out = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        for act in parser._actions:
            if act.option_strings and act.nargs is None and act.const is None:
                opt = max(act.option_strings, key=len)
                # every option that takes a value is checked when parsed
                assert act.choices is not None or act.type is not None, (cmd, opt)
                out.append((cmd, opt))
    return out


VALUE_OPTIONS = _value_options()


def test_every_value_option_is_covered() -> None:
    cmds = {c for c, _ in VALUE_OPTIONS}
    assert cmds == {
        "measure", "demo", "netperf", "vmexit", "serve", "trace", "sweep", "compare",
        "estimate", "profile", "calibrate", "sensitivity", "guest",
    }  # fmt: skip
    assert len(VALUE_OPTIONS) >= 35


@pytest.mark.parametrize("cmd,opt", VALUE_OPTIONS)
def test_every_option_refuses_malformed_values_in_one_line(
    cmd: str, opt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from xlio.cli import main

    for value in MALFORMED:
        if value in VALID_THERE.get((cmd, opt), ()):
            continue
        with pytest.raises(SystemExit) as e:
            main([cmd, *REQUIRED.get(cmd, []), opt, value])
        out, err = capsys.readouterr()
        assert e.value.code == 2, (opt, value)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"xlio {cmd}: error: argument "), err
        assert opt in lines[0] or opt.lstrip("-") in lines[0]


@pytest.mark.parametrize(
    "name",
    ["xlio-../etc", "xlio-a/b", "other", "xlio-", "xlio-" + "a" * 251, "xlio-a b", "xlio-\u00e9"],
)
def test_namespace_names_are_validated(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from xlio.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--netns", name])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("xlio serve: error: argument --netns")


def test_an_unwritable_pcap_is_refused_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xlio.cli import main

    for bad in (str(tmp_path), str(tmp_path / "missing" / "x.pcap")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--pcap", bad, "--netns", "xlio-never-built"])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("xlio serve: error: argument --pcap")
    assert not os.path.exists("/run/netns/xlio-never-built")


def test_demo_tap_refuses_what_it_would_ignore() -> None:
    for args in (("--count", "201"), ("--batch", "4"), ("--frame-size", "100")):
        p = xlio("demo", "--tap", *args)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.startswith("xlio demo: error: "), p.stderr


def test_presets_list_every_parameter_with_its_source() -> None:
    from xlio.sim.presets import PRESETS

    p = xlio("presets", "kvm-2019", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert set(r["params"]) == set(PRESETS["kvm-2019"].params)
    assert r["params"]["hw_exit"] == {
        "value": 910, "unit": "cycles", "kind": "calibrated",
        "source": "calibrated: single-level cpuid = 1,060 (REFERENCE 5)",
        "low": 728, "high": 1137.5,
        "range_basis": "calibrated on a published total through estimated shares: "
        "x0.8-x1.25 (estimate)",
    }  # fmt: skip
    assert all(v["source"] for v in r["params"].values())
    # published, derived, booleans and names have no range; every estimate has one
    for v in r["params"].values():
        ranged = "low" in v
        assert ranged == (
            v["kind"] in ("estimate", "calibrated")
            and v["value"] not in (0, True, False)
            and not isinstance(v["value"], str)
        ), v
        if ranged:
            assert v["low"] <= v["value"] <= v["high"] and v["range_basis"]
    listing = xlio("presets")
    assert listing.returncode == 0 and all(name in listing.stdout for name in PRESETS)
    text = xlio("presets", "turtles-2010").stdout
    assert "hw_exit" in text and "Turtles" in text


def test_version() -> None:
    from xlio import __version__

    p = xlio("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"xlio {__version__}"


def test_every_package_is_installed() -> None:
    """A plain (not editable) install carries every package: each folder
    with an __init__.py under xlio/ is in pyproject's list, as are the three
    folders installed as subpackages."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"xlio." + p.parent.name for p in (root / "xlio").glob("*/__init__.py")}
    assert found <= listed, found - listed
    assert {"xlio.backends", "xlio.frontends", "xlio.sim"} <= listed
    assert "*.toml" in cfg["package-data"]["xlio.profiles"]
