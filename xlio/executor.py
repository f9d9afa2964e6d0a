"""One executor for every fan-out: sweeps, samples, sensitivity studies.

Theory of operation
-------------------
:class:`Executor` maps a picklable function over a list of tasks and
returns the results in the tasks' order, whoever computed them: in this
process (``jobs=1``), in ``jobs`` forked local processes, or on a Dask
distributed cluster (``scheduler="tcp://host:8786"``; Dask is the optional
extra ``xlio[dask]``, imported only then). The results are therefore
identical whichever executor ran them. ``done`` is called once per result
as it arrives (a progress bar). With a cache directory, each result is
stored under the hash of its task (:func:`task_key`: the task's full
configuration and the code's version) as soon as it is computed; a task
already in the cache is not run again, so an interrupted study restarted
with the same arguments computes only what is missing
(:attr:`Executor.from_cache` says how many came from the cache). Ctrl-C
raises :class:`Interrupted` with the results finished so far (in task
order, with ``None`` for the missing ones), after the cache has them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import pathlib
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from enum import Enum
from typing import Any

from xlio.measure import UsageError

CONNECT_TIMEOUT_S = 10  # an unreachable scheduler is an error within this, not a hang
LOCAL_CHUNK = 8  # tasks per message to a local process: the per-task overhead amortized


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a fan-out: ``results`` in task order, None where missing."""

    def __init__(self, results: list[Any]) -> None:
        super().__init__()
        self.results = results


def _plain(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(x) for k, x in asdict(v).items()}
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


_CODE: str | None = None


def code_version() -> str:
    """A hash of xlio's own source: a cached result is only valid for the code
    that computed it."""
    global _CODE
    if _CODE is None:
        root = pathlib.Path(__file__).resolve().parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _CODE = h.hexdigest()[:16]
    return _CODE


def task_key(fn: Callable[..., Any], task: Any) -> str:
    """The cache key of one task: its function, its full configuration, the code."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    doc = json.dumps([name, _plain(task), code_version()], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


class Cache:
    """Results stored as JSON under their task's key, each written whole."""

    def __init__(self, directory: str) -> None:
        self.dir = pathlib.Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe-"):
                pass
        except OSError as e:
            raise UsageError(f"argument --cache: cannot write {directory}: {e.strerror}") from None

    def get(self, key: str) -> Any:
        f = self.dir / key[:2] / f"{key}.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        d = self.dir / key[:2]
        d.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, d / f"{key}.json")


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


class Executor:
    """Local processes (``jobs``) or a Dask cluster (``scheduler``), with an optional cache."""

    def __init__(self, jobs: int = 1, scheduler: str | None = None, cache: str | None = None):
        self.jobs = jobs
        self.scheduler = scheduler
        self.cache = Cache(cache) if cache else None
        self.from_cache = 0
        self._client: Any = None
        if scheduler is not None:
            self._client = connect(scheduler)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(
        self,
        fn: Callable[[Any], Any],
        tasks: Sequence[Any],
        done: Callable[[], None] | None = None,
    ) -> list[Any]:
        """``fn`` over ``tasks``, results in task order."""
        results: list[Any] = [None] * len(tasks)
        keys = [task_key(fn, t) for t in tasks] if self.cache else []
        todo = []
        for i in range(len(tasks)):
            hit = self.cache.get(keys[i]) if self.cache else None
            if hit is not None:
                results[i] = hit
                self.from_cache += 1
                if done:
                    done()
            else:
                todo.append(i)
        try:
            for i, r in self._run(fn, [tasks[i] for i in todo], todo):
                results[i] = r
                if self.cache:
                    self.cache.put(keys[i], r)
                if done:
                    done()
        except KeyboardInterrupt:
            raise Interrupted(results) from None
        return results

    def _run(
        self, fn: Callable[[Any], Any], tasks: list[Any], index: list[int]
    ) -> Iterator[tuple[int, Any]]:
        if not tasks:
            return
        if self._client is not None:
            from dask.distributed import as_completed

            futures = self._client.map(fn, tasks, pure=False)
            where = {f.key: i for f, i in zip(futures, index, strict=True)}
            try:
                for f in as_completed(futures):
                    yield where[f.key], f.result()
            finally:
                for f in futures:
                    f.cancel()
            return
        if self.jobs == 1 or len(tasks) == 1:
            for i, t in zip(index, tasks, strict=True):
                yield i, fn(t)
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(self.jobs, len(tasks)), initializer=_quiet_worker) as pool:
            chunk = max(1, min(LOCAL_CHUNK, len(tasks) // (4 * self.jobs)))
            for i, r in zip(index, pool.imap(fn, tasks, chunksize=chunk), strict=True):
                yield i, r


def connect(address: str) -> Any:
    """A Dask distributed client, or a one-line UsageError (no extra, no
    scheduler there) within :data:`CONNECT_TIMEOUT_S`."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise UsageError(
            "argument --scheduler: needs the dask extra: pip install 'xlio[dask]'"
        ) from None
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            return Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError, ValueError) as e:
        raise UsageError(f"argument --scheduler: cannot reach {address}: {e}") from None
