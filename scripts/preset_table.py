"""Every parameter of a preset with its value, kind and source, as a Markdown table.

python scripts/preset_table.py kvm-2019
"""

from __future__ import annotations

import sys

from xlio.sim.presets import PRESETS


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "kvm-2019"
    p = PRESETS[name]
    print(f"`{name}`: {p.description}\n")
    print("| parameter | value | unit | kind | source or basis |")
    print("|---|---|---|---|---|")
    for key, param in sorted(p.params.items(), key=lambda kv: (kv[1].kind, kv[0])):
        v = param.value
        if isinstance(v, (bool, str)):
            value = str(v)
        elif isinstance(v, float) and not v.is_integer():
            value = f"{v:,.2f}"
        else:
            value = f"{v:,}"
        print(f"| `{key}` | {value} | {param.unit} | {param.kind} | {param.source} |")


if __name__ == "__main__":
    main()
