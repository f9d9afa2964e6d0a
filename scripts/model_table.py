"""The README's table of micro workloads beside Turtles' figures.

Runs ``xlio measure <args> --count 1000`` in process for each row and prints
Markdown: L0 exits, VMCS accesses emulated, cycles, the split in switches /
L0 / L1, and modeled microseconds, per operation.

    python scripts/model_table.py
"""

from __future__ import annotations

from typing import Any

from xlio.measure import measure

ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("cpuid", "single", {}),
    ("cpuid", "l1", {}),
    ("cpuid", "l1", {"vmcs_exits": False}),
    ("cpuid", "l1", {"operand": "memory"}),
    ("cpuid", "l1", {"cache_reg": "extended"}),
    ("cpuid", "l1", {"preset": "shadow-vmcs"}),
    ("io-kick", "single", {}),
    ("io-kick", "l1", {}),
    ("io-kick", "l1", {"cache_reg": "extended"}),
    ("io-kick", "l1", {"preset": "shadow-vmcs"}),
    ("io-kick", "l0", {}),
    ("io-user", "l1", {}),
    ("io-user", "l1", {"vmcs_exits": False}),
    ("io-user", "l1", {"preset": "shadow-vmcs"}),
    ("io-user", "l0", {}),
    ("mmio-kick", "l1", {}),
    ("mmio-kick", "l1", {"preset": "shadow-vmcs"}),
]

FLAGS = {
    "vmcs_exits": lambda v: "--no-vmcs-exits",
    "operand": lambda v: f"--operand {v}",
    "cache_reg": lambda v: f"--cache-reg {v}",
    "preset": lambda v: f"--preset {v}",
}


def main() -> None:
    print("| args | L0 exits | VMCS emulated | cycles | switch / L0 / L1 | µs |")
    print("|---|---|---|---|---|---|")
    for workload, path, kw in ROWS:
        kw = dict(kw)
        preset = kw.pop("preset", "turtles-2010")
        args = f"--workload {workload} --path {path}"
        args += "".join(" " + FLAGS[k](v) for k, v in kw.items())
        if preset != "turtles-2010":
            args += f" --preset {preset}"
        r = measure(workload, path, preset, count=1000, **kw)
        p = r["per_op"]
        lv = {k: v / r["count"] for k, v in r["cycles_by_level"].items()}
        print(
            f"| `{args}` | {p['l0_exits']:g} | {p['vmcs_emulated']:g} | {p['cycles']:,.0f} "
            f"| {lv['switch']:,.0f} / {lv['L0']:,.0f} / {lv['L1']:,.0f} | {p['time_us']:.2f} |"
        )


if __name__ == "__main__":
    main()
