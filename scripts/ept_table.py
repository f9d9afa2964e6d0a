"""The README's table: cost per modeled second of host-swap EPT churn.

For each virtual-EPT scheme, without and with each of the slides'
optimizations, at two working-set sizes, the slides' 4,000 EPT-table
modifications per second for one modeled second. Prints Markdown.

    python scripts/ept_table.py [--working-sets 16,256] [--rate 4000]
"""

from __future__ import annotations

import argparse
from typing import Any

from xlio.measure import measure

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("--static-ept", {"static_ept": True}),
    ("--avoid-invept", {"avoid_invept": True}),
    ("--defer-rebuild", {"defer_rebuild": True}),
    ("--swap l0", {"swap": "l0"}),
    (
        "all of them",
        {"static_ept": True, "avoid_invept": True, "defer_rebuild": True, "swap": "l0"},
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--working-sets", default="16,256")
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--preset", default="turtles-2010")
    ap.add_argument("--schemes", default="kvm,vtlb,shadow")
    ap.add_argument("--variants", default=",".join(label for label, _ in VARIANTS))
    a = ap.parse_args()
    sizes = [int(x) for x in a.working_sets.split(",")]
    print(
        "| scheme | optimization | working set MiB | CPU share | L0 exits/s | reflected/s "
        "| INVEPT/s | EPT02 built/s | EPT02 zapped/s | EPT12 writes trapped/s | lock/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    wanted = a.variants.split(",")
    for scheme in a.schemes.split(","):
        for label, opts in VARIANTS:
            if label not in wanted:
                continue
            if scheme != "vtlb" and "defer_rebuild" in opts:
                # a deferred rebuild is the vTLB scheme's (kvm prefetches anyway)
                if len(opts) == 1:
                    continue
                opts = {k: v for k, v in opts.items() if k != "defer_rebuild"}
            for ws in sizes:
                o = {"virtual_ept": scheme, "working_set_mib": ws, "rate": a.rate, **opts}
                r = measure("ept-churn", "l1", a.preset, options=o)
                t = r["per_op"]
                share = r["totals"]["cycles_per_second"] / (r["config"]["clock_ghz"] * 1e9)
                print(
                    f"| {scheme} | {label} | {ws} | {share:.1%} | {t['l0_exits']:,.0f} "
                    f"| {t['reflected']:,.0f} | {t['invept_emulated']:,.0f} "
                    f"| {t['ept02_entries_built']:,.0f} | {t['ept02_entries_zapped']:,.0f} "
                    f"| {t['ept12_writes_trapped']:,.0f} | {t['lock_acquisitions']:,.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
