"""What every test on real taps shares: the skip reason (the ``host`` fixture is in conftest)."""

from __future__ import annotations

import secrets

import pytest

from xlio.backends.netns import HostSetupError, check_privileges, netns_prefix

try:
    check_privileges()
    SKIP = ""
except HostSetupError as e:
    SKIP = str(e)

#: Mark a test (or a module, as ``pytestmark``) that needs real taps.
needs_taps = pytest.mark.skipif(bool(SKIP), reason=SKIP or "ok")


def netns_name(kind: str) -> str:
    """A fresh namespace name of this run (``xlio-TAG-`` then ``kind`` and hex)."""
    return f"{netns_prefix()}{kind}{secrets.token_hex(3)}"
