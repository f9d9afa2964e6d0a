"""``xlio profile``: a program's paging, scheduling, timer and block events per CPU second.

Theory of operation
-------------------
:func:`profile` runs a command natively, here, and reads real counters
around it: ``getrusage(RUSAGE_CHILDREN)`` deltas (minor and major faults,
voluntary and involuntary context switches, user and system time), deltas
of ``/proc/stat`` (processes forked, busy CPU time), ``/proc/interrupts``
(local timer interrupts), ``/proc/diskstats`` (requests completed) and
``/proc/vmstat``, and, when ``perf`` works here, ``perf stat`` software
events and tracepoints of the command's own process tree (the command runs
as perf's child). Each rate says which source it came from. The figures no
counter gives (CR3 loads, INVLPGs, page-table writes outside faults) are
derived by the rules in :data:`RULES`, each with its source. Everything is
divided by the command's CPU seconds (user + system of its tree), so a rate
is "per second of the program's own CPU work", which is what virtualization
stretches.

The result is a small TOML document (:func:`to_toml`) that
:mod:`xlio.estimate` reads back with :func:`load` (which refuses anything
malformed with :class:`ProfileError`).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any

#: The rates every profile has, per second of the program's CPU time.
RATES = (
    "minor_faults", "major_faults", "context_switches", "forks", "execs", "syscalls",
    "tlb_flushes", "timer_ticks", "block_requests", "cr3_loads", "invlpgs", "pte_writes",
    "first_touches",
)  # fmt: skip

#: perf stat events (software events and tracepoints), in the order read back;
#: the second tlb:tlb_flush is filtered to the flushes that are not a task switch.
PERF_EVENTS = (
    ("minor_faults", ["-e", "minor-faults"]),
    ("major_faults", ["-e", "major-faults"]),
    ("context_switches", ["-e", "context-switches"]),
    ("syscalls", ["-e", "raw_syscalls:sys_enter"]),
    ("forks", ["-e", "sched:sched_process_fork"]),
    ("execs", ["-e", "sched:sched_process_exec"]),
    ("tlb_flushes", ["-e", "tlb:tlb_flush"]),
    ("tlb_flushes_not_switch", ["-e", "tlb:tlb_flush", "--filter", "reason != 0"]),
)

#: PTEs a fork write-protects in the parent (copy_page_range makes the
#: parent's private writable pages copy-on-write): a make or shell parent of
#: about 4 MiB of private memory. Estimate.
FORK_PARENT_PTES = 1_000

#: How each derived rate follows from the counted ones, and why.
RULES = {
    "cr3_loads": "context_switches: each switch to another process loads CR3 "
    "(context_switch -> switch_mm_irqs_off); a switch to a kernel thread keeps the "
    "mm (lazy TLB), so this counts an upper bound",
    "invlpgs": "tlb:tlb_flush events that are not task switches (reason != 0: "
    "munmap, mprotect, COW breaks, remote shootdowns), one INVLPG each "
    "(flush_tlb_mm_range flushes up to tlb_single_page_flush_ceiling = 33 pages one by "
    "one): a lower bound; without perf, 0",
    "pte_writes": f"minor_faults (each PTE a fault filled is cleared again by zap_pte_range at "
    f"munmap, exit or exec) + forks x {FORK_PARENT_PTES:,} (copy_page_range write-protecting "
    "a parent of about 4 MiB of private memory, an estimate)",
    "execs": "without perf: forks (make and the compiler driver fork, then exec)",
    "first_touches": "the fall of /proc/meminfo MemFree over the run, in 4 KiB pages "
    "(system-wide): memory the program's run newly used (its page cache and anonymous "
    "memory), which a freshly booted guest touches for the first time",
    "timer_ticks": "LOC interrupts of /proc/interrupts over the busy CPU time of "
    "/proc/stat during the run (a CPU that runs takes its tick; NOHZ idle CPUs do not)",
}


class ProfileError(Exception):
    """A profile that cannot be read or used: one line for the user."""


class CommandFailed(Exception):
    """The profiled command could not run or exited non-zero."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Profile:
    """A program's event rates per CPU second, with where each came from."""

    rates: dict[str, float]
    run: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "provenance": self.provenance,
            "run": self.run,
            "rates": self.rates,
            "sources": self.sources,
        }


# ---------------------------------------------------------------- counters
def _proc_stat() -> tuple[int, float]:
    """(processes forked since boot, busy CPU seconds of all CPUs)."""
    procs, busy = 0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
            elif line.startswith("processes "):
                procs = int(line.split()[1])
    return procs, busy


def _local_timer_interrupts() -> int:
    with open("/proc/interrupts") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "LOC:":
                return sum(int(x) for x in parts[1:] if x.isdigit())
    return 0


def _disk_requests() -> int:
    """Reads plus writes completed by whole disks (no partitions, no loop or ram)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if len(p) < 8:
                continue
            name = p[2]
            if name.startswith(("loop", "ram", "dm-", "sr")):
                continue
            if os.path.exists(f"/sys/block/{name}"):
                total += int(p[3]) + int(p[7])
    return total


def _vmstat() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, _, v = line.partition(" ")
            if k in ("pgfault", "pgmajfault") or k.startswith("nr_tlb"):
                out[k] = int(v)
    return out


def _mem_free_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1])
    return 0


def _snapshot() -> dict[str, Any]:
    procs, busy = _proc_stat()
    return {
        "t": time.monotonic(), "rusage": resource.getrusage(resource.RUSAGE_CHILDREN),
        "procs": procs, "busy": busy, "loc": _local_timer_interrupts(),
        "disk": _disk_requests(), "vmstat": _vmstat(), "free_kib": _mem_free_kib(),
    }  # fmt: skip


def perf_works(perf: str | None = None) -> bool:
    """Whether ``perf stat`` can count the software events and tracepoints here."""
    perf = perf or shutil.which("perf")
    if perf is None:
        return False
    try:
        r = subprocess.run(
            [perf, "stat", "-x", ",", "-e", "minor-faults", "-e", "sched:sched_process_exec",
             "--", "true"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    lines = [line for line in r.stderr.splitlines() if line and not line.startswith("#")]
    return r.returncode == 0 and len(lines) >= 2 and all(line[0].isdigit() for line in lines[:2])


def _read_perf(path: str) -> dict[str, int]:
    values: list[int | None] = []
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            v = line.split(",", 1)[0]
            values.append(int(v) if v.isdigit() else None)
    out: dict[str, int] = {}
    for (name, _), count in zip(PERF_EVENTS, values, strict=False):
        if count is not None:
            out[name] = count
    return out


# ---------------------------------------------------------------- the run
def profile(cmd: list[str], *, use_perf: bool | None = None) -> Profile:
    """Run ``cmd`` natively and return its profile; raises CommandFailed."""
    if not cmd:
        raise CommandFailed("no command given (xlio profile -- CMD ARGS...)", 2)
    exe = shutil.which(cmd[0])
    if exe is None:
        raise CommandFailed(f"command not found: {cmd[0]}", 2)
    perf = shutil.which("perf")
    if use_perf is None:
        use_perf = perf_works(perf)
    with tempfile.TemporaryDirectory(prefix="xlio-profile-") as tmp:
        out = os.path.join(tmp, "perf.csv")
        argv = list(cmd)
        if use_perf and perf is not None:
            argv = [perf, "stat", "-x", ",", "-o", out]
            for _, ev in PERF_EVENTS:
                argv += ev
            argv += ["--", *cmd]
        before = _snapshot()
        try:
            status = subprocess.run(argv).returncode
        except OSError as e:
            raise CommandFailed(f"cannot run {cmd[0]}: {e.strerror}", 2) from None
        after = _snapshot()
        if status != 0:
            raise CommandFailed(f"{' '.join(cmd)} exited with status {status}", status)
        counted = _read_perf(out) if use_perf and os.path.exists(out) else {}
    return _rates(cmd, before, after, counted, bool(counted))


def _rates(
    cmd: list[str], b: dict[str, Any], a: dict[str, Any], perf: dict[str, int], used_perf: bool
) -> Profile:
    ra, rb = a["rusage"], b["rusage"]
    user = ra.ru_utime - rb.ru_utime
    system = ra.ru_stime - rb.ru_stime
    cpu = user + system
    wall = a["t"] - b["t"]
    if cpu <= 0:
        raise CommandFailed(f"{' '.join(cmd)} used no measurable CPU time", 2)
    counts: dict[str, float] = {}
    src: dict[str, str] = {}

    def take(name: str, perf_name: str | None, fallback: float, fallback_src: str) -> None:
        if perf_name is not None and perf_name in perf:
            counts[name] = perf[perf_name]
            src[name] = f"perf stat {dict(PERF_EVENTS)[perf_name][1]} (the command's tree)"
        else:
            counts[name] = fallback
            src[name] = fallback_src

    ru = "getrusage(RUSAGE_CHILDREN) delta"
    take("minor_faults", "minor_faults", ra.ru_minflt - rb.ru_minflt, f"{ru}: ru_minflt")
    take("major_faults", "major_faults", ra.ru_majflt - rb.ru_majflt, f"{ru}: ru_majflt")
    switches = (ra.ru_nvcsw - rb.ru_nvcsw) + (ra.ru_nivcsw - rb.ru_nivcsw)
    take("context_switches", "context_switches", switches, f"{ru}: ru_nvcsw + ru_nivcsw")
    take("forks", "forks", a["procs"] - b["procs"], "/proc/stat processes delta (system-wide)")
    take("execs", "execs", counts["forks"], "derived: " + RULES["execs"])
    take("syscalls", "syscalls", 0, "unavailable without perf (raw_syscalls:sys_enter)")
    tlb_vm = sum(
        a["vmstat"].get(k, 0) - b["vmstat"].get(k, 0) for k in a["vmstat"] if k.startswith("nr_tlb")
    )
    take(
        "tlb_flushes",
        "tlb_flushes",
        tlb_vm,
        "/proc/vmstat nr_tlb_* delta (0 without CONFIG_DEBUG_TLBFLUSH)",
    )
    busy = a["busy"] - b["busy"]
    loc = a["loc"] - b["loc"]
    counts["timer_ticks"] = loc / busy * cpu if busy > 0 else 0.0
    src["timer_ticks"] = "/proc/interrupts LOC delta, derived: " + RULES["timer_ticks"]
    counts["block_requests"] = a["disk"] - b["disk"]
    src["block_requests"] = "/proc/diskstats reads + writes completed delta (system-wide)"
    counts["cr3_loads"] = counts["context_switches"]
    src["cr3_loads"] = "derived: " + RULES["cr3_loads"]
    counts["invlpgs"] = perf.get("tlb_flushes_not_switch", 0)
    src["invlpgs"] = "derived: " + RULES["invlpgs"]
    counts["pte_writes"] = counts["minor_faults"] + counts["forks"] * FORK_PARENT_PTES
    src["pte_writes"] = "derived: " + RULES["pte_writes"]
    counts["first_touches"] = max(0, b["free_kib"] - a["free_kib"]) / 4
    src["first_touches"] = "derived: " + RULES["first_touches"]
    rates = {k: counts[k] / cpu for k in RATES}
    prov = {
        "command": " ".join(cmd), "kernel": platform.release(), "cpu": _cpu_model(),
        "cpus": os.cpu_count() or 1, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counters": "perf stat, getrusage, /proc" if used_perf else "getrusage, /proc (no perf)",
        "python": platform.python_version(),
    }  # fmt: skip
    run = {"cpu_seconds": cpu, "user_seconds": user, "system_seconds": system,
           "wall_seconds": wall}  # fmt: skip
    return Profile(rates=rates, run=run, provenance=prov, sources=src)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


# ---------------------------------------------------------------- the file
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(round(v, 6))
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(p: Profile) -> str:
    """The profile as TOML: [provenance], [run], [rates], [sources]."""
    out = ["# xlio profile: event rates per second of the program's CPU time"]
    for name, table in (("provenance", p.provenance), ("run", p.run), ("rates", p.rates),
                        ("sources", p.sources)):  # fmt: skip
        out.append(f"\n[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(out) + "\n"


def load(path: str) -> Profile:
    """A profile file read back and checked; raises ProfileError (one line)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError(f"no profile {path}") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"profile {path} is not valid TOML: {e}") from None
    return from_dict(doc, path)


def from_dict(doc: dict[str, Any], where: str) -> Profile:
    unknown = sorted(set(doc) - {"provenance", "run", "rates", "sources"})
    if unknown:
        raise ProfileError(f"profile {where}: unknown table {unknown[0]!r}")
    for table in ("rates", "run"):
        if not isinstance(doc.get(table), dict):
            raise ProfileError(f"profile {where}: no [{table}] table")
    rates_in = doc["rates"]
    bad = sorted(set(rates_in) - set(RATES))
    if bad:
        raise ProfileError(f"profile {where}: unknown rate {bad[0]!r} (rates: {', '.join(RATES)})")
    missing = [k for k in RATES if k not in rates_in]
    if missing:
        raise ProfileError(f"profile {where}: rate {missing[0]!r} missing")
    rates = {k: _number(where, "rates", k, rates_in[k]) for k in RATES}
    run_in = doc["run"]
    for k in ("cpu_seconds", "wall_seconds"):
        if k not in run_in:
            raise ProfileError(f"profile {where}: [run] needs {k}")
    run = {k: _number(where, "run", k, v) for k, v in run_in.items()}
    if run["cpu_seconds"] <= 0:
        raise ProfileError(f"profile {where}: cpu_seconds must be positive")
    prov = doc.get("provenance", {})
    sources = doc.get("sources", {})
    if not isinstance(prov, dict) or not isinstance(sources, dict):
        raise ProfileError(f"profile {where}: [provenance] and [sources] must be tables")
    return Profile(rates=rates, run=run, provenance=prov, sources=sources)


def _number(where: str, table: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProfileError(f"profile {where}: [{table}] {key} = {v!r} is not a number")
    if v < 0:
        raise ProfileError(f"profile {where}: [{table}] {key} = {v!r} is negative")
    return float(v)
