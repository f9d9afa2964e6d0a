"""The ``xlio`` commands, one module each: ``NAME``, ``add_parser(sub)``
(its arguments, with the shared groups of :mod:`xlio.options`) and
``run(args) -> exit status``. :mod:`xlio.cli` assembles the parser from
them in this order (the order ``xlio --help`` lists them in) and dispatches."""

from __future__ import annotations

from types import ModuleType

from xlio.commands import (
    calibrate,
    cleanup,
    compare,
    demo,
    estimate,
    guest,
    measure,
    netperf,
    presets,
    profile,
    sensitivity,
    serve,
    sweep,
    trace,
    vmexit,
)

COMMANDS: tuple[ModuleType, ...] = (
    measure, trace, sweep, compare, demo, netperf, vmexit, serve, guest, profile, estimate,
    calibrate, sensitivity, presets, cleanup,
)  # fmt: skip
