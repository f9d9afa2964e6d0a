"""Callbacks that do not keep their object alive.

A part that calls back into the whole it belongs to (a memory view that
translates through its datapath, an EPT table that allocates through its
MMU, a device model that kicks its datapath, a VMCS that counts through its
machine) would otherwise close a reference cycle with it: a dead machine
would then wait for Python's cyclic collector, and a sweep of many machines
would hold many dead ones (about 15 MiB more at the peak of 60 `measure`
runs). A part holds :func:`weak_method` of its owner's method instead, so
the whole is freed by reference counting the moment the last outside
reference to it goes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


def weak_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound), called through a weak reference to its object.

    Calling it after the object is gone raises ReferenceError: a part that
    outlives its whole is a bug, never a silent no-op.
    """
    owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
    func = method.__func__  # type: ignore[attr-defined]
    name = func.__qualname__

    def call(*args: Any, **kwargs: Any) -> Any:
        obj = owner()
        if obj is None:
            raise ReferenceError(f"{name}: its object is gone")
        return func(obj, *args, **kwargs)

    call.__qualname__ = call.__name__ = f"weak {name}"
    return call
