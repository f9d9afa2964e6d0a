"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from xlio.backends.netns import NamespacedTap, leftovers


@pytest.fixture
def host() -> Iterator[NamespacedTap]:
    """A fresh ``xlio-`` namespace with our tap; nothing of it outlives the test."""
    h = NamespacedTap()
    h.open()
    try:
        yield h
    finally:
        h.close()
        spaces, links = leftovers()
        assert h.name not in spaces and h.ifname not in links
