"""Parameter ranges, --samples studies, xlio sensitivity and the one executor:
known Sobol indices, the Turtles ranking, identical results on every
executor (Dask included), an interrupted study resumed from its cache, and
every bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from children import running, spawn, xlio_args

from xlio.sim.costs import param_range
from xlio.sim.presets import PRESETS, costs_from_toml
from xlio.study import Dist, Study, Task, intervals, ranges


def xlio(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(xlio_args(*args), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- ranges and draws
def test_every_sample_lies_within_the_ranges_and_a_seed_repeats_its_draw() -> None:
    base = PRESETS["kvm-2019"]
    rs = ranges(base)
    assert "hw_exit" in rs and "clock_ghz" in rs and "guest_hz" not in rs  # published: fixed
    task = Task("vmexit", (2, ("cpuid",), None), (base,))
    for dist in Dist:
        s = Study(task, 64, 3, dist)
        seen: dict[str, list[float]] = {k: [] for k in rs}
        for t in s.tasks:
            (c,) = t.costs
            for k, r in rs.items():
                v = float(c.params[k].value)
                assert r.low - 0.5 <= v <= r.high + 0.5, (dist, k, v, r)  # whole cycles rounded
                seen[k].append(v)
            assert c.params["guest_hz"].value == base.params["guest_hz"].value
        # a Latin hypercube: every one of 64 strata of each range is drawn once
        for k, r in rs.items():
            if dist is Dist.UNIFORM and r.high - r.low > 1000:
                u = sorted((v - r.low) / (r.high - r.low) for v in seen[k])
                strata = [min(int(x * 64), 63) for x in u]
                assert len(set(strata)) >= 60, k  # rounding may merge a stratum or two
        again = Study(task, 64, 3, dist)
        assert [t.costs[0].params["hw_exit"].value for t in again.tasks] == [
            t.costs[0].params["hw_exit"].value for t in s.tasks
        ]


def test_ranges_in_a_costs_file_are_checked() -> None:
    good = costs_from_toml(
        'base = "kvm-2019"\n[params]\n"hw_exit" = {value = 900, low = 800, high = 1000, '
        'basis = "two published figures"}\n',
        "x.toml",
    )
    r = param_range(good.params["hw_exit"])
    assert r is not None and (r.low, r.high, r.basis) == (800, 1000, "two published figures")
    for bad, why in (
        ("value = 900, low = 1000, high = 800", "low 1000 > high 800"),
        ("value = 1200, low = 800, high = 1000", "outside its range"),
        ("value = 900, low = 800", "numbers low and high"),
        ("value = 900, spread = 3", "unknown keys"),
    ):
        with pytest.raises(ValueError, match=why):
            costs_from_toml(f'base = "kvm-2019"\n[params]\n"hw_exit" = {{{bad}}}\n', "x.toml")


def test_intervals_are_percentiles_of_the_runs_done() -> None:
    samples = [{"x": float(i)} for i in range(101)] + [None]
    iv = intervals({"x": 50.0}, samples)["x"]
    assert (iv["p05"], iv["p50"], iv["p95"]) == (5.0, 50.0, 95.0) and iv["value"] == 50.0


# ---------------------------------------------------------------- sensitivity
def _ishigami(X: np.ndarray, a: float = 7.0, b: float = 0.1) -> np.ndarray:
    return np.sin(X[:, 0]) + a * np.sin(X[:, 1]) ** 2 + b * X[:, 2] ** 4 * np.sin(X[:, 0])


def test_sobol_indices_of_the_ishigami_function_are_the_known_ones() -> None:
    from xlio.sensitivity import Problem, morris, sobol

    problem = Problem(("x1", "x2", "x3"), ((-math.pi, math.pi),) * 3)
    got = {r["parameter"]: r for r in sobol(problem, _ishigami, seed=1, n=4096)}
    # Ishigami and Homma (1990), a = 7, b = 0.1: analytic first-order and total indices
    known = {"x1": (0.3139, 0.5576), "x2": (0.4424, 0.4424), "x3": (0.0, 0.2437)}
    for k, (s1, st) in known.items():
        assert abs(got[k]["S1"] - s1) < 0.05 and abs(got[k]["ST"] - st) < 0.05, (k, got[k])
    # and Morris on a linear model: mu* is |coefficient| x range, the order with it
    lin = Problem(("a", "b", "c"), ((0, 1), (0, 2), (0, 1)))
    rows = morris(lin, lambda X: 3 * X[:, 0] - 1 * X[:, 1] + 0.5 * X[:, 2], seed=2)
    assert [r["parameter"] for r in rows] == ["a", "b", "c"]
    assert {r["parameter"]: round(r["mu_star"], 6) for r in rows} == {"a": 3, "b": 2, "c": 0.5}


def test_nested_cpuid_under_turtles_hinges_on_vmcs_emulation(tmp_path: Path) -> None:
    out = tmp_path / "tornado.png"
    p = xlio("sensitivity", "--figure", "cpuid", "--sobol-n", "64", "--plot", str(out), "--json",
             "--", "vmexit", "--preset", "turtles-2010", "--level", "2", "cpuid")  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    ranking = [r["parameter"] for r in doc["ranking"]]
    # Turtles: 11 of a nested CPUID's 13 exits are VMREAD/VMWRITE emulations
    assert ranking[0] == "vmcs_emulate_register", ranking[:5]
    assert {"reflect", "vmresume"} & set(ranking[:5])
    top = doc["ranking"][0]
    assert {"mu_star", "sigma", "S1", "ST", "at_low", "at_high"} <= set(top)
    assert top["at_low"] < doc["value"] < top["at_high"]
    # parameters the figure does not touch rank last with no effect
    assert doc["ranking"][-1]["mu_star"] == 0
    assert out.stat().st_size > 10_000


# ---------------------------------------------------------------- the executor
STUDY = ("vmexit", "--preset", "kvm-2019", "--level", "2", "cpuid", "vmcall", "--samples",
         "1000", "--seed", "7", "--json")  # fmt: skip


def test_a_study_is_byte_identical_on_every_executor() -> None:
    from dask.distributed import LocalCluster

    one = xlio(*STUDY, "--jobs", "1")
    two = xlio(*STUDY, "--jobs", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:  # fmt: skip
        dask = xlio(*STUDY, "--scheduler", cluster.scheduler_address)
    assert dask.returncode == 0, dask.stderr
    assert one.stdout == two.stdout == dask.stdout
    doc = json.loads(one.stdout)
    assert doc["schema_version"] == 2 and doc["study"]["done"] == 1000
    cpuid = doc["tests"]["cpuid"]
    assert set(cpuid) == {"value", "p05", "p50", "p95"} and cpuid["value"] == 13142
    assert cpuid["p05"] < cpuid["p50"] < cpuid["p95"]


def test_an_interrupted_study_resumes_from_its_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = spawn(xlio_args(*STUDY, "--cache", str(cache)))
    deadline = time.monotonic() + 60
    while len(list(cache.glob("*/*.json"))) < 200:
        assert proc.poll() is None, "the study ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    part = json.loads(out)  # the partial results, flushed
    assert part["study"]["interrupted"] and 200 <= part["study"]["done"] < 1000
    stored = len(list(cache.glob("*/*.json")))
    assert stored >= part["study"]["done"]
    again = xlio(*STUDY, "--cache", str(cache))
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["study"]["from_cache"] == stored and doc["study"]["done"] == 1000
    assert f"{stored:,} of 1,000 runs came from the cache" in again.stderr
    fresh = json.loads(xlio(*STUDY).stdout)
    assert doc["tests"] == fresh["tests"]  # the cache changes nothing but the time


# ---------------------------------------------------------------- bad input
def test_bad_study_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "lowhigh.toml").write_text(
        'base = "kvm-2019"\n[params]\n"hw_exit" = {value = 900, low = 1000, high = 800}\n'
    )
    (tmp_path / "outside.toml").write_text(
        'base = "kvm-2019"\n[params]\n"hw_exit" = {value = 2000, low = 800, high = 1000}\n'
    )
    cases = [
        ("vmexit", "cpuid", "--samples", "0"),
        ("vmexit", "cpuid", "--samples", "-5"),
        ("vmexit", "cpuid", "--costs", str(tmp_path / "lowhigh.toml"), "--samples", "10"),
        ("vmexit", "cpuid", "--costs", str(tmp_path / "outside.toml"), "--samples", "10"),
        ("sensitivity", "--figure", "nope", "--", "vmexit", "cpuid"),
        ("sensitivity", "--", "frobnicate"),
        ("sensitivity", "--", "vmexit", "cpuid", "--samples", "5"),
        ("vmexit", "cpuid", "--samples", "10", "--cache", "/proc/xlio-cache"),
        ("vmexit", "cpuid", "--samples", "10", "--scheduler", "not an address"),
        ("compare", "a.json", "b.json", "--samples", "10"),
    ]
    for args in cases:
        p = xlio(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (args, p.stderr)
        assert lines[0].startswith(f"xlio {args[0]}: error: "), (args, lines)
    huge = xlio("vmexit", "cpuid", "--samples", str(10**12))
    assert huge.returncode == 2 and "would take about" in huge.stderr
    assert "years" in huge.stderr or "days" in huge.stderr, huge.stderr
    t = time.monotonic()
    gone = xlio("vmexit", "cpuid", "--samples", "10", "--scheduler", "tcp://127.0.0.1:9")
    assert gone.returncode == 2 and "cannot reach" in gone.stderr, gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 20


def test_without_the_dask_extra_scheduler_is_one_line(tmp_path: Path) -> None:
    # a Python that cannot import dask: a one-line error naming the extra
    code = (
        "import sys; sys.modules['dask'] = None; sys.modules['dask.distributed'] = None\n"
        "from xlio.cli import main\n"
        "sys.exit(main(['vmexit', 'cpuid', '--samples', '5', '--scheduler', 'tcp://x:1']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "xlio[dask]" in p.stderr and len(p.stderr.splitlines()) == 1


def test_a_killed_study_leaves_no_worker_behind() -> None:
    """Local workers die with their parent and hold none of its pipes: a
    reader of a study killed outright gets its EOF at once, and nothing
    computes on (each sample here is about 12 s of work, so a worker that
    outlived its parent would still be running)."""
    args = ("netperf", "--path", "l1", "--duration", "10", "--samples", "4", "--jobs", "2")
    children: list[int] = []
    try:
        with running(spawn(xlio_args(*args, "--json"))) as proc:
            deadline = time.monotonic() + 60
            while len(children) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
                time.sleep(0.2)
                children = [
                    int(p) for p in os.listdir("/proc")
                    if p.isdigit() and _parent(int(p)) == proc.pid
                ]  # fmt: skip
            time.sleep(0.5)  # the workers are inside their first sample
            proc.kill()
            proc.communicate(timeout=5)  # EOF on its pipes: no worker holds them
        deadline = time.monotonic() + 5
        while [c for c in children if _state(c) not in ("", "Z")]:
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.1)
    finally:
        for c in children:
            with contextlib.suppress(OSError):
                os.kill(c, signal.SIGKILL)


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _state(pid: int) -> str:
    """'' for a process that is gone, else its state letter (Z: dead, not yet reaped)."""
    fields = _stat(pid)
    return fields[0] if fields else ""
