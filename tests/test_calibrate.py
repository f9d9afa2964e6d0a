"""``xlio calibrate``: the round trip through the model's own vmexit output,
noise, held-out tests, the preset it writes, and every bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from xlio.calibrate import (
    CalibrationError,
    calibrate,
    determined_by,
    free_parameters,
    parse_vmexit,
    with_values,
)
from xlio.sim.presets import PRESETS
from xlio.sim.vmexit import format_lines, run

BASE = PRESETS["kvm-2019"]


def xlio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xlio", *args], capture_output=True, text=True, timeout=120
    )


def perturbed(seed: int) -> tuple[dict[str, float], dict[int, str]]:
    """The calibratable parameters of kvm-2019 moved by 0.5x-2x, and the
    vmexit output of both levels under them."""
    rng = random.Random(seed)
    truth = {k: float(BASE.params[k].value) * rng.uniform(0.5, 2) for k in free_parameters(BASE)}
    model = with_values(BASE, truth, "perturbed")
    return truth, {lv: format_lines(run(model, lv)) for lv in (1, 2)}


def _runs(texts: dict[int, str]) -> dict:
    return {lv: parse_vmexit(t, lv, f"l{lv}") for lv, t in texts.items()}


def _combo_truth(p: dict, truth: dict[str, float]) -> float:
    c = p["combination"]
    return sum(w * truth[m] for m, w in zip(c["members"], c["weights"], strict=True))


@pytest.mark.parametrize("seed", [1, 2])
def test_round_trip_recovers_what_it_calls_fitted_and_every_combination(seed: int) -> None:
    truth, texts = perturbed(seed)
    r = calibrate(BASE, _runs(texts))
    statuses = {k: p["status"] for k, p in r["parameters"].items()}
    for k, p in r["parameters"].items():
        if p["status"] == "fitted":
            assert p["value"] == pytest.approx(truth[k], rel=0.02), k
        elif p["status"] == "combination":
            assert p["combination"]["value"] == pytest.approx(_combo_truth(p, truth), rel=0.02), k
    for row in r["residuals"]:
        assert abs(row["residual_pct"]) < 1, row
    # not identified: exactly the calibratable parameters no test's cycles depend on
    names = free_parameters(BASE)
    nobody = sorted(k for k, t in determined_by(BASE, names).items() if t is None)
    not_identified = sorted(k for k, s in statuses.items() if s == "not identified")
    assert set(nobody) <= set(not_identified)
    for k in set(not_identified) - set(nobody):  # some test has it, just not these inputs
        assert "would determine it" in r["parameters"][k]["source"]
    assert statuses["hw_exit"] == "combination"  # it enters every row with a handler
    assert statuses["clock_ghz"] == "fixed" and statuses["l1_pollution"] == "fixed"


def test_round_trip_with_noise_stays_within_ten_percent() -> None:
    truth, texts = perturbed(3)
    rng = random.Random(7)
    noisy = {}
    for lv, t in texts.items():
        lines = []
        for line in t.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                line = f"{parts[0]} {round(int(parts[1]) * rng.uniform(0.97, 1.03))}"
            lines.append(line)
        noisy[lv] = "\n".join(lines)
    r = calibrate(BASE, _runs(noisy))
    for k, p in r["parameters"].items():
        if p["status"] == "fitted":
            assert p["value"] == pytest.approx(truth[k], rel=0.10), k
        elif p["status"] == "combination":
            assert p["combination"]["value"] == pytest.approx(_combo_truth(p, truth), rel=0.10)


def test_held_out_rows_are_predicted_not_fitted(tmp_path: Path) -> None:
    _, texts = perturbed(1)
    runs = _runs(texts)
    r = calibrate(BASE, runs, hold_out=["vmcall", "pci-io"])
    held = [row for row in r["residuals"] if not row["used"]]
    assert {row["test"] for row in held} == {"vmcall", "pci-io"}
    # only the three published 2019 rows: the rest is predicted
    three = {1: "cpuid 1060\nvmcall 1529\n", 2: "cpuid 13142\n"}
    r = calibrate(BASE, _runs(three))
    assert {(p["test"], p["level"]) for p in r["predictions"]} >= {("pci-io", 2), ("vmcall", 2)}
    assert all(abs(row["residual_pct"]) < 0.5 for row in r["residuals"])


def test_the_written_preset_is_a_costs_file_every_command_takes(tmp_path: Path) -> None:
    _, texts = perturbed(2)
    for lv, t in texts.items():
        (tmp_path / f"l{lv}.txt").write_text("QEMU ... -append cpuid\nenabling apic\n" + t)
    out = tmp_path / "mine.toml"
    p = xlio("calibrate", "--vmexit", f"l1={tmp_path / 'l1.txt'}", "--vmexit",
             f"l2={tmp_path / 'l2.txt'}", "-o", str(out), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert {"parameters", "residuals"} <= set(doc)
    assert {"value", "stderr", "status", "source"} <= set(doc["parameters"]["hw_exit"])
    v = xlio("vmexit", "--costs", str(out), "--level", "2", "cpuid", "--json")
    assert v.returncode == 0, v.stderr
    fitted = next(r["fitted"] for r in doc["residuals"] if r["test"] == "cpuid" and r["level"] == 2)
    assert json.loads(v.stdout)["tests"]["cpuid"] == pytest.approx(fitted, abs=1)
    assert "calibrated: fitted to" in out.read_text()
    # and beside a built-in preset in xlio compare
    c = xlio("compare", "--workload", "cpuid", "--count", "100", "--a", "preset=kvm-2019",
             "--b", f"costs={out}", "--json")  # fmt: skip
    assert c.returncode == 0, c.stderr
    rows = {r["figure"]: r for r in json.loads(c.stdout)["rows"]}
    assert rows["cycles per op"]["b"] == pytest.approx(fitted, rel=0.01)
    bad = xlio("compare", "--workload", "cpuid", "--b", f"costs={tmp_path / 'none.toml'}")
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_bad_input_is_one_line_and_nothing_is_half_written(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("cpuid 1060\nvmcall 1529\n")
    files = {
        "empty": b"",
        "binary": b"\x00\x01cpuid 12\x00",
        "none": b"enabling apic\npaging enabled\n",
        "negative": b"cpuid -1060\n",
        "text": b"cpuid lots\n",
        "clock1": b"qemu -cpu host,tsc-frequency=2100000000\ncpuid 1060\n",
        "clock2": b"qemu -cpu host,tsc-frequency=2600000000\ncpuid 1100\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out.toml"
    cases = [
        ["--vmexit", f"l1={tmp_path / 'empty'}"],
        ["--vmexit", f"l1={tmp_path / 'binary'}"],
        ["--vmexit", f"l1={tmp_path / 'none'}"],
        ["--vmexit", f"l1={tmp_path / 'negative'}"],
        ["--vmexit", f"l1={tmp_path / 'text'}"],
        ["--vmexit", f"l3={good}"],
        ["--vmexit", f"l1={tmp_path / 'clock1'}", "--vmexit", f"l1={tmp_path / 'clock2'}"],
        ["--vmexit", f"l1={good}", "--hold-out", "ipi"],
        ["--vmexit", f"l1={tmp_path / 'missing'}"],
        ["--vmexit", f"l1={good}", "--base", "nehalem-1999"],
        ["--vmexit", f"l1={good}", "-o", str(tmp_path / "no" / "such" / "dir.toml")],
        ["--vmexit", "l1"],
    ]
    for args in cases:
        p = (
            xlio("calibrate", *args, "-o", str(out))
            if "-o" not in args
            else xlio("calibrate", *args)
        )
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xlio calibrate: error: "), (args, lines)
        assert not out.exists(), args
    impossible = tmp_path / "fast.txt"
    impossible.write_text("cpuid 100\n")
    p = xlio("calibrate", "--vmexit", f"l1={impossible}", "-o", str(out))
    assert p.returncode == 1 and "best point reached" in p.stderr and not out.exists()
    only_unknown = parse_vmexit("enabling apic\nnew_test 1234\n", 1, "x")
    assert only_unknown.unknown == ["new_test"]  # listed, not fatal...
    with pytest.raises(CalibrationError):  # ...but nothing to fit
        calibrate(BASE, {1: only_unknown})


# ---------------------------------------------------------------- perf kvm stat
PERF_WORKLOADS = ("cpuid", "io-user", "timer-tick")


def _perturbed_toml(truth: dict[str, float], path: Path) -> Path:
    lines = ['base = "kvm-2019"', "[params]"]
    for k, v in truth.items():
        value = round(v) if isinstance(BASE.params[k].value, int) else v
        lines.append(f'"{k}" = {{ value = {value}, source = "perturbed" }}')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_xlio_measure_tables_fed_back_recover_what_they_determine() -> None:
    """xlio measure's own table (3 decimals, the exit's round trip included):
    each row is hw_exit plus L0's work for the reason; with the vmexit rows
    every combination comes back within 2%."""
    from xlio.measure import measure
    from xlio.perf_kvm import Form, parse_perf_kvm_stat
    from xlio.report import format_measure

    truth, texts = perturbed(4)
    model = with_values(BASE, truth, "perturbed")
    perf = []
    for w in PERF_WORKLOADS:
        for lv, path in ((1, "single"), (2, "l1")):
            text = format_measure(measure(w, path, model, count=50))
            rep = parse_perf_kvm_stat(text, lv, f"{w}-{path}", BASE.clock_ghz)
            assert rep.form is Form.XLIO and rep.workload == w and rep.path == path
            perf.append(rep)
    r = calibrate(BASE, _runs(texts), perf=perf)
    perf_rows = [row for row in r["residuals"] if row["input"] == "perf kvm stat"]
    assert len(perf_rows) >= 8 and all(row["used"] for row in perf_rows)
    assert any(row["test"] == "perf VMRESUME from L1 (cpuid)" for row in perf_rows)
    for row in r["residuals"]:
        assert abs(row["residual_pct"]) < 1, row
    for k, p in r["parameters"].items():
        if p["status"] == "combination":
            assert p["combination"]["value"] == pytest.approx(_combo_truth(p, truth), rel=0.02), k
        elif p["status"] == "fitted":
            assert p["value"] == pytest.approx(truth[k], rel=0.02), k


def test_perf_kvm_stat_reports_separate_the_exit_from_its_handler(tmp_path: Path) -> None:
    """`xlio measure --perf-kvm-stat` under a perturbed preset prints L0's
    time without the hardware round trip (perf's kvm_exit to kvm_entry), to
    0.01 us as perf does: fed back with the vmexit logs, hw_exit and the
    handlers those rows isolate are fitted, each within 2% or, where perf's
    rounding is larger, within two of its standard errors."""
    truth, texts = perturbed(5)
    costs = _perturbed_toml(truth, tmp_path / "perturbed.toml")
    args = []
    for lv, t in texts.items():
        (tmp_path / f"l{lv}.log").write_text(t)
        args += ["--vmexit", f"l{lv}={tmp_path / f'l{lv}.log'}"]
    for w in PERF_WORKLOADS:
        for lv, path in ((1, "single"), (2, "l1")):
            p = xlio("measure", "--workload", w, "--path", path, "--count", "50", "--costs",
                     str(costs), "--perf-kvm-stat")  # fmt: skip
            assert p.returncode == 0, p.stderr
            assert "Analyze events for all VMs, all VCPUs:" in p.stdout
            assert "Total Samples:" in p.stdout
            (tmp_path / f"{w}-{lv}.txt").write_text(p.stdout)
            args += ["--perf-kvm-stat", f"l{lv}={tmp_path / f'{w}-{lv}.txt'}"]
    p = xlio("calibrate", *args, "--json")
    assert p.returncode == 0, p.stderr
    params = json.loads(p.stdout)["parameters"]
    fitted = {k for k, v in params.items() if v["status"] == "fitted"}
    assert {"hw_exit", "handler.io_user"} <= fitted  # vmexit alone leaves both in combinations
    for k in fitted:
        v = params[k]
        assert abs(v["value"] - truth[k]) <= max(0.02 * truth[k], 2 * v["stderr"]), k
    for k, v in params.items():
        if v["status"] == "combination":
            c = v["combination"]
            t = sum(w * truth[m] for m, w in zip(c["members"], c["weights"], strict=True))
            assert abs(c["value"] - t) <= max(0.02 * t, 2 * c["stderr"]), k


def test_perf_kvm_stat_as_perf_prints_it_is_matched_to_the_models_workloads() -> None:
    """perf's own report (no xlio header: the workload is not known): each
    reason is matched to the first of the model's workloads that exits with
    it, and its average is L0's work alone."""
    from xlio.calibrate import perf_rows
    from xlio.perf_kvm import Form, parse_perf_kvm_stat

    # perf's own widths (builtin-kvm.c, print_result): rows wider than 100 columns
    text = (
        "\nAnalyze events for all VMs, all VCPUs:\n\n"
        "             VM-EXIT    Samples  Samples%     Time%    Min Time    Max Time"
        "         Avg time \n\n"
        "            VMRESUME      20000    50.00%    45.10%      1.90us     20.00us"
        "      1.99us ( +-   0.10% )\n"
        "               CPUID      20000    50.00%    54.90%      2.30us     30.10us"
        "      2.41us ( +-   0.20% )\n"
        "      NO_SUCH_REASON         10     0.00%     0.00%      0.50us      0.50us"
        "      0.50us ( +-   0.00% )\n"
        "\nTotal Samples:40010, Total events handled time:88000.00us.\n"
    )
    rep = parse_perf_kvm_stat(text, 2, "perf.txt", 2.3)
    assert rep.form is Form.PERF and rep.workload is None and rep.unknown == ["NO_SUCH_REASON"]
    assert {r.reason for r in rep.rows} == {"VMRESUME", "CPUID"}
    cpuid = next(r for r in rep.rows if r.reason == "CPUID")
    assert cpuid.avg_cycles == pytest.approx(2.41 * 2300) and cpuid.resolution == pytest.approx(
        0.005 * 2300
    )
    rows, missing = perf_rows(rep, BASE)
    assert missing == ["NO_SUCH_REASON"]
    by = {row.test: row for row, _, _ in rows}
    assert by["CPUID"].spec is not None and by["CPUID"].spec.workload == "cpuid"
    assert by["CPUID"].spec.path == "l1" and by["CPUID"].l0_only
    from xlio.calibrate import model_cycles

    # kvm-2019's reflection of a CPUID, without the round trip: 6,456 - 910
    assert model_cycles(BASE, [by["CPUID"]])[0] == pytest.approx(6456 - 910, abs=1)


def test_bad_perf_kvm_stat_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xlio.cli import main

    good = tmp_path / "good.txt"
    good.write_text("cpuid 1060\nvmcall 1529\n")
    row = (
        "               CPUID        100   100.00%   100.00%      0.07us      0.07us      0.07us\n"
    )
    xrow = (
        "L2      CPUID                 100    100.00%   100.00%    0.461    0.461"
        "    0.461    0.461\n"
    )
    head = (
        "xlio measure: cpuid on path single, preset kvm-2019, 100 ops (steady state)\n"
        "  model: shadow_vmcs=True vmcs_exits=True operand=register cache_reg=extended "
        "dirty_tracking=True apicv=True virtual_idle=False clock=2.3 GHz\n"
    )
    files = {
        "empty": b"",
        "binary": b"\x00\x01CPUID\x00",
        "none": b"Analyze events for all VMs, all VCPUs:\n\nTotal Samples:0\n",
        "twice": (row + row).encode(),
        "mixed": (row + xrow).encode(),
        "headless": xrow.encode(),
        "latin1": b"CPUID \xff\xfe\n",
        "wrongpath": (head + xrow).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [[f"l1={tmp_path / n}"] for n in files if n != "wrongpath"]
    cases += [[f"l2={tmp_path / 'wrongpath'}"], [f"l3={tmp_path / 'twice'}"],
              [f"l1={tmp_path / 'missing'}"]]  # fmt: skip
    for case in cases:
        code = main(["calibrate", "--vmexit", f"l1={good}", "--perf-kvm-stat", *case])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xlio calibrate: error: "), (case, lines)
    # the header's own run is used: path single is level 1
    (tmp_path / "ok").write_text(head + xrow)
    assert main(["calibrate", "--vmexit", f"l1={good}", "--perf-kvm-stat",
                 f"l1={tmp_path / 'ok'}"]) == 0  # fmt: skip
    assert "perf CPUID from L2 (cpuid)" in capsys.readouterr().out
