"""Output directories that appear whole or not at all.

Every command that writes a folder (``run``, ``synth``, the baselines) checks it up front with
:func:`prepare_output_dir` and writes through :func:`atomic_output_dir`: files go into a
temporary folder beside the destination, which replaces it only once everything is written;
any exception, Ctrl-C included, removes the temporary folder (and parent folders this call
created), so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CombiregError

__all__ = ["prepare_output_dir", "prepare_resumable_dir", "atomic_output_dir"]


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
