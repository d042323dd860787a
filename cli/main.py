"""``combireg`` command group.

Each sub-command lives in its own module and only parses, calls one library function and
presents the result. User errors (:class:`combireg.errors.CombiregError`) become one line on
stderr and exit code 2.
"""
from __future__ import annotations

import logging
import sys

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

if __name__ == "__main__":  # pragma: no cover
    main()
