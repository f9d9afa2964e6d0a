"""The ``xlio`` command (``python -m xlio``): stop signals are handled from
its first moment (see :mod:`xlio.stop` for the three phases).

This module imports nothing heavy before the phase-1 handlers are in place
(:mod:`xlio.stop` needs only ``os``, ``signal``, ``sys``); only then does it
import the commands (:mod:`xlio.cli`). What comes before is Python's own:
its start and ``site`` (the venv's ``.pth`` files, the editable install's
finder), about 30 ms here, where a SIGINT is Python's KeyboardInterrupt.
"""

from __future__ import annotations

from xlio.stop import StopState, exit_quietly_on_signals, leave, stopping_on_signals


def main() -> int:
    exit_quietly_on_signals()  # phase 1: importing
    from xlio.cli import main as run

    with stopping_on_signals():  # phase 2: the command
        status = run()
    # phase 3 (exit_now again, or ignored after a stop): the process ends here
    leave(StopState.status() if StopState.seen else status)


if __name__ == "__main__":
    raise SystemExit(main())
