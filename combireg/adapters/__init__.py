"""Other registration methods behind combireg's inputs and outputs.

Each adapter registers a source to a target with another tool and returns an object whose
``save(outdir)`` writes exactly the files of ``combireg run`` (``field.nii.gz``,
``field_inverse.nii.gz``, ``warped_<k>.nii.gz``, ``params.txt``, ``report.json``), so that
evaluation and benchmark tools treat every method alike.

* :mod:`combireg.adapters.elastix`: itk-elastix's rigid -> affine -> B-spline chain
  (:func:`~combireg.adapters.elastix.register_elastix`).
* :mod:`combireg.adapters.syn`: an affine pre-alignment, then ITK's own SyN with neighbourhood
  cross-correlation (:func:`~combireg.adapters.syn.register_syn`).

Both are given what their users normally run (a rigid/affine stage first) and pyramid levels in
millimetres, like combireg's own, so that comparisons stay fair on every grid.
* :mod:`combireg.adapters.ants`: ``ants.registration`` from the optional package antspyx
  (:func:`~combireg.adapters.ants.register_ants`).
"""
from __future__ import annotations

import os

from ..errors import CombiregError

#: Baselines by name, for ``combireg evaluate``'s ``baseline:NAME`` and ``combireg compare``.
BASELINES = ("elastix", "syn", "ants")


def run_baseline(name: str, source, target, *, parameter_file: str | os.PathLike | None = None):
    """Register with the baseline ``name`` (one of :data:`BASELINES`); returns its result object.

    Raises
    ------
    CombiregError
        Unknown name, a parameter file for a baseline that takes none (ants), or the method failed.
    """
    name = name.lower()
    if name == "elastix":
        from .elastix import register_elastix

        return register_elastix(source, target, parameter_file=parameter_file)
    if name not in BASELINES:
        raise CombiregError(f"unknown baseline {name!r} (available: {', '.join(BASELINES)})")
    if name == "syn":
        from .syn import register_syn

        return register_syn(source, target, settings=parameter_file)
    if parameter_file is not None:
        raise CombiregError(f"baseline {name!r} takes no parameter file")
    from .ants import register_ants

    return register_ants(source, target)
