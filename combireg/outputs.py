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
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import CombiregError

__all__ = ["FIELD_NAME", "INVERSE_FIELD_NAME", "PARAMS_NAME", "REPORT_NAME", "CORRESPONDENCE_WEIGHT_NAME", "warped_name",
           "OUTPUT_KINDS", "output_kinds", "OutputWriter", "write_outputs", "write_result", "prepare_output_dir",
           "prepare_resumable_dir", "atomic_output_dir"]

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
class OutputWriter:
    """The output files of a registration, each written in a background thread as soon as it is
    handed over, into a folder that appears whole at the end (or not at all).

    Why: writing a 1 mm result (gzip, ITK's NIfTI writer) costs about 2.5 s of CPU, mostly in
    zlib, which releases the GIL; handed over as the fields are ready, the files are written
    while the run computes the rest (the warp, the report's statistics, the self-check, the TRE)
    instead of after it.

    Use as a context manager; :meth:`finish` writes ``params.txt`` and ``report.json`` once every
    file is written, and the folder replaces ``outdir`` when the block ends without an error.
    An error (Ctrl-C included) waits for the file being written and removes everything::

        with OutputWriter(outdir, overwrite=True) as writer:
            writer.field(u, geometry)          # returns at once
            ...
            writer.finish(params_text, report)

    Parameters
    ----------
    outdir : path
        Checked at once (:func:`prepare_output_dir`).
    overwrite : bool
    outputs : None, str or sequence of str
        The kinds to write (:func:`output_kinds`); the others are ignored when handed over.
    """

    def __init__(self, outdir: str | os.PathLike, *, overwrite: bool = False, outputs=None) -> None:
        self.outdir = prepare_output_dir(outdir, overwrite=overwrite)
        self.overwrite = overwrite
        self.kinds = output_kinds(outputs)
        self._context = None
        self._pool = None
        self._futures = []
        self._finished = False
        self.folder = None  # the temporary folder while the block runs

    def __enter__(self) -> "OutputWriter":
        self._context = atomic_output_dir(self.outdir, overwrite=self.overwrite)
        self.folder = self._context.__enter__()
        # Two writers: on a 2-core machine a third only competes with the computation.
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None and not self._finished:
            error = RuntimeError("OutputWriter left without finish(): nothing was written")
            self._context.__exit__(RuntimeError, error, None)  # removes the folder
            raise error
        return self._context.__exit__(exc_type, exc, tb)

    def _submit(self, function, *args) -> None:
        self._futures.append(self._pool.submit(function, *args))

    def field(self, displacement_lps_mm: np.ndarray, geometry) -> None:
        """:data:`FIELD_NAME`: the forward field (Z, Y, X, 3) on the target grid."""
        from . import io

        if "field" in self.kinds:
            self._submit(io.write_displacement, self.folder / FIELD_NAME, displacement_lps_mm, geometry)

    def inverse(self, displacement_lps_mm: np.ndarray | None, geometry) -> None:
        """:data:`INVERSE_FIELD_NAME`: the backward field on the source grid (None: nothing)."""
        from . import io

        if "inverse" in self.kinds and displacement_lps_mm is not None:
            self._submit(io.write_displacement, self.folder / INVERSE_FIELD_NAME, displacement_lps_mm, geometry)

    def warped(self, image) -> None:
        """:func:`warped_name` per channel of the warped source (an Image; None: nothing)."""
        from . import io

        if "warped" in self.kinds and image is not None:
            for k in range(image.num_channels):
                # Stored, not deflated (gzip level 0, like the fields): a warped brain shrank by
                # only ~16 % at level 1, for ~0.45 s of CPU per 1 mm channel at the end of the run.
                self._submit(partial(io.write_image, compression_level=0), self.folder / warped_name(k),
                             image.channel(k))

    def correspondence_weight(self, image) -> None:
        """:data:`CORRESPONDENCE_WEIGHT_NAME` (an Image; None: nothing)."""
        from . import io

        if image is not None:
            self._submit(io.write_image, self.folder / CORRESPONDENCE_WEIGHT_NAME, image)

    def finish(self, params_text: str, report: dict) -> Path:
        """Wait for every file, then write :data:`PARAMS_NAME` and :data:`REPORT_NAME`; returns
        the destination (which appears when the ``with`` block ends)."""
        for future in self._futures:
            future.result()
        (self.folder / PARAMS_NAME).write_text(params_text)
        (self.folder / REPORT_NAME).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        self._finished = True
        return self.outdir


def write_outputs(outdir: str | os.PathLike, result: Any, params_text: str, *, overwrite: bool = False,
                  outputs=None) -> Path:
    """Write the output files of a registration method (the contract of ``combireg run``).

    ``result`` has ``displacement_lps_mm``, ``target_geometry``, ``inverse_displacement_lps_mm``,
    ``source_geometry``, ``warped`` and ``report`` (a :class:`combireg.api.Result` or a baseline's result), so
    every method writes the same files the same way; a ``correspondence_weight`` Image, where
    the result has one that is not None, is written as ``correspondence_weight.nii.gz``. Written
    whole or not at all (:class:`OutputWriter`). ``outputs`` (see :func:`output_kinds`; default
    every kind) leaves out the kinds not named, and an inverse or warped image the result does
    not hold (None).
    """
    with OutputWriter(outdir, overwrite=overwrite, outputs=outputs) as writer:
        write_result(writer, result)
        writer.finish(params_text, result.report)
    return Path(outdir).absolute()


def write_result(writer: OutputWriter, result: Any) -> None:
    """Hand every image of ``result`` (see :func:`write_outputs`) to ``writer``."""
    writer.field(result.displacement_lps_mm, result.target_geometry)
    writer.inverse(result.inverse_displacement_lps_mm, result.source_geometry)
    writer.warped(result.warped)
    writer.correspondence_weight(getattr(result, "correspondence_weight", None))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
