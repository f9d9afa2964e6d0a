"""Fuzzing the guest interface (bounded here; ``scripts/fuzz.py`` is the long mode).

Every example is a random program of a hostile L2 (and, on ``l0``, of L1's
delegation calls) against one backend; :mod:`xlio.guestfuzz` checks the
invariants after every step and that traffic flows after the driver's reset.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlio.backends.datapath import L1_NIC_BASE
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.guestfuzz import PATHS, Fuzzer, InvariantBroken, new_datapath
from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_hostile_guest_breaks_no_invariant(path: str, seed: int) -> None:
    Fuzzer(new_datapath(path)).example(seed)


@pytest.mark.parametrize("path", PATHS)
def test_300_examples_in_a_row_on_one_device(path: str) -> None:
    """State left behind by one hostile program never breaks the next."""
    f = Fuzzer(new_datapath(path))
    for seed in range(300):
        f.example(seed)
    t = f.tally
    assert t.examples == 300 and t.frames_checked == 1800
    assert t.needs_reset > 0 and sum(t.errors.values()) > 50  # the programs were hostile


def test_the_audit_catches_a_device_straying_outside_l2_memory() -> None:
    """The isolation invariant is not vacuous: a translation into L1's own
    memory (its NIC's rings) is caught on the first frame."""
    dp = new_datapath("l1")
    f = Fuzzer(dp)
    stray = dp._l1_own(L1_NIC_BASE)
    view = dp.l1_view_of_l2
    view.translate = lambda gpa: stray | (gpa & 0xFFF)
    view._cache.clear()
    view._seen = -1
    dp.send([udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 100, 1)])
    with pytest.raises(InvariantBroken, match="outside L2 memory"):
        f.check()
