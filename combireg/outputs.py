"""The output contract of a registration, and output directories that appear whole or not at all.

:func:`write_outputs` writes the files of ``combireg run`` (:data:`FIELD_NAME`,
:data:`INVERSE_FIELD_NAME`, :func:`warped_name` per channel, :data:`PARAMS_NAME`,
:data:`REPORT_NAME`, and :data:`CORRESPONDENCE_WEIGHT_NAME` where there is one) for every method:
:class:`combireg.api.Result` and the baselines of :mod:`combireg.adapters` alike, so that
``tre``, ``evaluate``, ``compare`` and ``batch`` read every method's folder the same way.

Every command that writes a folder (``run``, ``synth``, the baselines) checks it up front with
:func:`prepare_output_dir` and writes through :func:`atomic_output_dir`: files go into a
temporary folder beside the destination, which replaces it only once everything is written;
any exception, Ctrl-C included, removes the temporary folder (and parent folders this call
created), so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import CombiregError

__all__ = ["FIELD_NAME", "INVERSE_FIELD_NAME", "PARAMS_NAME", "REPORT_NAME", "CORRESPONDENCE_WEIGHT_NAME", "warped_name",
           "OUTPUT_KINDS", "output_kinds", "write_outputs", "prepare_output_dir", "prepare_resumable_dir",
           "atomic_output_dir"]

#: Output file names are a contract read by other tools and by ``combireg evaluate``.
FIELD_NAME = "field.nii.gz"
INVERSE_FIELD_NAME = "field_inverse.nii.gz"
PARAMS_NAME = "params.txt"
REPORT_NAME = "report.json"
#: Written only with ``(CorrespondenceWeighting "true")``: the final similarity weight on the target grid.
CORRESPONDENCE_WEIGHT_NAME = "correspondence_weight.nii.gz"


#: The image outputs a run can be asked for (``combireg run --outputs``): ``field`` (FIELD_NAME),
#: ``inverse`` (INVERSE_FIELD_NAME), ``warped`` (one warped_name(k) per channel). params.txt and
#: report.json are always written; by default so is every kind, the full contract.
OUTPUT_KINDS = ("field", "inverse", "warped")


def output_kinds(value) -> tuple[str, ...]:
    """The output kinds asked for, in :data:`OUTPUT_KINDS` order.

    Parameters
    ----------
    value : None, str or sequence of str
        None (every kind), ``"field,warped"``, or ``["field", "warped"]``; ``"all"`` names every kind.

    Raises
    ------
    CombiregError
        An unknown kind.
    """
    if value is None:
        return OUTPUT_KINDS
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if "all" in names:
        return OUTPUT_KINDS
    unknown = [n for n in names if n not in OUTPUT_KINDS]
    if unknown:
        raise CombiregError(f"unknown output {unknown[0]!r} (choose from {', '.join(OUTPUT_KINDS)}, or all)")
    return tuple(k for k in OUTPUT_KINDS if k in names)


def warped_name(k: int) -> str:
    """The file name of source channel ``k`` (0-based) warped into target space."""
    return f"warped_{k}.nii.gz"


def prepare_output_dir(outdir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check that ``outdir`` may be written (before any work is done); returns it absolute.

    Raises
    ------
    CombiregError
        ``outdir`` is a file, is not empty and ``overwrite`` is false, or cannot be written.
    """
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise CombiregError(f"{outdir}: exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not overwrite:
        raise CombiregError(f"{outdir}: output directory is not empty (use --overwrite)")
    parent = outdir if outdir.is_dir() else outdir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    # Why a real probe: os.access() says yes to root everywhere, even on read-only mounts.
    try:
        probe = tempfile.mkdtemp(prefix=".combireg-probe-", dir=parent)
        os.rmdir(probe)
    except OSError:
        raise CombiregError(f"{outdir}: output directory is not writable") from None
    return outdir


def prepare_resumable_dir(outdir: str | os.PathLike, marker: str, *, overwrite: bool) -> Path:
    """Check that ``outdir`` may hold a resumable run (``evaluate``, ``batch``); returns it absolute.

    A non-empty folder is accepted only when it holds ``marker`` (the run's own results file,
    so the run resumes there) or with ``overwrite``.

    Raises
    ------
    CombiregError
        ``outdir`` is a file or cannot be written, or is not empty without ``marker``.
    """
    outdir = prepare_output_dir(outdir, overwrite=True)  # existence and writability only
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / marker).is_file() and not overwrite:
        raise CombiregError(f"{outdir}: not empty and holds no {marker} to resume (use --overwrite)")
    return outdir


@contextlib.contextmanager
def atomic_output_dir(outdir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``outdir`` (replacing it when allowed)."""
    outdir = prepare_output_dir(outdir, overwrite=overwrite)
    created = [p for p in reversed(outdir.parents) if not p.exists()]
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    try:
        yield tmp
        _replace_dir(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # parents this call made, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _replace_dir(tmp: Path, outdir: Path) -> None:
    # mkdtemp makes a private (0700) folder; results should get the user's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    old = None
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old-{os.getpid()}")
        os.replace(outdir, old)
    os.replace(tmp, outdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- the output contract
def write_outputs(outdir: str | os.PathLike, result: Any, params_text: str, *, overwrite: bool = False,
                  outputs=None) -> Path:
    """Write the output files of a registration method (the contract of ``combireg run``).

    ``result`` has ``displacement_lps_mm``, ``target_geometry``, ``inverse_displacement_lps_mm``,
    ``source_geometry``, ``warped`` and ``report`` (a :class:`combireg.api.Result` or a baseline's result), so
    every method writes the same files the same way; a ``correspondence_weight`` Image, where
    the result has one that is not None, is written as ``correspondence_weight.nii.gz``. Written
    whole or not at all. ``outputs`` (see :func:`output_kinds`; default every kind) leaves out
    the kinds not named, and an inverse or warped image the result does not hold (None).
    """
    from . import io

    kinds = output_kinds(outputs)
    with atomic_output_dir(outdir, overwrite=overwrite) as tmp:
        jobs = []
        if "field" in kinds:
            jobs.append((io.write_displacement, tmp / FIELD_NAME, result.displacement_lps_mm, result.target_geometry))
        if "inverse" in kinds and result.inverse_displacement_lps_mm is not None:
            jobs.append((io.write_displacement, tmp / INVERSE_FIELD_NAME, result.inverse_displacement_lps_mm,
                         result.source_geometry))
        if "warped" in kinds and result.warped is not None:
            jobs += [(io.write_image, tmp / warped_name(k), result.warped.channel(k), None)
                     for k in range(result.warped.num_channels)]
        weight = getattr(result, "correspondence_weight", None)
        if weight is not None:
            jobs.append((io.write_image, tmp / CORRESPONDENCE_WEIGHT_NAME, weight, None))
        # Why threads: gzip dominates writing a 1 mm field and zlib releases the GIL, so the
        # files compress in parallel.
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            for future in [pool.submit(fn, path, data, geometry) for fn, path, data, geometry in jobs]:
                future.result()
        (tmp / PARAMS_NAME).write_text(params_text)
        (tmp / REPORT_NAME).write_text(json.dumps(result.report, indent=2, default=_json_default) + "\n")
    return Path(outdir).absolute()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
