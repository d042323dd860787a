"""Register every case of a dataset on a dask.distributed cluster (``combireg batch``).

:func:`run_batch` registers each case of a dataset (a manifest CSV, a BraTS-Reg folder or a
Learn2Reg JSON: any layout of :mod:`combireg.cases`) into ``DIR/<case id>/`` with exactly the
outputs of ``combireg run`` (written by :func:`combireg.outputs.write_outputs`, atomically),
the landmark TRE in ``report.json`` where the case has landmarks, on the executor of
:mod:`combireg.executor` (``combireg evaluate --workers/--scheduler`` runs its cells there too).

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
    Every case is one task of :func:`combireg.executor.dask_executor`; a worker runs one case
    at a time with ``T`` torch and ITK threads, so ``W`` workers use ``W x T`` cores. The
    default local cluster has as many workers as both the cores and the memory (available
    memory // the estimated peak of one case, :func:`combireg.api.estimate_memory_bytes`)
    allow. A failing case is recorded and the others go on. ``DIR/batch_summary.json`` is
    rewritten (atomically) as each case ends; combireg's warnings on a worker (such as
    landmarks outside the target grid) are listed there per case, dask's own log lines go to
    ``DIR/dask.log`` (:func:`combireg.executor.dask_logs`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import CombiregError, first_line
from .executor import (
    CONNECT_TIMEOUT_S,
    DASK_LOG_NAME,
    collect_warnings,
    dask_executor,
    dask_logs,
    in_dask_worker,
    set_itk_threads,
)
from .cases import Case, load_case, read_cases
from .outputs import prepare_resumable_dir

__all__ = [
    "SUMMARY_NAME",
    "BatchSummary",
    "case_complete",
    "register_case",
    "run_batch",
]

log = logging.getLogger(__name__)

SUMMARY_NAME = "batch_summary.json"


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
    from .paramfile import parse_text

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
        numbers.update(tre_initial_mean=stats.get("initial_mean"), tre_mean=stats.get("mean"),
                       tre_n_outside_grid=stats.get("n_outside_grid", 0))
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
    """Register one case into ``case_dir`` (replaced atomically); never raises.

    Runs on a worker. The landmarks (where the case has them) are read and checked first;
    their TRE before and after goes into ``report.json`` as ``combireg run`` puts it. The
    case's masks restrict the similarity. ``NumberOfThreads`` becomes the task's thread budget.

    Returns
    -------
    dict
        ``case``, ``status`` (``"done"`` or ``"failed"``), ``error`` (one line), ``seconds``,
        ``warnings`` (combireg's warning lines during the case; kept off a worker's terminal)
        and, when done, ``wall_time_s``, ``peak_memory_mb``, ``folding_percent`` and, with
        landmarks, ``tre_initial_mean``, ``tre_mean``, ``tre_n_outside_grid``.
    """
    start = time.perf_counter()
    with collect_warnings(quiet=in_dask_worker()) as warnings:
        try:
            extra = _register_case(case, Path(case_dir), settings, init, device, landmark_space)
            return {"case": case.id, "status": "done", "error": "", "seconds": round(time.perf_counter() - start, 3),
                    "warnings": warnings, **extra}
        except CombiregError as exc:
            message = str(exc)
        except Exception as exc:  # a bug or an unexpected library error: record it, keep going
            log.warning("%s failed with %s", case.id, type(exc).__name__, exc_info=True)
            message = f"{type(exc).__name__}: {exc}"
    return {"case": case.id, "status": "failed", "error": " ".join(message.split()),
            "seconds": round(time.perf_counter() - start, 3), "warnings": warnings}


def _register_case(case: Case, case_dir: Path, settings, init: str | None, device: str,
                   landmark_space: str | None) -> dict:
    import torch

    from .api import register
    from .device import resolve_device
    from .landmarks import compute_tre

    init = _init_for(init, case.id)
    source, target, target_lm, source_lm = load_case(case, landmark_space)
    set_itk_threads(torch.get_num_threads())  # ITK is loaded now: cheap
    settings = settings.replace(num_threads=torch.get_num_threads())
    result = register(source, target, settings, init=init, device=str(resolve_device(device)),
                      target_mask=case.target_mask, source_mask=case.source_mask)
    if target_lm is not None:
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
    warnings: int = 0  # combireg warning lines of this run's cases (listed per case in the summary)
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
        warned = f"; {self.warnings} warning(s) in {SUMMARY_NAME}" if self.warnings else ""
        return (f"batch: {self.done} done, {self.skipped} skipped, {len(self.failed)} failed in "
                f"{self.wall_time_s:.1f} s ({where}){warned}")


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


def run_batch(dataset: str | os.PathLike, outdir: str | os.PathLike, *, params=None, init: str | None = None,
              device: str = "auto", workers: int | None = None, threads_per_worker: int | None = None,
              scheduler: str | None = None, landmark_space: str | None = None, overwrite: bool = False,
              connect_timeout: float = CONNECT_TIMEOUT_S, progress: Callable[[dict], None] | None = None,
              pairs: str | None = None) -> BatchSummary:
    """Register every case of ``dataset`` into ``outdir/<case id>/`` on a dask cluster.

    Parameters
    ----------
    dataset : path
        A manifest CSV (``id,source,target`` and optional landmark and mask columns), a
        BraTS-Reg folder or a Learn2Reg JSON (:func:`combireg.cases.read_cases`).
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
    pairs : str, optional
        Learn2Reg: which pairs (``val``, ``test``, ``training`` or a CSV file of pairs).
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
        Bad dataset, parameters, init, device, output folder, finished cases with other
        parameters, or an unreachable scheduler: all before anything is started or written.
        A failing case is recorded and the others go on.
    """
    from .version import __version__
    from .device import resolve_device
    from .landmarks import parse_space
    from .params import Settings, load_settings

    clock = time.perf_counter()
    dataset = Path(dataset)
    outdir = Path(outdir).absolute()
    landmark_space = parse_space(landmark_space)
    cases = read_cases(dataset, pairs=pairs)
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
    meta = {"combireg_version": __version__, "dataset": str(dataset.absolute()), "output": str(outdir),
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
        executor = dask_log = None
        if pending:
            dask_log = stack.enter_context(dask_logs())  # held until DIR exists, then DIR/dask.log
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
        if dask_log is not None:
            dask_log.open(outdir / DASK_LOG_NAME)
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
                    record = {k: v for k, v in record.items() if k != "case" and (k != "warnings" or v)}
                    summary.warnings += len(record.get("warnings", []))
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
