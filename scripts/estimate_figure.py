"""The README's figure of `xlio estimate kbuild`: each configuration's time by class, two presets.

    python scripts/estimate_figure.py [OUT.png]   (default scripts/figures/kbuild-estimate.png)

Both panels scale the CPU work so that the single-level row takes 25 s (the
nested-EPT patches' single-level kernel make), as the README's table does;
the left one marks the patches' published times, which nothing was fitted to.
"""

from __future__ import annotations

import os
import sys

from xlio.estimate import estimate, parse_scale_to
from xlio.plot import plot_estimate
from xlio.profile import load
from xlio.profiles import SHIPPED

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "figures", "kbuild-estimate.png")
    prof = load(SHIPPED["kbuild"])
    results = [
        estimate(prof, preset, scale_to=parse_scale_to("single=25"))
        for preset in ("turtles-2010", "kvm-2019")
    ]
    # REFERENCE section 5: the nested EPT patches (2012), kernel make in L2
    published: dict[str, float] = {
        "single": 25, "l2-nested-ept": 29, "l2-shadow-on-ept": 87, "l2-shadow-on-shadow": 105,
    }  # fmt: skip
    plot_estimate(results, out, marks=[("published: nested EPT patches (2012)", published), None])
    print(out)


if __name__ == "__main__":
    main()
