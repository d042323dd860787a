"""``combireg`` command group.

Each sub-command lives in its own module and only parses, calls one library function and
presents the result. User errors (:class:`combireg.errors.CombiregError`) become one line on
stderr and exit code 2.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

import click

from combireg.errors import CombiregError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CombiregError as exc:
            click.echo(f"combireg: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("combireg: interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="combireg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """combireg: deformable 3-D registration by simultaneous optimisation of MSE and NCC."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    from . import baseline_cmd, compare_cmd, evaluate_cmd, params_cmd, preprocess_cmd, run_cmd, synth_cmd, tre_cmd

    main.add_command(run_cmd.run)
    main.add_command(params_cmd.params)
    main.add_command(synth_cmd.synth)
    main.add_command(tre_cmd.tre)
    main.add_command(evaluate_cmd.evaluate)
    main.add_command(baseline_cmd.baseline)
    main.add_command(compare_cmd.compare)
    main.add_command(preprocess_cmd.preprocess)

    from . import train_cmd  # the DRN (issue 5)
    main.add_command(train_cmd.train)

    from . import batch_cmd  # many cases on a dask cluster (issue 7)
    main.add_command(batch_cmd.batch)

    from . import apply_cmd  # carry images and landmarks through a field (issue 14)
    main.add_command(apply_cmd.apply)


_register_commands()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # what glibc accepts on 64-bit systems


def _keep_freed_memory() -> None:
    """Ask glibc's malloc to reuse freed memory instead of returning it to the system.

    Why: glibc's threshold for giving a block its own mapping starts at 128 kB and only rises as
    blocks are freed, and free memory at the top of the heap is handed back; a block that comes
    back is then faulted in page by page again, and on a 2-core VM a first touch cost ~0.8 s per
    GB (measured). Fixing the threshold at its largest value (32 MB) and never trimming made a
    1 mm ``combireg run`` 1.1 s faster (mean of three: 14.9 s against 16.0 s) at the same peak
    memory (2.1 GB); turning mappings off altogether was as fast but raised the peak by up to 44 %.
    Elsewhere than glibc (or if the call fails) nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):  # not glibc
        pass


def _other_threads() -> bool:
    """Whether a thread the interpreter would wait for (not a daemon) is still running."""
    main_thread = threading.main_thread()
    return any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate())


def console_main() -> None:
    """The ``combireg`` console script: :func:`main`, then an exit that skips the interpreter's teardown.

    Why: after a 1 mm ``combireg run`` the interpreter spent about 1 s freeing the modules and
    objects of torch and ITK (measured: 0.95 s between the last atexit handler and the exit of
    the process) for a process that is about to end. Every atexit handler still runs and the
    streams are flushed first; with any thread still alive, or on an unexpected error (a
    traceback), the ordinary exit is kept (daemon threads, such as tqdm's monitor, end with
    the process either way).
    """
    _keep_freed_memory()
    try:
        main()
    except SystemExit as exc:
        code = exc.code
        if not (code is None or isinstance(code, int)) or _other_threads():
            raise
    else:  # pragma: no cover - click's standalone mode always ends in SystemExit
        code = 0
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    console_main()
