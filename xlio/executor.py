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
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, d / f"{key}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _quiet_worker() -> None:
    """A local worker: Ctrl-C is the parent's; it dies with its parent (a
    parent killed outright leaves no orphan computing on); it holds none of
    the parent's stdio (a reader waiting for the parent's EOF is not kept
    waiting by a worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 (linux/prctl.h)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own shutdown still ends the workers
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


class Executor:
    """Local processes (``jobs``) or a Dask cluster (``scheduler``), with an optional cache."""

    def __init__(self, jobs: int = 1, scheduler: str | None = None, cache: str | None = None):
        self.jobs = jobs
        self.scheduler = scheduler
        self.cache = Cache(cache) if cache else None
        self.from_cache = 0
        self._pool: Any = None  # local processes, started at the first map that needs them
        self._client: Any = None
        if scheduler is not None:
            self._client = connect(scheduler)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
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
                if self.cache:  # stored before counted: a stop between the two loses nothing
                    self.cache.put(keys[i], r)
                results[i] = r
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
        if self._pool is None:  # one pool for every map of this executor
            ctx = multiprocessing.get_context("fork")
            self._pool = ctx.Pool(self.jobs, initializer=_quiet_worker)
        chunk = max(1, min(LOCAL_CHUNK, len(tasks) // (4 * self.jobs)))
        for i, r in zip(index, self._pool.imap(fn, tasks, chunksize=chunk), strict=True):
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
