"""Another commit of xlio, importable beside this checkout (for before/after benchmarks).

:func:`checkout` puts ``rev`` in a temporary git worktree and lays out an
``xlio`` package over its folders as the install maps them (``xlio/``, and
``backends/``, ``frontends/``, ``sim/`` as its subpackages); a child process
with that PYTHONPATH imports the other commit ahead of this checkout's
editable install. Run such children from outside the checkout (``cwd`` a
temporary directory) so that the current directory does not win either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def checkout(rev: str) -> Iterator[str]:
    """The PYTHONPATH of ``rev``'s xlio; the worktree is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="xlio-rev-") as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, rev],
                       check=True)  # fmt: skip
        try:
            pkg = os.path.join(tmp, "pkg", "xlio")
            os.makedirs(pkg)
            for name in os.listdir(os.path.join(tree, "xlio")):
                os.symlink(os.path.join(tree, "xlio", name), os.path.join(pkg, name))
            for sub in ("backends", "frontends", "sim"):
                os.symlink(os.path.join(tree, sub), os.path.join(pkg, sub))
            yield os.path.dirname(pkg)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree],
                           check=True)  # fmt: skip


def child_env(pythonpath: str | None) -> dict[str, str]:
    """The environment of a child that imports ``pythonpath``'s xlio (None: this checkout's)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def run_json(code: str, args: list[str], pythonpath: str | None = None) -> Any:
    """Run ``code`` (a program that prints one JSON document) in a child on
    ``pythonpath``'s xlio (None: this checkout's), from outside the
    checkout, with ``args`` as its ``sys.argv[1:]``; returns what it printed."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True,
        env=child_env(pythonpath), cwd=tempfile.gettempdir(), check=True,
    )  # fmt: skip
    return json.loads(out.stdout)
