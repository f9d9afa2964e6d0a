"""Every documented limit of every option, at both ends: it runs, or it is
refused in one line.

The limits are read from the parser itself (each bounded option's type
carries its ``limits``), so an option added later joins the walk or fails
:func:`test_every_bounded_option_is_walked`. Each case is a real ``xlio``
child, as a user starts it: it must end by itself with status 0, or with
status 2 and one line ``xlio COMMAND: error: ...``; an extreme that asks for
hours of work (``--count 10000000``) is stopped by SIGINT after a few
seconds and must end quietly with 130, having started without a fault. No
case may print a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

from children import spawn, xlio_args
from taphosts import SKIP as TAP_SKIP
from taphosts import netns_name

from xlio.backends.netns import leftovers
from xlio.cli import build_parser

RUN_FOR = 4.0  # seconds an extreme may run before it is stopped (it has started cleanly)

MEMORY = ("ept-touch", "ept-churn")
NETWORK = ("tx", "rx", "echo")
MEMORY_OPTIONS = {"--working-set", "--rate", "--seconds", "--touch-hz", "--l2-mem", "--l1-mem"}
NETWORK_OPTIONS = {"--batch", "--frame-size", "--queue-size"}

#: The rest of each command line an option's value is tried in: one line per base.
#: A quick run of each command that takes --samples.
STUDIES = {
    "measure": ["--workload", "cpuid", "--count", "10"],
    "compare": ["--workload", "cpuid", "--a", "shadow_vmcs=false", "--b", "shadow_vmcs=true",
                "--count", "10"],
    "netperf": ["-t", "TCP_RR", "--duration", "0.01"],
    "vmexit": ["cpuid"],
    "estimate": ["kbuild"],
}  # fmt: skip


def _deaf_socket() -> str:
    import atexit
    import shutil
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="xlio-limits-")
    atexit.register(shutil.rmtree, d, True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, "deaf.sock"))  # bound, never listening: connect is refused
    atexit.register(s.close)
    return os.path.join(d, "deaf.sock")


_DEAF_SOCKET = _deaf_socket()
BASES: dict[tuple[str, str], list[list[str]]] = {
    ("measure", "--count"): [["--workload", "cpuid"], ["--workload", "echo"]],
    **{("measure", o): [["--workload", w] for w in MEMORY] for o in MEMORY_OPTIONS},
    **{("measure", o): [["--workload", w] for w in NETWORK] for o in NETWORK_OPTIONS},
    ("trace", "--count"): [["--workload", "cpuid"], ["--workload", "echo"]],
    **{("trace", o): [["--workload", w] for w in NETWORK] for o in NETWORK_OPTIONS},
    ("sweep", "--count"): [["--workload", "cpuid", "--param", "hw_exit=500,1000"]],
    ("sweep", "--jobs"): [["--workload", "cpuid", "--param", "hw_exit=500,1000,1500"]],
    ("compare", "--count"): [
        ["--workload", "cpuid", "--a", "shadow_vmcs=false", "--b", "shadow_vmcs=true"]
    ],  # fmt: skip
    ("demo", "--count"): [[]],
    ("demo", "--batch"): [[]],
    ("demo", "--frame-size"): [[]],
    ("netperf", "--duration"): [["-t", "TCP_STREAM"], ["-t", "TCP_RR", "--path", "l1"]],
    ("netperf", "--size"): [["-t", "TCP_STREAM"], ["-t", "UDP_STREAM"], ["-t", "UDP_RR"]],
    ("netperf", "--seed"): [["-t", "TCP_RR"]],
    ("netperf", "--burst"): [["-t", "TCP_RR", "--path", "l0"]],
    ("serve", "--duration"): [["--netns"]],
    ("serve", "--interval"): [["--netns", "--duration", "2"]],
    ("serve", "--switch-every"): [["--netns", "--path", "l1", "--duration", "2"]],
    # a socket nobody listens on: QEMU cannot connect, one line, whatever the timeout
    ("guest", "--timeout"): [["--vhost-user", _DEAF_SOCKET, "--run", "true"]],
    ("estimate", "--rate"): [["kbuild", "--swap", "l1"], ["kbuild", "--swap", "l0"]],
    **{("sensitivity", o): [["--method", "morris", "--trajectories", "2", "--", "vmexit",
                             "cpuid"]]
       for o in ("--top", "--trajectories", "--sobol-n", "--seed", "--jobs")},
    **{(c, o): [[*base, *(["--samples", "4"] if o != "--samples" else [])]]
       for c, base in STUDIES.items() for o in ("--samples", "--seed", "--jobs")
       if (c, o) != ("netperf", "--seed")},
}  # fmt: skip

#: All the maxima (and minima) of one group together: the sizes multiply.
CORNERS: list[list[str]] = [
    ["measure", "--workload", w, "--batch", "32768", "--frame-size", "9000",
     "--queue-size", "32768", "--count", "10"]
    for w in NETWORK
] + [
    ["measure", "--workload", "echo", "--queue-size", "8192", "--frame-size", "9000",
     "--count", "10"],
    ["measure", "--workload", "tx", "--queue-size", "2", "--batch", "32768", "--count", "10"],
    ["trace", "--workload", "echo", "--batch", "32768", "--frame-size", "9000",
     "--queue-size", "32768"],
    ["measure", "--workload", "ept-touch", "--working-set", "1048576", "--l2-mem", "1024",
     "--l1-mem", "2048"],
    ["measure", "--workload", "ept-touch", "--working-set", "1048576", "--l2-mem", "1",
     "--l1-mem", "1"],
    ["measure", "--workload", "ept-touch", "--l2-mem", "1024", "--l1-mem", "1", "--static-ept"],
    ["measure", "--workload", "ept-touch", "--l2-mem", "1024", "--l1-mem", "2048",
     "--static-ept02"],
    ["measure", "--workload", "ept-churn", "--rate", "10000000", "--seconds", "3600",
     "--touch-hz", "1000000", "--working-set", "1048576", "--l2-mem", "1024", "--l1-mem", "2048"],
    ["demo", "--count", "1000000", "--batch", "32768", "--frame-size", "9000"],
    ["netperf", "-t", "UDP_STREAM", "--size", "1048576", "--duration", "60", "--link", "40g"],
    ["netperf", "-t", "TCP_RR", "--size", "1048576", "--burst", "1024", "--duration", "60"],
]  # fmt: skip


def bounded_options() -> list[tuple[str, str, tuple[float, float]]]:
    """(command, option, (lo, hi)) for every option whose type has limits."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, p in sub.choices.items():
        for action in p._actions:
            limits = getattr(action.type, "limits", None)
            if limits is not None:
                found.append((command, action.option_strings[-1], limits))
    return found


def _text(v: float) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _cases() -> list[list[str]]:
    cases = []
    for command, option, limits in bounded_options():
        for base in BASES[(command, option)]:
            cut = base.index("--") if "--" in base else len(base)  # options before a run
            for v in limits:
                cases.append([command, *base[:cut], option, _text(v), *base[cut:]])
    return cases + CORNERS


def _run(argv: list[str]) -> tuple[list[str], int, str, bool]:
    """Run one case; (argv, status, stderr, stopped by us)."""
    proc = spawn(xlio_args(*argv), stdout=subprocess.DEVNULL)
    stopped = False
    try:
        _, err = proc.communicate(timeout=RUN_FOR)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return argv, -9, err + "\n(did not stop within 30 s of SIGINT)", stopped
    return argv, proc.returncode, err, stopped


def _check(argv: list[str], status: int, err: str, stopped: bool) -> str | None:
    """What is wrong with one case's ending, or None."""
    command = argv[0]
    if "Traceback" in err:
        return f"traceback: {err[-600:]}"
    if stopped:  # 0: it finished as the signal came (a loaded machine), which is running too
        ok = status in (0, 130)
        return None if ok else f"stopped by SIGINT but exited {status}: {err[-300:]}"
    if status == 0:
        return None
    lines = err.strip().splitlines()
    if status == 2 and len(lines) == 1 and lines[0].startswith(f"xlio {command}: error: "):
        return None
    return f"exited {status}: {err[-400:]}"


def test_every_bounded_option_is_walked() -> None:
    missing = [(c, o) for c, o, _ in bounded_options() if (c, o) not in BASES]
    assert not missing, f"add a base command line for {missing} to BASES"


def _with_namespaces(cases: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """serve cases get a fresh namespace of this run each (``--netns`` NAME)."""
    names: list[str] = []
    out = []
    for argv in cases:
        if argv[0] == "serve":
            if TAP_SKIP:
                continue
            names.append(netns_name("lim"))
            i = argv.index("--netns")
            argv = [*argv[: i + 1], names[-1], *argv[i + 1 :]]
        out.append(argv)
    return out, names


def test_every_documented_limit_runs_or_is_refused_in_one_line() -> None:
    cases, names = _with_namespaces(_cases())
    with ThreadPoolExecutor(max_workers=2) as pool:  # this machine has two cores
        results = list(pool.map(_run, cases))
    problems = [
        f"xlio {' '.join(argv)}: {why}"
        for argv, status, err, stopped in results
        if (why := _check(argv, status, err, stopped))
    ]
    assert not problems, "\n".join(problems)
    spaces, links = leftovers()
    assert not set(names) & set(spaces) and not links
