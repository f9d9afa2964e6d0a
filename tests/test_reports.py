"""The CLI contract of the reports: cost model in the open, perf-kvm-stat tables
that add up, trace, sweep, compare, one JSON schema, Ctrl-C, serve's metrics."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from children import read_until, running, spawn, xlio_args
from taphosts import needs_taps

from xlio import __version__
from xlio.measure import WORKLOADS, measure, trace
from xlio.sim.presets import PRESETS, costs_from_toml, override
from xlio.sim.workloads import PATHS


def xlio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio", *args], capture_output=True, text=True, timeout=timeout
    )


def ok_json(*args: str) -> dict[str, Any]:
    p = xlio(*args, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema_version"] == 2 and doc["xlio_version"] == __version__
    assert doc["command"] == args[0]
    return doc


def one_line_error(p: subprocess.CompletedProcess[str], command: str, *words: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xlio {command}: error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ---------------------------------------------------------------- cost model
def test_set_changes_the_figure_and_is_recorded_in_config() -> None:
    base = ok_json("measure", "--workload", "cpuid", "--count", "10")
    r = ok_json("measure", "--workload", "cpuid", "--count", "10", "--set", "hw_exit=500")
    # 13 exits per CPUID on turtles-2010, each 500 cycles cheaper
    assert base["per_op"]["cycles"] - r["per_op"]["cycles"] == 13 * 500
    assert r["config"]["costs"]["hw_exit"] == 500 and r["config"]["costs_set"] == {
        "hw_exit": "--set"
    }
    assert base["config"]["costs"]["hw_exit"] == 1000 and base["config"]["costs_set"] == {}


@pytest.mark.parametrize(
    "setting,words",
    [
        ("hw_exit=-5", ["--set", "hw_exit", "at least 0"]),
        ("nonsense=1", ["--set", "unknown parameter"]),
        ("cache_reg=huge", ["--set", "cache_reg"]),
        ("apicv=maybe", ["--set", "apicv"]),
        ("hw_exit", ["--set", "PARAM=VALUE"]),
    ],
)
def test_bad_settings_are_one_line(setting: str, words: list[str]) -> None:
    one_line_error(xlio("measure", "--workload", "cpuid", "--set", setting), "measure", *words)


def test_costs_file(tmp_path: Path) -> None:
    good = tmp_path / "box.toml"
    good.write_text(
        'base = "kvm-2019"\nname = "my-box"\n[params]\nhw_exit = 900\n'
        '"handler.cpuid" = { value = 200, source = "measured on my box" }\n'
    )
    r = ok_json("vmexit", "cpuid", "--level", "1", "--costs", str(good))
    assert r["tests"]["cpuid"] == 900 + 200 and r["config"]["preset"] == "my-box"
    assert r["config"]["costs_set"]["handler.cpuid"] == "measured on my box"
    cases = {
        "missing.toml": None,
        "nobase.toml": ("[params]\nhw_exit = 1\n", "missing"),
        "unknown.toml": ('base = "kvm-2019"\n[params]\nwarp = 1\n', "unknown parameter"),
        "negative.toml": ('base = "kvm-2019"\n[params]\nreflect = -1\n', "at least 0"),
        "broken.toml": ("base = \n", "not TOML"),
    }
    for name, content in cases.items():
        f = tmp_path / name
        if content is not None:
            f.write_text(content[0])
        p = xlio("measure", "--workload", "cpuid", "--costs", str(f))
        one_line_error(p, "measure", "--costs", *([content[1]] if content else []))


def test_a_full_costs_file_needs_no_base() -> None:
    rows = PRESETS["turtles-2010"].params
    text = "[params]\n" + "".join(f'"{k}" = {json.dumps(p.value)}\n' for k, p in rows.items())
    model = costs_from_toml(text, "full.toml")
    assert {k: p.value for k, p in model.params.items()} == {k: p.value for k, p in rows.items()}
    assert measure("cpuid", "l1", model)["per_op"]["cycles"] == 59_500


# ---------------------------------------------------------------- the report adds up
@pytest.mark.parametrize("preset", list(PRESETS))
def test_exit_rows_and_work_rows_are_every_cycle(preset: str) -> None:
    for w in WORKLOADS:
        for path in PATHS:
            opts = {"seconds": 0.01, "working_set_mib": 4} if w.startswith("ept") else {}
            r = measure(w, path, preset, count=20, options=opts)
            total = r["totals"]["cycles"]
            rows = sum(x["cycles"] for x in r["by_reason"]) + sum(x["cycles"] for x in r["by_work"])
            assert rows == pytest.approx(total, rel=1e-9, abs=1e-6), (w, path)
            for x in r["by_reason"]:
                avg = x["cycles"] / x["count"]
                assert x["min_cycles"] <= avg + 1e-6 and avg <= x["max_cycles"] + 1e-6


@pytest.mark.parametrize(
    "args",
    [
        ["--workload", "cpuid", "--path", "l1"],
        ["--workload", "tx", "--path", "l0", "--batch", "32"],
    ],  # fmt: skip
)
def test_time_percent_adds_up_to_100_in_the_text(args: list[str]) -> None:
    p = xlio("measure", *args)
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if re.match(r"^L[012] ", line)]
    shares = [float(re.findall(r"([\d.]+)%", line)[-1]) for line in rows]
    assert sum(shares) == pytest.approx(100.0, abs=0.05 * len(rows))
    total = next(line for line in p.stdout.splitlines() if line.startswith("total"))
    assert "100.00%" in total
    assert any("(" in line for line in rows)  # work rows: handlers, backend, copies


def test_explain_defines_every_counter() -> None:
    p = xlio("measure", "--workload", "cpuid", "--explain")
    assert p.returncode == 0
    for word in ("crossings", "nested_entries", "merges_full", "time%", "samples%"):
        assert re.search(rf"^\s*{re.escape(word)}\s+\S", p.stdout, re.M), word


def test_per_request_figures_do_not_depend_on_count() -> None:
    for w in ("echo", "tx", "rx"):
        for path in PATHS:
            a = measure(w, path, "turtles-2010", count=200)["per_op"]["cycles"]
            b = measure(w, path, "turtles-2010", count=1000)["per_op"]["cycles"]
            assert a == pytest.approx(b, rel=1e-12), (w, path)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--workload", "cpuid", "--batch", "8"], "--batch"),
        (["--workload", "cpuid", "--static-ept"], "--static-ept"),
        (["--workload", "tx", "--working-set", "8"], "--working-set"),
        (["--workload", "ept-touch", "--kick", "mmio"], "--kick"),
    ],
)
def test_a_switch_that_does_not_apply_is_refused(args: list[str], flag: str) -> None:
    one_line_error(xlio("measure", *args), "measure", flag, "does not apply")


def test_defaults_are_recorded_and_whole_numbers_are_integers() -> None:
    r = ok_json("measure", "--workload", "tx", "--count", "64")
    cfg = r["config"]
    assert (cfg["batch"], cfg["frame_size"], cfg["queue_size"], cfg["event_idx"], cfg["kick"]) == (
        1, 256, 256, True, "pio",
    )  # fmt: skip
    assert isinstance(r["count"], int) and isinstance(r["totals"]["l0_exits"], int)


def test_every_command_speaks_the_same_schema(tmp_path: Path) -> None:
    ok_json("measure", "--workload", "vmcall", "--count", "3")
    ok_json("demo", "--count", "5")
    ok_json("netperf", "--duration", "0.05")
    ok_json("vmexit", "cpuid")
    ok_json("presets", "kvm-2019")
    ok_json("trace", "--workload", "cpuid")
    ok_json("compare", "--workload", "cpuid", "--a", "path=l1", "--b", "path=single")
    f = tmp_path / "s.json"
    p = xlio("sweep", "--workload", "cpuid", "--param", "preset=turtles-2010,kvm-2019",
             "--json", str(f))  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(f.read_text())
    assert doc["schema_version"] == 2 and doc["command"] == "sweep"


# ---------------------------------------------------------------- trace
def test_trace_of_one_kick_adds_up_to_the_measured_cost() -> None:
    for path in PATHS:
        for preset in PRESETS:
            t = trace("io-kick", path, preset, count=3)
            m = measure("io-kick", path, preset, count=3)
            for op in t["operations"]:
                assert sum(e["cycles"] for e in op["events"]) == pytest.approx(op["cycles"])
                assert op["cycles"] == pytest.approx(m["per_op"]["cycles"])
                assert not any(e["event"] == "untraced" for e in op["events"])
    t = trace("io-kick", "l1", "turtles-2010")
    events = t["operations"][0]["events"]
    assert events[0]["what"] == "IO_INSTRUCTION" and events[0]["detail"] == "reflected to L1"
    assert sum(e["event"] in ("VMREAD", "VMWRITE") and e["detail"] == "trapped"
               for e in events) == 12  # fmt: skip
    assert events[-1]["what"] == "VMRESUME"


def test_trace_cli_text_and_json() -> None:
    p = xlio("trace", "--workload", "echo", "--path", "l0", "--count", "2")
    assert p.returncode == 0, p.stderr
    assert "batch 1:" in p.stdout and "batch 2:" in p.stdout and "IO_INSTRUCTION" in p.stdout
    doc = ok_json("trace", "--workload", "tx", "--path", "l1", "--batch", "4")
    e = doc["operations"][0]["events"][0]
    assert set(e) == {"t_us", "level", "event", "what", "detail", "where", "cycles",
                      "total_cycles"}  # fmt: skip
    one_line_error(xlio("trace", "--workload", "cpuid", "--count", "101"), "trace", "--count")


# ---------------------------------------------------------------- sweep
def test_sweep_writes_csv_json_plot_and_keeps_stdout_clean(tmp_path: Path) -> None:
    c, j, png = tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "s.png"
    p = xlio("sweep", "--workload", "tx", "--param", "batch=1,4,16", "--count", "64",
             "--csv", str(c), "--json", str(j), "--plot", str(png), "--jobs", "2")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("xlio sweep: measure tx") and "\x1b" not in p.stdout
    rows = list(csv.DictReader(c.open()))
    assert list(rows[0])[:4] == ["batch", "path", "per", "l0_exits"]
    assert [(r["batch"], r["path"]) for r in rows] == [
        (b, path) for b in ("1", "4", "16") for path in PATHS
    ]
    by = {(r["batch"], r["path"]): float(r["l0_exits"]) for r in rows}
    assert by[("16", "l0")] == pytest.approx(1 / 16) and by[("1", "l1")] == 15
    doc = json.loads(j.read_text())
    assert doc["swept"] == ["batch"] and len(doc["rows"]) == 9 and not doc["interrupted"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # one process or two: the same rows
    j1 = tmp_path / "s1.json"
    p = xlio("sweep", "--workload", "tx", "--param", "batch=1,4,16", "--count", "64",
             "--json", str(j1))  # fmt: skip
    assert json.loads(j1.read_text())["rows"] == doc["rows"]


def test_sweep_two_parameters_a_cost_parameter_and_a_ratio(tmp_path: Path) -> None:
    j = tmp_path / "r.json"
    p = xlio("sweep", "--workload", "echo", "--path", "l1,l0", "--preset", "kvm-2019",
             "--param", "hw_exit=500,1000", "--param", "apicv=true,false", "--metric", "cycles",
             "--ratio", "l1/l0", "--count", "50", "--json", str(j),
             "--plot", str(tmp_path / "r.svg"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = json.loads(j.read_text())["rows"]
    assert len(rows) == 8
    at = {(r["hw_exit"], r["apicv"], r["path"]): r["cycles"] for r in rows}
    for apicv in (True, False):
        assert at[(1000, apicv, "l1")] > at[(500, apicv, "l1")]
    assert "l1/l0" in p.stdout
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--param", "warp=1,2"], ["unknown parameter"]),
        (["--param", "batch=1"], ["one or two"]),
        (
            [
                "--param",
                "batch=1,2",
                "--param",
                "frame_size=64,128",
                "--param",
                "queue_size=64,128",
            ],
            ["one or two"],
        ),
        (["--param", "batch=1,2", "--ratio", "l1/l2"], ["--ratio"]),
        (["--param", "batch=1,2", "--plot", "x.jpg"], ["--plot"]),
        (["--param", "batch=1,x"], ["batch"]),
        (["--param", "batch=1,2", "--metric", "nan"], ["--metric", "no 'nan'"]),
    ],
)
def test_sweep_mistakes_are_one_line(args: list[str], words: list[str]) -> None:
    one_line_error(xlio("sweep", "--workload", "tx", *args), "sweep", *words)


def test_sweep_without_matplotlib_says_so_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from xlio.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed

    def no_run(*args: Any) -> None:
        raise AssertionError("the sweep ran before the missing extra was reported")

    monkeypatch.setattr("xlio.sweep.run_all", no_run)
    status = main(["sweep", "--workload", "tx", "--param", "batch=1,2", "--count", "10",
                   "--plot", str(tmp_path / "x.png")])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.strip() == (
        "xlio sweep: error: argument --plot: needs matplotlib, the optional extra: "
        "pip install 'xlio[plot]'"
    )
    assert not (tmp_path / "x.png").exists()


def test_sweep_of_netperf_and_vmexit() -> None:
    doc = ok_json_file("sweep", "--of", "vmexit", "--workload", "cpuid",
                       "--param", "preset=turtles-2010,kvm-2019")  # fmt: skip
    cycles = {(r["preset"], r["path"]): r["cycles"] for r in doc["rows"]}
    assert cycles == {("turtles-2010", "single"): 2_500, ("turtles-2010", "l1"): 59_500,
                      ("kvm-2019", "single"): 1_060, ("kvm-2019", "l1"): 13_142}  # fmt: skip
    doc = ok_json_file("sweep", "--of", "netperf", "--workload", "UDP_RR", "--path", "l0",
                       "--param", "size=64,1024", "--param", "duration=0.05")  # fmt: skip
    assert [r["size"] for r in doc["rows"]] == [64, 1024]
    assert all(r["transactions_per_s"] > 0 for r in doc["rows"])


def ok_json_file(*args: str) -> dict[str, Any]:
    p = xlio(*args, "--json", "-")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema_version"] == 2
    return doc


# ---------------------------------------------------------------- compare
def test_compare_configurations_and_files(tmp_path: Path) -> None:
    doc = ok_json("compare", "--workload", "echo", "--a", "path=l1", "--b", "path=l0",
                  "--count", "50")  # fmt: skip
    rows = {r["figure"]: r for r in doc["rows"]}
    c = rows["cycles per request"]
    assert c["b"] < c["a"] and c["ratio"] == pytest.approx(c["b"] / c["a"])
    assert rows["l1_be_exits per request"]["b"] is None  # only the L1 path has them
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(xlio("measure", "--workload", "cpuid", "--json").stdout)
    b.write_text(xlio("measure", "--workload", "cpuid", "--preset", "kvm-2019", "--json").stdout)
    p = xlio("compare", str(a), str(b))
    assert p.returncode == 0 and "cycles per op" in p.stdout and "0.221x" in p.stdout
    n = tmp_path / "n.json"
    n.write_text(xlio("netperf", "--duration", "0.05", "--json").stdout)
    one_line_error(xlio("compare", str(a), str(n)), "compare", "cannot compare")
    one_line_error(xlio("compare", str(a)), "compare")


# ---------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize(
    "args",
    [
        ["measure", "--workload", "echo", "--path", "l1", "--count", "5000000"],
        ["sweep", "--workload", "echo", "--param", "batch=1,2", "--count", "5000000"],
        ["demo", "--count", "1000000"],
        ["netperf", "--path", "l1", "--duration", "10"],
        # A is over in milliseconds, B takes minutes: the stop lands in B
        "compare --workload echo --count 5000000 --a path=single --a count=20 --b path=l1".split(),
    ],
    ids=lambda args: args[0],
)
def test_ctrl_c_prints_what_was_measured_and_exits_130(args: list[str]) -> None:
    # the signal goes once the child says it is working: its progress bar,
    # shown after a second of work when stderr is a terminal (forced here),
    # for netperf once the bar has left the warm-up (1/100 measured); the
    # work is sized to last minutes, so no machine finishes it first
    env = {**os.environ, "TTY_COMPATIBLE": "1", "FORCE_COLOR": "1"}
    working = r"[1-9]\d*/100\b" if args[0] == "netperf" else f"xlio {args[0]}: "
    with running(spawn(xlio_args(*args), env=env)) as proc:
        seen = read_until(proc, working, timeout=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + err
    assert "Traceback" not in err
    assert "INTERRUPTED" in out


def test_progress_is_on_stderr_and_never_on_stdout() -> None:
    import os

    args = [sys.executable, "-m", "xlio", "sweep", "--workload", "echo",
            "--param", "batch=1,2", "--count", "4000"]  # fmt: skip
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    env = {**os.environ, "TTY_COMPATIBLE": "1", "FORCE_COLOR": "1"}  # as if a terminal
    shown = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert plain.returncode == shown.returncode == 0
    assert "xlio sweep: 6 points" in shown.stderr and "\x1b[" in shown.stderr
    assert shown.stdout == plain.stdout and "\x1b" not in shown.stdout
    assert plain.stderr == ""


# ---------------------------------------------------------------- serve
@needs_taps
def test_serve_says_ready_and_writes_interval_metrics() -> None:
    p = xlio("serve", "--path", "l0", "--duration", "2.5", "--interval", "1", timeout=60)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^xlio serve: ready: L2 guest [\d.]+ answers", p.stderr, re.M)
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and [x["t_s"] for x in lines] == pytest.approx([1, 2], abs=0.5)
    # the readiness ARP: one frame each way in the first interval, counted in the device
    first = lines[0]
    assert first["devices"]["l0-direct"]["tx_packets_count"] >= 1
    assert first["devices"]["l0-direct"]["rx_packets_count"] >= 1
    assert set(first) >= {"devices", "tap", "exits", "l0_exits", "modeled_us"}


def test_override_keeps_every_other_parameter() -> None:
    base = PRESETS["kvm-2019"]
    model = override(base, {"reflect": 1}, "test")
    changed = {k for k in base.params if base.params[k] != model.params[k]}
    assert changed == {"reflect"} and model.params["reflect"].kind == "user"
