"""The README's datapath tables, measured with the model.

1. The L1 path, exit by exit, per frame (tx, rx) and per request (echo),
   batch 1, both presets.
2. Exits per frame against batch size (1..256), both nested paths, with
   VIRTIO_F_EVENT_IDX.

    python scripts/datapath_tables.py
"""

from __future__ import annotations

from xlio.measure import measure


def breakdown() -> None:
    print("| preset | workload | level | exit reason | per frame |")
    print("|---|---|---|---|---|")
    for preset in ("turtles-2010", "shadow-vmcs"):
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


def sweep() -> None:
    batches = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    print("| workload | path | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for w in ("tx", "rx", "echo"):
        for path in ("l1", "l0"):
            cells = []
            for b in batches:
                r = measure(w, path, "turtles-2010", count=1024, options={"batch": b})
                cells.append(f"{r['per_op']['l0_exits']:.3g}")
            print(f"| {w} | {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    print("Exit by exit, L1 path, batch 1:\n")
    breakdown()
    print("\nL0 exits per frame (per request for echo), turtles-2010, EVENT_IDX on:\n")
    sweep()
