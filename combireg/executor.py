"""Where work runs: a dask.distributed executor with a thread budget per task.

:func:`dask_executor` is a context manager yielding an :class:`Executor` (a
``distributed.Client`` plus a per-task thread budget) on a local cluster or an existing
scheduler. ``combireg batch`` runs its cases on it, ``combireg evaluate --workers/--scheduler``
its cells.

Every task runs with ``T`` torch and ITK threads (``torch.set_num_threads``, ITK's global
default, and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` in the environment of local worker processes), so ``W``
workers use ``W x T`` cores. The default local cluster has separate worker processes on the
loopback interface (127.0.0.1, no dashboard), one task slot each, and as many workers as both
the cores (``cores // T``) and the memory (available memory // the estimated peak of one task)
allow (:func:`plan_workers`).

dask's own log lines (cluster start, every connection, about 40 INFO lines a run) do not go to
the terminal: :func:`dask_logs` holds them until the caller names a file for them (``combireg
batch`` writes ``DIR/dask.log``), or shows them on the terminal when combireg logs INFO (``-v``).
On a worker, :func:`collect_warnings` keeps combireg's own warnings off the terminal and hands
them back with the task's result.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import CombiregError, first_line

__all__ = [
    "CONNECT_TIMEOUT_S",
    "THREAD_ENV",
    "DASK_LOG_NAME",
    "DaskLog",
    "dask_logs",
    "collect_warnings",
    "in_dask_worker",
    "Executor",
    "dask_executor",
    "plan_workers",
    "thread_limit",
    "set_itk_threads",
    "keep_large_allocations",
    "call_with_thread_limit",
]

log = logging.getLogger(__name__)

#: Seconds to wait for an existing scheduler before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Environment variables that cap the thread pools of OpenMP, MKL, OpenBLAS and ITK.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
#: The file in an output folder that dask's log lines go to.
DASK_LOG_NAME = "dask.log"


# ====================================================================================== threads
def set_itk_threads(count: int) -> int | None:
    """Set ITK's global default thread count where ITK is already loaded; the previous value.

    Why only then: loading ITKCommon just for this costs ~2 s; a worker process that has not
    read an image yet gets its limit from ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS instead.
    """
    if "itk.ITKCommonPython" not in sys.modules:
        return None
    try:
        import itk

        threader = itk.MultiThreaderBase
        previous = int(threader.GetGlobalDefaultNumberOfThreads())
        threader.SetGlobalDefaultNumberOfThreads(int(count))
        return previous
    except Exception:  # an ITK build without this API: the environment variable still applies
        return None


@contextlib.contextmanager
def thread_limit(count: int) -> Iterator[int]:
    """Run a block with ``count`` torch intra-op threads and ITK threads (restored after)."""
    from .optimize import torch_threads

    count = max(1, int(count))
    with torch_threads(count):
        previous_itk = set_itk_threads(count)
        try:
            yield count
        finally:
            if previous_itk is not None:
                set_itk_threads(previous_itk)


def in_dask_worker() -> bool:
    """Whether this code runs as a task on a dask worker."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def collect_warnings(*, quiet: bool) -> Iterator[list[str]]:
    """Collect combireg's WARNING lines (``"logger: message"``) logged inside the block.

    ``quiet`` also keeps them off the terminal (the stderr of a worker process is the user's
    terminal, under the progress bar); the caller reports the collected lines instead.
    """
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = _Collect(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("combireg")
    propagate = logger.propagate
    logger.addHandler(handler)
    if quiet:
        logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _worker_thread_share() -> int | None:
    """Threads per task on the current dask worker: its cores divided by its task slots."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    slots = max(1, int(getattr(worker.state, "nthreads", 1) or 1))
    return max(1, (os.cpu_count() or 1) // slots)


#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def keep_large_allocations() -> bool:
    """Let glibc keep freed large blocks in this process (once per process; glibc only).

    Why: dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any malloc
    threshold switches off glibc's dynamic mmap threshold, so every tensor above 128 kB is
    mmap'ed and unmapped again at each iteration and its pages faulted in anew. Measured on a
    1 mm pair: registration 2.2x slower in a dask worker (levels 2.0/7.7/16.5 s against
    0.7/2.6/8.4 s in-process), and the same in any process started with that variable; with
    the two thresholds below it is back to 0.7/2.5/7.0 s. Returns whether they were set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to undo
        return False
    _MALLOC_TUNED = ok
    return ok


def call_with_thread_limit(threads: int | None, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with a thread budget (None: the worker's share of its cores),
    in a process whose allocator keeps large blocks (:func:`keep_large_allocations`)."""
    keep_large_allocations()
    count = threads or _worker_thread_share()
    if count is None:
        return fn(*args, **kwargs)
    with thread_limit(count):
        return fn(*args, **kwargs)


# ====================================================================================== executor
@dataclass
class Executor:
    """A dask client and the thread budget of each task submitted through it.

    Attributes
    ----------
    client : distributed.Client
    workers : int
        Workers when the executor started.
    threads : int or None
        torch/ITK threads of each task (None: each worker's cores divided by its task slots).
    address : str
        The scheduler's address.
    local : bool
        Whether the cluster was started here (and is stopped on exit).
    """

    client: Any
    workers: int
    threads: int | None
    address: str
    local: bool

    def submit(self, fn: Callable, *args: Any, name: str = "task", **kwargs: Any) -> Any:
        """Submit ``fn(*args, **kwargs)`` under the thread budget; returns a dask Future."""
        key = f"combireg-{name}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(call_with_thread_limit, self.threads, fn, *args, key=key, pure=False, **kwargs)

    def as_completed(self, futures: Iterable) -> Iterator:
        """The futures in the order they finish."""
        from distributed import as_completed

        return iter(as_completed(list(futures), loop=self.client.loop))  # this client's, not a default one


def plan_workers(cores: int, *, workers: int | None = None, threads: int | None = None,
                 available_bytes: int | None = None, per_task_bytes: int | None = None,
                 tasks: int | None = None) -> tuple[int, int]:
    """``(workers, threads per worker)`` for a local cluster.

    Given neither: as many single-thread workers as the cores and the memory
    (``available_bytes // per_task_bytes``) allow, then the cores spread over them. Given the
    threads: ``min(cores // threads, memory)`` workers. Given the workers: ``cores // workers``
    threads each. Never more workers than ``tasks``; at least one of each.
    """
    cores = max(1, int(cores))
    by_memory = None
    if available_bytes is not None and per_task_bytes:
        by_memory = max(1, int(available_bytes) // int(per_task_bytes))
    if workers is None:
        workers = max(1, cores // (threads or 1))
        if by_memory is not None:
            workers = min(workers, by_memory)
    if tasks is not None:
        workers = max(1, min(int(workers), int(tasks)))  # an idle worker only costs its start-up
    if threads is None:
        threads = max(1, cores // workers)
    return int(workers), int(threads)


def _probe_scheduler(address: str, timeout: float) -> None:
    """Fail fast (CombiregError) unless a dask endpoint answers at ``address``.

    Why a probe before ``Client``: a Client that fails to connect leaves an object whose
    finaliser waits ``2 x timeout`` more and prints a traceback at exit.
    """
    import asyncio
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect, parse_address
    from distributed.comm.addressing import parse_host_port

    where = f"cannot reach the dask scheduler at {address}"
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)  # a scheme dask knows
    except (ValueError, TypeError) as exc:
        raise CombiregError(f"--scheduler {address!r}: {first_line(exc)} (expected e.g. tcp://HOST:8786)") from None
    if scheme in ("tcp", "tls"):
        try:
            host, port = parse_host_port(location)
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as exc:
            raise CombiregError(f"{where} ({first_line(exc)})") from None

    async def handshake() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    def run() -> None:  # in a thread of its own: the caller may already run an event loop
        asyncio.run(asyncio.wait_for(handshake(), timeout + 1.0))

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(run).result()
    except (OSError, ValueError, asyncio.TimeoutError, TimeoutError) as exc:
        raise CombiregError(f"{where} within {timeout:g} s ({first_line(exc)})") from None


class DaskLog(logging.Handler):
    """dask's log records, held until :meth:`open` names their file (the output folder may not
    exist while the cluster starts, and must not be written when it fails to start)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._held: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        else:
            self._held.append(record)

    def open(self, path: str | os.PathLike) -> None:
        """Append the held records and all later ones to ``path``."""
        self.path = Path(path)
        self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter)
        for record in self._held:
            self._file.emit(record)
        self._held.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._held.clear()
        super().close()


@contextlib.contextmanager
def dask_logs(to_terminal: bool | None = None) -> Iterator[DaskLog]:
    """Route the ``distributed`` loggers of this process into a :class:`DaskLog` for the block.

    Why here and after importing distributed: distributed configures its loggers when it is
    imported (INFO, and no handler of its own when the root logger has one, so its lines went
    through combireg's terminal handler). ``to_terminal`` (default: whether combireg logs INFO,
    i.e. ``-v``) keeps them on the terminal as well.
    """
    import distributed  # noqa: F401  (its logging set-up runs on import; ours must come after)

    logger = logging.getLogger("distributed")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    if to_terminal is None:
        to_terminal = logging.getLogger("combireg").isEnabledFor(logging.INFO)
    handler = DaskLog()
    logger.setLevel(logging.INFO)
    if not to_terminal:
        for old in saved[2]:
            logger.removeHandler(old)  # distributed's own stderr handler, where it has one
        logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for old in saved[2]:
            if old not in logger.handlers:
                logger.addHandler(old)


@contextlib.contextmanager
def dask_executor(workers: int | None = None, threads_per_worker: int | None = None, scheduler: str | None = None,
                  *, per_task_bytes: int | None = None, tasks: int | None = None,
                  connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Executor]:
    """A dask.distributed executor for combireg tasks, closed on exit.

    Parameters
    ----------
    workers : int, optional
        Worker processes of a local cluster (default: :func:`plan_workers` from the cores,
        the available memory and ``per_task_bytes``).
    threads_per_worker : int, optional
        torch/ITK threads of each task; a worker runs one task at a time.
    scheduler : str, optional
        Address of an existing scheduler (``tcp://HOST:PORT``) to connect to instead of
        starting a local cluster. Its workers run as many tasks at once as they have threads;
        each task then uses ``threads_per_worker`` threads (default: the worker's cores
        divided by its threads).
    per_task_bytes : int, optional
        Estimated peak memory of one task, for the default number of workers.
    tasks : int, optional
        Number of tasks to come (no more local workers than that).
    connect_timeout : float
        Seconds to wait for ``scheduler``.

    Yields
    ------
    Executor

    Raises
    ------
    CombiregError
        ``scheduler`` together with ``workers``, or an unreachable or malformed ``scheduler``
        address (raised within about ``connect_timeout`` seconds; nothing is started).
    """
    if workers is not None and int(workers) < 1:
        raise CombiregError(f"--workers must be >= 1, got {workers}")
    if threads_per_worker is not None and int(threads_per_worker) < 1:
        raise CombiregError(f"--threads-per-worker must be >= 1, got {threads_per_worker}")
    if scheduler is not None and workers is not None:
        raise CombiregError("--workers starts a local cluster; with --scheduler the cluster's own workers run "
                            "the tasks (give one or the other)")
    with contextlib.ExitStack() as stack:
        if not any(isinstance(h, DaskLog) for h in logging.getLogger("distributed").handlers):
            stack.enter_context(dask_logs())  # nobody collects them: held, then dropped (or shown with -v)
        if scheduler is not None:
            started = _remote_executor(scheduler, threads_per_worker, connect_timeout)
        else:
            started = _local_executor(workers, threads_per_worker, per_task_bytes, tasks)
        with started as executor:
            yield executor


@contextlib.contextmanager
def _remote_executor(scheduler: str, threads: int | None, connect_timeout: float) -> Iterator[Executor]:
    from distributed import Client

    _probe_scheduler(scheduler, connect_timeout)
    try:
        client = Client(scheduler, timeout=connect_timeout, set_as_default=False)
    except (OSError, ValueError, TimeoutError) as exc:  # the probe passed, the client still failed
        raise CombiregError(f"cannot connect to the dask scheduler at {scheduler} ({first_line(exc)})") from None
    try:
        count = len(client.scheduler_info().get("workers", {}))
        if count == 0:
            log.warning("the dask scheduler at %s has no workers yet: tasks wait for some", scheduler)
        yield Executor(client, count, threads, scheduler, local=False)
    finally:
        client.close()


@contextlib.contextmanager
def _local_executor(workers: int | None, threads: int | None, per_task_bytes: int | None,
                    tasks: int | None) -> Iterator[Executor]:
    import dask
    from distributed import Client, LocalCluster

    available = None
    if per_task_bytes:
        from .api import available_memory_bytes

        available = available_memory_bytes()
    workers, threads = plan_workers(os.cpu_count() or 1, workers=workers, threads=threads,
                                    available_bytes=available, per_task_bytes=per_task_bytes, tasks=tasks)
    env = {name: str(threads) for name in THREAD_ENV}
    pre_spawn = {**(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}), **env}
    pre_spawn.pop("MALLOC_TRIM_THRESHOLD_", None)  # see keep_large_allocations
    # Why these settings: one task slot per worker (a case uses the worker's T cores through
    # torch/ITK, not dask threads); no memory limit (our own estimate sized the cluster, and
    # dask's would kill a worker in the middle of a case); one retry for a task whose worker
    # died, then it fails alone; the thread variables set before each worker process starts.
    # The nanny also writes pre-spawn variables into this process's environment: restored.
    config = {"distributed.nanny.pre-spawn-environ": pre_spawn, "distributed.scheduler.allowed-failures": 1}
    saved = {k: os.environ.get(k) for k in pre_spawn}
    try:
        with dask.config.set(config):
            # No dashboard; the scheduler's small HTTP server (health, metrics) on a free loopback
            # port rather than 8787, which another cluster may hold.
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR,
                                   scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    log.info("local dask cluster: %d worker(s) x %d thread(s) at %s", workers, threads, cluster.scheduler_address)
    try:
        with Client(cluster, set_as_default=False) as client:
            yield Executor(client, workers, threads, cluster.scheduler_address, local=True)
    finally:
        cluster.close()
