"""Reading ``perf kvm stat report`` text: the exit mix and L0's time per exit reason.

Theory of operation
-------------------
Two forms of the same table are read (REFERENCE section 10):

* :attr:`Form.PERF`: ``perf kvm stat report`` itself (tools/perf/builtin-kvm.c):
  ``Analyze events for all VMs, all VCPUs:``, a ``VM-EXIT Samples Samples%
  Time% Min Time Max Time Avg time`` header, one row per exit reason with
  times in microseconds (``1.17us ( +-   0.30% )``) and a ``Total
  Samples:`` footer. perf times an exit from the ``kvm_exit`` tracepoint to
  the next ``kvm_entry``: L0's software handling, without the hardware's
  exit and entry. Run at L0 while the workload runs in L2, it merges the
  exits of L2 and of L1 of one reason into one row (both are exits of L1's
  vCPU threads).
* :attr:`Form.XLIO`: what ``xlio measure`` prints, the same columns with a
  ``Level`` column in front (the level that exited) and a header naming the
  workload, path, switches, workload options and clock. Its times include
  the exit's hardware round trip (``sim/accounting.py``). ``xlio measure
  --perf-kvm-stat`` prints perf's own form under the same header.

:func:`parse_perf_kvm_stat` turns either into a :class:`PerfReport`: one
:class:`PerfRow` per (exiting level, reason), its samples and its average
in cycles (microseconds times the clock: the report's own for the xlio form,
the machine's for perf's). Lines around the table (perf's header and footer,
xlio's per-op summary) are skipped; a file with no row is an error.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from xlio.sim.vmx import ExitReason


class InputError(ValueError):
    """A measurement file that cannot be read: one line, exit status 2."""


class Form(enum.Enum):
    PERF = "perf kvm stat report"  # L0's time from kvm_exit to kvm_entry
    XLIO = "xlio measure"  # the exit's round trip plus L0's work, by exiting level


@dataclass(frozen=True)
class PerfRow:
    exit_level: int | None  # the level that exited (xlio form); None: merged (perf)
    reason: str
    samples: int
    avg_cycles: float
    resolution: float = 0.0  # half the last printed digit, in cycles: the rounding error


@dataclass
class PerfReport:
    """One report: its rows, and (xlio form) the run that produced it."""

    level: int  # where the workload ran: 1 a plain VM of L0, 2 a nested guest
    form: Form
    source: str
    rows: list[PerfRow] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # reasons the model does not have
    workload: str | None = None
    path: str | None = None
    count: int | None = None
    switches: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    clock_ghz: float | None = None


_NUM = r"(\d+(?:\.\d+)?)"
_PERF_ROW = re.compile(
    rf"^\s*(?P<reason>[A-Za-z][\w:/ -]*?)\s+(?P<samples>\d+)\s+{_NUM}%\s+{_NUM}%\s+"
    rf"(?P<min>{_NUM})us\s+(?P<max>{_NUM})us\s+(?P<avg>{_NUM})us(?:\s*\(\s*\+-\s*{_NUM}%\s*\))?\s*$"
)
_XLIO_ROW = re.compile(
    rf"^(?P<level>L[0-2])\s+(?P<reason>[A-Z][A-Z0-9_]*)\s+(?P<samples>[\d,]+)\s+{_NUM}%\s+"
    rf"{_NUM}%\s+(?P<min>{_NUM})\s+(?P<max>{_NUM})\s+(?P<avg>{_NUM})\s+{_NUM}\s*$"
)
_XLIO_HEAD = re.compile(
    r"^xlio \w+: (?P<workload>[\w-]+) on path (?P<path>\w+), preset \S+, (?P<count>[\d,]+) "
)
_XLIO_MODEL = re.compile(r"^\s+model: (?P<kv>.*) clock=(?P<clock>[\d.]+) GHz\s*$")
_XLIO_OPTS = re.compile(r"^\s+workload: (?P<kv>.*)$")
#: The switches of xlio's ``model:`` line that a run takes (dirty_tracking follows the preset).
SWITCHES = ("shadow_vmcs", "vmcs_exits", "operand", "cache_reg", "apicv", "virtual_idle")
REASONS = frozenset(r.name for r in ExitReason)


def half_digit(number: str) -> float:
    """Half the last printed digit of ``number``: how far rounding may have moved it."""
    _, dot, frac = number.partition(".")
    return 0.5 * 10.0 ** -(len(frac) if dot else 0)


def _value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text.replace(",", ""))
        except ValueError:
            pass
    return text


def _key_values(text: str) -> dict[str, Any]:
    out = {}
    for part in text.split():
        k, sep, v = part.partition("=")
        if sep:
            out[k] = _value(v)
    return out


def parse_perf_kvm_stat(text: str, level: int, where: str, clock_ghz: float) -> PerfReport:
    """The rows of one report; ``clock_ghz`` converts perf's microseconds."""
    rows: dict[tuple[int | None, str], PerfRow] = {}
    report: PerfReport | None = None
    head: dict[str, Any] = {}
    for line in text.splitlines():
        if m := _XLIO_HEAD.match(line):
            head.update(workload=m["workload"], path=m["path"],
                        count=int(m["count"].replace(",", "")))  # fmt: skip
            continue
        if m := _XLIO_MODEL.match(line):
            kv = _key_values(m["kv"])
            head["switches"] = {k: kv[k] for k in SWITCHES if k in kv}
            head["clock_ghz"] = float(m["clock"])
            continue
        if m := _XLIO_OPTS.match(line):
            head["options"] = _key_values(m["kv"])
            continue
        xm = _XLIO_ROW.match(line)
        pm = None if xm else _PERF_ROW.match(line)
        m = xm or pm
        if m is None:
            continue
        form = Form.XLIO if xm else Form.PERF
        if report is None:
            report = PerfReport(level, form, where)
        elif report.form is not form:
            raise InputError(f"{where}: mixes perf kvm stat's and xlio measure's table")
        reason = m["reason"].strip()
        avg_us = float(m["avg"])
        if not math.isfinite(avg_us):
            raise InputError(f"{where}: {line.strip()!r}: the average is not a number")
        if reason not in REASONS:
            report.unknown.append(reason)
            continue
        exit_level = int(xm["level"][1]) if xm else None
        key = (exit_level, reason)
        if key in rows:
            raise InputError(f"{where}: {reason} appears twice: one report per file")
        rows[key] = PerfRow(exit_level, reason, int(m["samples"].replace(",", "")), avg_us,
                            half_digit(m["avg"]))  # fmt: skip
    if report is None:
        raise InputError(
            f"{where}: no perf kvm stat row (VM-EXIT Samples Samples% Time% Min Max Avg time) "
            "found: is this `perf kvm stat report` output?"
        )
    if report.form is Form.XLIO and ("workload" not in head or "clock_ghz" not in head):
        raise InputError(
            f"{where}: xlio measure's table without its header (workload, path, model line)"
        )
    for k, v in head.items():  # xlio's header names the run (``xlio measure --perf-kvm-stat``)
        setattr(report, k, v)
    clock = report.clock_ghz or clock_ghz
    report.rows = [
        PerfRow(
            r.exit_level,
            r.reason,
            r.samples,
            r.avg_cycles * clock * 1000,
            r.resolution * clock * 1000,
        )
        for r in rows.values()
    ]
    return report


def read_text(path: str, what: str) -> str:
    """A measurement file's text: unreadable, binary or non-UTF-8 is an InputError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in raw:
        raise InputError(f"{path}: a binary file, not {what} output")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not text (UTF-8), not {what} output") from None


def read_perf_kvm_stat(level: int, path: str, clock_ghz: float) -> PerfReport:
    """``--perf-kvm-stat LEVEL=FILE``: the file read and parsed."""
    return parse_perf_kvm_stat(read_text(path, "perf kvm stat"), level, path, clock_ghz)
