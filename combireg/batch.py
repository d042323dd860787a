"""Register every case of a manifest on a dask.distributed cluster (``combireg batch``).

:func:`run_batch` registers each case of a manifest (the format of :mod:`combireg.cases`)
into ``DIR/<case id>/`` with exactly the outputs of ``combireg run`` (written by
:func:`combireg.outputs.write_outputs`, atomically), the landmark TRE in ``report.json`` included.
:func:`dask_executor` is the reusable part: a context manager yielding an :class:`Executor`
(a ``distributed.Client`` plus a per-task thread budget) on a local cluster or an existing
scheduler; ``combireg evaluate --workers/--scheduler`` runs its cells on it too.

Finished cases
    A case is finished when ``DIR/<case id>/`` holds every contract file, each non-empty:
    ``field.nii.gz``, ``field_inverse.nii.gz``, ``params.txt``, ``report.json`` and
    ``warped_<k>.nii.gz`` for each of the case's C target channels, and ``report.json``
    parses as a JSON object whose ``target.channels`` is C. The folder appears by one rename
    once all of them are written (:func:`combireg.outputs.atomic_output_dir`), and
    ``report.json`` is written last inside it, so this holds exactly for cases whose
    registration completed. A rerun skips finished cases and registers the others (an
    incomplete folder is replaced); it refuses (unless ``overwrite``) when a finished case's
    ``params.txt`` holds other parameters than this run's (``NumberOfThreads`` aside).

Execution
    Every case is one task; a worker runs one case at a time with ``T`` torch and ITK
    threads (``torch.set_num_threads``, ITK's global default, and ``OMP_NUM_THREADS``/
    ``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
    in the environment of local worker processes), so ``W`` workers use ``W x T`` cores.
    The default local cluster has separate worker processes on the loopback interface
    (127.0.0.1, no dashboard) and as many workers as both the cores (``cores // T``) and the
    memory (available memory // the estimated peak of one case,
    :func:`combireg.api.estimate_memory_bytes`) allow. A failing case is recorded and the
    others go on. ``DIR/batch_summary.json`` is rewritten (atomically) as each case ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import CombiregError, first_line
from .cases import Case, load_case, read_manifest
from .outputs import prepare_resumable_dir

__all__ = [
    "SUMMARY_NAME",
    "CONNECT_TIMEOUT_S",
    "Executor",
    "BatchSummary",
    "dask_executor",
    "plan_workers",
    "thread_limit",
    "case_complete",
    "register_case",
    "run_batch",
]

log = logging.getLogger(__name__)

SUMMARY_NAME = "batch_summary.json"
#: Seconds to wait for an existing scheduler before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Environment variables that cap the thread pools of OpenMP, MKL, OpenBLAS and ITK.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


# ====================================================================================== threads
def _set_itk_threads(count: int) -> int | None:
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
        previous_itk = _set_itk_threads(count)
        try:
            yield count
        finally:
            if previous_itk is not None:
                _set_itk_threads(previous_itk)


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


def call_with_thread_limit(threads: int | None, fn: Callable, *args, **kwargs):
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

    def submit(self, fn: Callable, *args, name: str = "task", **kwargs):
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


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """dask's own INFO lines (cluster start, every connection) only when combireg logs DEBUG."""
    logger = logging.getLogger("distributed")
    previous = logger.level
    if not logging.getLogger("combireg").isEnabledFor(logging.DEBUG):
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(previous)


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
    with _quiet_dask_logs():
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


# ====================================================================================== one case
def case_complete(case_dir: str | os.PathLike, channels: int) -> bool:
    """Whether ``case_dir`` holds a finished registration of ``channels`` channels (module docstring)."""
    from .outputs import FIELD_NAME, INVERSE_FIELD_NAME, PARAMS_NAME, REPORT_NAME, warped_name

    case_dir = Path(case_dir)
    names = [FIELD_NAME, INVERSE_FIELD_NAME, PARAMS_NAME, *(warped_name(k) for k in range(channels)), REPORT_NAME]
    for name in names:
        path = case_dir / name
        try:
            if not path.is_file() or path.stat().st_size == 0:
                return False
        except OSError:
            return False
    try:
        report = json.loads((case_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and isinstance(report.get("target"), dict) \
        and report["target"].get("channels") == channels


def _parameter_difference(case_dir: Path, settings) -> str | None:
    """Keys whose values in ``case_dir/params.txt`` differ from ``settings`` (None: the same)."""
    from .outputs import PARAMS_NAME
    from .params import parse_text

    path = case_dir / PARAMS_NAME
    try:
        old = parse_text(path.read_text(), str(path))
    except (OSError, CombiregError) as exc:
        return f"unreadable ({first_line(exc)})"
    new = settings.to_parameter_map()
    keys = (set(old) | set(new)) - {"NumberOfThreads"}  # a resource, not a result, setting
    differ = sorted(k for k in keys if tuple(old.get(k, ())) != tuple(new.get(k, ())))
    return ", ".join(differ) or None


def _summary_numbers(report: dict) -> dict:
    """A case's numbers for batch_summary.json, from its report (as written to report.json)."""
    numbers = {"wall_time_s": report.get("wall_time_s"), "peak_memory_mb": report.get("peak_memory_mb")}
    stats = (report.get("tre") or {}).get("statistics") or {}
    if stats:
        numbers.update(tre_initial_mean=stats.get("initial_mean"), tre_mean=stats.get("mean"))
    numbers["folding_percent"] = (report.get("jacobian") or {}).get("percent_nonpositive")
    return numbers


def _report_numbers(case_dir: Path) -> dict:
    """The summary numbers of a finished case, read back from its report.json."""
    try:
        return _summary_numbers(json.loads((case_dir / "report.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return {}


def _init_for(init: str | None, case_id: str) -> str | None:
    return None if init is None else str(init).replace("{case}", case_id)


def register_case(case: Case, case_dir: str | os.PathLike, settings, *, init: str | None = None,
                  device: str = "cpu", landmark_space: str | None = None) -> dict:
    """Register one manifest case into ``case_dir`` (replaced atomically); never raises.

    Runs on a worker. The landmarks are read and checked first; their TRE before and after
    goes into ``report.json`` as ``combireg run`` puts it. ``NumberOfThreads`` becomes the
    task's thread budget.

    Returns
    -------
    dict
        ``case``, ``status`` (``"done"`` or ``"failed"``), ``error`` (one line), ``seconds``
        and, when done, ``wall_time_s``, ``peak_memory_mb``, ``tre_initial_mean``,
        ``tre_mean``, ``folding_percent``.
    """
    start = time.perf_counter()
    try:
        extra = _register_case(case, Path(case_dir), settings, init, device, landmark_space)
        return {"case": case.id, "status": "done", "error": "", "seconds": round(time.perf_counter() - start, 3),
                **extra}
    except CombiregError as exc:
        message = str(exc)
    except Exception as exc:  # a bug or an unexpected library error: record it, keep going
        log.warning("%s failed with %s", case.id, type(exc).__name__, exc_info=True)
        message = f"{type(exc).__name__}: {exc}"
    return {"case": case.id, "status": "failed", "error": " ".join(message.split()),
            "seconds": round(time.perf_counter() - start, 3)}


def _register_case(case: Case, case_dir: Path, settings, init: str | None, device: str,
                   landmark_space: str | None) -> dict:
    import torch

    from .api import register
    from .device import resolve_device
    from .landmarks import compute_tre

    init = _init_for(init, case.id)
    source, target, target_lm, source_lm = load_case(case, landmark_space)
    _set_itk_threads(torch.get_num_threads())  # ITK is loaded now: cheap
    settings = settings.replace(num_threads=torch.get_num_threads())
    result = register(source, target, settings, init=init, device=str(resolve_device(device)))
    tre = compute_tre(result.displacement_lps_mm, result.target_geometry, target_lm, source_lm)
    result.report["tre"] = {"target_landmarks": str(case.target_landmarks),
                            "source_landmarks": str(case.source_landmarks), **tre.to_dict()}
    result.report["batch"] = {"case": case.id}
    result.save(case_dir, overwrite=True)
    return _summary_numbers(result.report)


# ====================================================================================== driver
@dataclass
class BatchSummary:
    """What :func:`run_batch` did (also written as ``DIR/batch_summary.json``)."""

    outdir: Path
    cases: dict = field(default_factory=dict)  # case id -> record (status, error, times, TRE)
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (case id, error)
    wall_time_s: float = 0.0
    workers: int = 0
    threads: int | None = None
    scheduler: str = ""

    @property
    def summary_path(self) -> Path:
        return self.outdir / SUMMARY_NAME

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        threads = "auto" if self.threads is None else str(self.threads)
        where = f"{self.workers} worker(s) x {threads} thread(s)" if self.workers else "no cluster needed"
        return (f"batch: {self.done} done, {self.skipped} skipped, {len(self.failed)} failed in "
                f"{self.wall_time_s:.1f} s ({where})")


def _write_summary(summary: BatchSummary, meta: dict, status: str) -> None:
    counts = {"total": len(summary.cases), "done": summary.done, "skipped": summary.skipped,
              "failed": len(summary.failed),
              "pending": sum(1 for r in summary.cases.values() if r["status"] == "pending")}
    data = {**meta, "status": status, "wall_time_s": round(summary.wall_time_s, 3), "workers": summary.workers,
            "threads_per_worker": summary.threads, "scheduler": summary.scheduler, "counts": counts,
            "failures": [{"case": c, "error": e} for c, e in summary.failed], "cases": summary.cases}
    path = summary.summary_path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_init(init) -> str | None:
    """Validate ``--init`` up front: a DRN model loads, a field file (without ``{case}``) exists."""
    if init is None:
        return None
    from .api import is_model_init

    init = str(init)
    if is_model_init(init):
        from .network import load_model

        load_model(init)  # a missing or foreign model fails before any case runs
    elif "{case}" not in init and not Path(init).is_file():
        raise CombiregError(f"--init {init}: no such file")
    return init


def _estimate_case_bytes(cases: Sequence[Case], settings) -> int | None:
    """Estimated peak memory of one case, from the first case whose images can be read."""
    from . import io
    from .api import estimate_memory_bytes, working_geometry

    for case in cases:
        try:
            target = io.read_channels([str(p) for p in case.target], role="target")
            source = io.read_channels([str(p) for p in case.source], role="source")
        except CombiregError:
            continue
        return estimate_memory_bytes(working_geometry(target.geometry, settings), source.geometry,
                                     target.num_channels, settings)
    return None


def run_batch(manifest: str | os.PathLike, outdir: str | os.PathLike, *, params=None, init: str | None = None,
              device: str = "auto", workers: int | None = None, threads_per_worker: int | None = None,
              scheduler: str | None = None, landmark_space: str | None = None, overwrite: bool = False,
              connect_timeout: float = CONNECT_TIMEOUT_S,
              progress: Callable[[dict], None] | None = None) -> BatchSummary:
    """Register every case of ``manifest`` into ``outdir/<case id>/`` on a dask cluster.

    Parameters
    ----------
    manifest : path
        CSV ``id,source,target,target_landmarks,source_landmarks`` (see :mod:`combireg.cases`).
    outdir : path
        Created if needed; a folder holding a batch_summary.json is resumed.
    params : path, Settings or None
        Registration parameters for every case (None: the built-in defaults).
    init : str, optional
        ``--init`` of ``combireg run`` (a field, a DRN model file or ``"drn"``); ``{case}`` in
        a field path is replaced by the case id.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Resolved here for a local cluster, on each worker for ``scheduler``.
    workers, threads_per_worker, scheduler
        See :func:`dask_executor`.
    landmark_space : {"lps", "ras", "index"}, optional
    overwrite : bool
        Register every case again (each folder replaced as its case finishes).
    connect_timeout : float
        Seconds to wait for ``scheduler``.
    progress : callable, optional
        Called with ``{"event": "skipped"|"done"|"failed", "case", "error", "index", "total"}``
        as each case is settled (skipped ones first), and ``{"event": "started", "workers",
        "threads", "pending", "total"}`` once the cluster is up.

    Returns
    -------
    BatchSummary

    Raises
    ------
    CombiregError
        Bad manifest, parameters, init, device, output folder, finished cases with other
        parameters, or an unreachable scheduler: all before anything is started or written.
        A failing case is recorded and the others go on.
    """
    from .version import __version__
    from .device import resolve_device
    from .landmarks import parse_space
    from .params import Settings, load_settings

    clock = time.perf_counter()
    manifest = Path(manifest)
    outdir = Path(outdir).absolute()
    landmark_space = parse_space(landmark_space)
    cases = read_manifest(manifest)
    settings = params if isinstance(params, Settings) else load_settings(params)
    init = _check_init(init)
    if scheduler is None:
        device = str(resolve_device(device))  # here, where the local workers run
    prepare_resumable_dir(outdir, SUMMARY_NAME, overwrite=overwrite)

    summary = BatchSummary(outdir)
    pending: list[Case] = []
    conflicts = []
    for case in cases:
        case_dir = outdir / case.id
        if not overwrite and case_complete(case_dir, len(case.target)):
            difference = _parameter_difference(case_dir, settings)
            if difference:
                conflicts.append(f"{case_dir} ({difference})")
            summary.cases[case.id] = {"status": "skipped", "outdir": case.id, **_report_numbers(case_dir)}
        else:
            pending.append(case)
            summary.cases[case.id] = {"status": "pending", "outdir": case.id}
    if conflicts:
        raise CombiregError(f"finished case(s) registered with other parameters: {conflicts[0]}"
                            f"{f' and {len(conflicts) - 1} more' if len(conflicts) > 1 else ''}; "
                            f"use --overwrite or another output folder")
    meta = {"combireg_version": __version__, "manifest": str(manifest.absolute()), "output": str(outdir),
            "parameters": settings.source, "init": init, "device": device}
    total = len(cases)

    def emit(event: dict) -> None:
        if progress:
            progress(event)

    for index, case in enumerate(cases, start=1):
        if summary.cases[case.id]["status"] == "skipped":
            summary.skipped += 1
            emit({"event": "skipped", "case": case.id, "error": "", "index": index, "total": total})

    with contextlib.ExitStack() as stack:
        executor = None
        if pending:
            per_case = None
            if scheduler is None and workers is None:
                if device.startswith("cuda"):
                    workers = 1  # one GPU: one case at a time unless --workers says otherwise
                else:
                    per_case = _estimate_case_bytes(pending, settings)
            # Connect (or start) before writing anything: an unreachable scheduler leaves no trace.
            executor = stack.enter_context(dask_executor(workers, threads_per_worker, scheduler,
                                                         per_task_bytes=per_case, tasks=len(pending),
                                                         connect_timeout=connect_timeout))
            summary.workers, summary.threads, summary.scheduler = \
                executor.workers, executor.threads, "local" if executor.local else executor.address
            if device.startswith("cuda") and executor.local and executor.workers > 1:
                log.warning("%d workers share one GPU", executor.workers)
            emit({"event": "started", "workers": executor.workers, "threads": executor.threads,
                  "pending": len(pending), "total": total})
        outdir.mkdir(parents=True, exist_ok=True)
        summary.wall_time_s = time.perf_counter() - clock
        _write_summary(summary, meta, "running" if pending else "finished")
        if executor is not None:
            futures = {executor.submit(register_case, case, str(outdir / case.id), settings, init=init,
                                       device=device, landmark_space=landmark_space, name=case.id): case
                       for case in pending}
            index = summary.skipped
            try:
                for future in executor.as_completed(futures):
                    case = futures[future]
                    try:
                        record = future.result()
                    except Exception as exc:  # the worker died (KilledWorker) or the task was cancelled
                        record = {"case": case.id, "status": "failed",
                                  "error": f"{type(exc).__name__}: {' '.join(first_line(exc).split())}"}
                    record = {k: v for k, v in record.items() if k != "case"}
                    record["outdir"] = case.id
                    summary.cases[case.id] = record
                    if record["status"] == "done":
                        summary.done += 1
                    else:
                        summary.failed.append((case.id, record["error"]))
                        log.warning("%s failed: %s", case.id, record["error"])
                    index += 1
                    summary.wall_time_s = time.perf_counter() - clock
                    _write_summary(summary, meta, "running")
                    emit({"event": record["status"], "case": case.id, "error": record.get("error", ""),
                          "index": index, "total": total})
            except BaseException:
                summary.wall_time_s = time.perf_counter() - clock
                _write_summary(summary, meta, "interrupted")
                raise
    summary.wall_time_s = time.perf_counter() - clock
    _write_summary(summary, meta, "finished")
    return summary
