"""The README's datapath tables, measured with the model.

1. The L1 path, exit by exit, per frame (tx, rx) and per request (echo),
   batch 1, every preset.
2. Every path side by side, batch 1: exits and modeled time per frame, and
   the L1 path over the direct path, per preset (kvm-2019 also with virtual
   idle).
3. Exits per frame against batch size (1..256), both nested paths, with
   VIRTIO_F_EVENT_IDX, turtles-2010 and kvm-2019.

    python scripts/datapath_tables.py
"""

from __future__ import annotations

from typing import Any

from xlio.measure import measure


def breakdown() -> None:
    print("| preset | workload | level | exit reason | per frame |")
    print("|---|---|---|---|---|")
    for preset in ("turtles-2010", "shadow-vmcs", "kvm-2019"):
        for w in ("tx", "rx", "echo"):
            r = measure(w, "l1", preset, count=256)
            for row in r["by_reason"]:
                n = row["count"] / r["count"]
                print(f"| {preset} | {w} | {row['level']} | {row['reason']} | {n:g} |")
            p = r["per_op"]
            print(
                f"| {preset} | {w} | all | **L0 exits** (reflected {p['reflected']:g}, "
                f"L1 backend {p['l1_be_exits']:g}) | **{p['l0_exits']:g}** |"
            )


def paths() -> None:
    print(
        "| preset | workload | single exits / us | l1 exits / us | l0 exits / us "
        "| l1 over l0 (time) |"
    )
    print("|---|---|---|---|---|---|")
    configs: tuple[tuple[str, dict[str, Any]], ...] = (
        ("turtles-2010", {}),
        ("shadow-vmcs", {}),
        ("kvm-2019", {}),
        ("kvm-2019", {"virtual_idle": True}),
    )
    for preset, sw in configs:
        label = preset + (" --virtual-idle" if sw else "")
        for w in ("tx", "rx", "echo"):
            cells = []
            us = {}
            for path in ("single", "l1", "l0"):
                p = measure(w, path, preset, count=256, **sw)["per_op"]
                us[path] = p["time_us"]
                cells.append(f"{p['l0_exits']:g} / {p['time_us']:.2f}")
            ratio = us["l1"] / us["l0"]
            print(f"| {label} | {w} | " + " | ".join(cells) + f" | {ratio:.1f}x |")


def sweep(preset: str) -> None:
    batches = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    print("| workload | path | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for w in ("tx", "rx", "echo"):
        for path in ("l1", "l0"):
            cells = []
            for b in batches:
                r = measure(w, path, preset, count=1024, options={"batch": b})
                cells.append(f"{r['per_op']['l0_exits']:.3g}")
            print(f"| {w} | {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    print("Exit by exit, L1 path, batch 1:\n")
    breakdown()
    print("\nEvery path, batch 1: L0 exits and modeled microseconds per frame (per request")
    print("for echo), and the L1 path's time over the direct path's:\n")
    paths()
    for preset in ("turtles-2010", "kvm-2019"):
        print(f"\nL0 exits per frame (per request for echo), {preset}, EVENT_IDX on:\n")
        sweep(preset)
