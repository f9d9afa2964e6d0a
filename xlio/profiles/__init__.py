"""Profiles shipped with xlio (``xlio estimate NAME``), each measured by a ``scripts/`` script."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
#: name -> file, for every profile shipped
SHIPPED: dict[str, str] = {
    name[: -len(".toml")]: os.path.join(HERE, name)
    for name in sorted(os.listdir(HERE))
    if name.endswith(".toml")
}
