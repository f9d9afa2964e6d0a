"""Every parameter of a preset with its value, kind and source, as a Markdown table.

python scripts/preset_table.py kvm-2019
"""

from __future__ import annotations

import sys

from xlio.sim.presets import PRESETS, format_value, parameter_rows


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "kvm-2019"
    p = PRESETS[name]
    print(f"`{name}`: {p.description}\n")
    print("| parameter | value | unit | kind | source or basis |")
    print("|---|---|---|---|---|")
    for key, param in parameter_rows(p):
        value = format_value(param.value)
        print(f"| `{key}` | {value} | {param.unit} | {param.kind} | {param.source} |")


if __name__ == "__main__":
    main()
