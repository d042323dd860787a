"""``combireg params``: validate parameter files and print the defaults."""
from __future__ import annotations

import click

from combireg.paramfile import read_parameter_file
from combireg.params import Settings, default_parameter_text, settings_from_map


def summary_line(source: str, n_keys: int, settings: Settings) -> str:
    """One-line description of valid settings, as printed by ``combireg params check``.

    Parameters
    ----------
    source : str
        The file name as the user gave it.
    n_keys : int
        Number of keys in the file.
    settings : Settings
        The validated settings.

    Returns
    -------
    str
        E.g. ``p.txt: OK (3 keys; metrics MSE+NCC 0.5/0.5, 2 resolutions, iterations 150 60)``;
        a transform other than the default displacement is named at the end
        (``..., iterations 150 80 30, Diffeomorphic transform)``).
    """
    weights = "/".join(f"{w:.4g}" for w in settings.metric_weights)
    levels = settings.num_levels
    model = "" if settings.transform == "Displacement" else f", {settings.transform} transform"
    return (
        f"{source}: OK ({n_keys} key{'s' if n_keys != 1 else ''}; "
        f"metrics {'+'.join(settings.metrics)} {weights}, "
        f"{levels} resolution{'s' if levels != 1 else ''}, "
        f"iterations {' '.join(str(n) for n in settings.iterations)}{model})"
    )


@click.group("params")
def params() -> None:
    """Inspect elastix-style parameter files."""


@params.command("check", short_help="Validate a parameter file.")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
def check(file: str) -> None:
    """Validate FILE and summarise the settings it gives (keys not in FILE take defaults)."""
    # Existence and readability are left to the library so that errors share one format.
    pm = read_parameter_file(file)
    settings = settings_from_map(pm, source=file)
    click.echo(summary_line(file, len(pm), settings))


@params.command("defaults", short_help="Print the default parameter file.")
def defaults() -> None:
    """Print the default parameter file, with a comment describing each key."""
    click.echo(default_parameter_text(), nl=False)
