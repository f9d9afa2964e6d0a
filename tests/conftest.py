"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from xlio.backends.netns import RUN_TAG_ENV, NamespacedTap, leftovers

# This run's tag, inherited by every xlio the suite starts: the namespaces and
# taps the suite creates carry it, and the suite checks only those
# (``leftovers()`` reads it), whatever else named xlio- is on the host.
os.environ[RUN_TAG_ENV] = secrets.token_hex(2)


@pytest.fixture
def host() -> Iterator[NamespacedTap]:
    """A fresh ``xlio-TAG-`` namespace with our tap; nothing of it outlives the test."""
    h = NamespacedTap()
    h.open()
    try:
        yield h
    finally:
        h.close()
        spaces, links = leftovers()
        assert h.name not in spaces and h.ifname not in links
