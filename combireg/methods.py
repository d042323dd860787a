"""What a method of ``combireg evaluate`` is: the ``NAME=SPEC`` grammar and its checks.

:func:`parse_method` parses ``--method NAME=SPEC`` into a :class:`MethodSpec` and checks what
can be checked before any cell runs (parameter files, a DRN model, the optional antspyx).

``SPEC`` is a comma-separated list of ``KEY:VALUE`` items::

    params:FILE      elastix-syntax parameter file (default: the built-in defaults)
    init:FIELD       initial forward field; "{case}" in FIELD is replaced by the case id,
                     e.g. init:out/cases/{case}/affine/field.nii.gz
    baseline:elastix elastix rigid -> affine -> B-spline (itk-elastix, pyramids in mm); with
                     params:FILE an elastix parameter file of one map or several (such as a
                     chain's params.txt; params/elastix_bspline.txt: B-spline only); no init
    baseline:syn     affine pre-alignment, then ITK's SyN with neighbourhood cross-correlation
                     (levels in mm); with params:FILE a SyN settings file (the params.txt a
                     ``baseline syn`` run writes)
    baseline:ants    ants.registration SyN (needs the optional package antspyx)
    drn:MODEL        a DRN (model file from ``combireg train``, or ``drn`` for the shipped
                     model) whose fields start the instance optimisation; with
                     ``(MaximumNumberOfIterations 0)`` in params:FILE, the DRN alone
    mask:exclude-lesion
                     cost-function masking with the manifest's lesion mask: the target's
                     lesion voxels do not count in the similarity (``run --target-mask``
                     with the mask's complement); needs the ``lesion`` column

A SPEC whose first item has no known ``KEY:`` prefix is a parameter file, so
``NAME=FILE`` means ``NAME=params:FILE`` and ``NAME=FILE,init:FIELD`` works too. Relative
paths are relative to the current directory. ``NAME`` is letters, digits and ``_.+-``.
New kinds of method register a key in :data:`SPEC_KEYS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters import BASELINES  # the names ``baseline:NAME`` can take
from .cases import NAME_PATTERN
from .errors import CombiregError

__all__ = ["SPEC_KEYS", "MethodSpec", "parse_method"]


@dataclass
class MethodSpec:
    """A parsed ``NAME=SPEC``.

    Attributes
    ----------
    name : str
    spec : str
        The SPEC text as given (stored in results.csv to recognise finished cells).
    params : Path or None
        Parameter file (None = built-in defaults).
    init : str or None
        Initial field path template (``{case}`` is replaced by the case id).
    baseline : str or None
        A classical baseline (``"elastix"``) instead of combireg's instance optimisation.
    drn : str or None
        A DRN model file (or ``"drn"``) initialising the optimisation.
    settings : Settings or None
        The validated combireg parameters (None for a baseline).
    """

    name: str
    spec: str
    params: Path | None = None
    init: str | None = None
    baseline: str | None = None
    drn: str | None = None
    exclude_lesion: bool = False
    settings: object = None

    def init_for(self, case_id: str) -> Path | None:
        """The initial field of one case, or None."""
        return None if self.init is None else Path(self.init.replace("{case}", case_id))


def _spec_params(method: MethodSpec, value: str) -> None:
    if method.params is not None:
        raise CombiregError(f"method {method.name!r}: 'params' given twice")
    method.params = Path(value)


def _spec_init(method: MethodSpec, value: str) -> None:
    if method.init is not None:
        raise CombiregError(f"method {method.name!r}: 'init' given twice")
    method.init = value




def _spec_baseline(method: MethodSpec, value: str) -> None:
    if method.baseline is not None:
        raise CombiregError(f"method {method.name!r}: 'baseline' given twice")
    if value.lower() not in BASELINES:
        raise CombiregError(f"method {method.name!r}: baseline {value!r} is not available "
                            f"(available: {', '.join(BASELINES)})")
    method.baseline = value.lower()
    if method.baseline == "ants":
        import importlib.util

        # Fail before any cell runs, not once per case.
        if importlib.util.find_spec("ants") is None:
            raise CombiregError(f"method {method.name!r}: baseline:ants needs the optional package antspyx "
                                f"(pip install antspyx)")


def _spec_drn(method: MethodSpec, value: str) -> None:
    if method.drn is not None:
        raise CombiregError(f"method {method.name!r}: 'drn' given twice")
    from .network import load_model

    load_model(value)  # a missing or foreign model file fails before any cell runs
    method.drn = value


def _spec_mask(method: MethodSpec, value: str) -> None:
    if value.strip().lower() != "exclude-lesion":
        raise CombiregError(f"method {method.name!r}: mask:{value} is not known (mask:exclude-lesion)")
    method.exclude_lesion = True


#: SPEC keys and their handlers; a new kind of method adds its key here.
SPEC_KEYS: dict[str, Callable[[MethodSpec, str], None]] = {
    "params": _spec_params,
    "init": _spec_init,
    "baseline": _spec_baseline,
    "drn": _spec_drn,
    "mask": _spec_mask,
}


def _split_item(item: str) -> tuple[str | None, str]:
    key, sep, value = item.partition(":")
    if sep and key.strip().lower() in SPEC_KEYS:
        return key.strip().lower(), value.strip()
    return None, item.strip()


def parse_method(text: str) -> MethodSpec:
    """Parse ``NAME=SPEC`` (grammar in the module docstring) and validate its parameter file.

    Raises
    ------
    CombiregError
        Bad syntax or name, an unknown or reserved key, a missing or invalid parameter file.
    """
    from .params import load_settings

    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise CombiregError(f"--method {text!r}: expected NAME=SPEC, e.g. mse=params/mse.txt")
    if not NAME_PATTERN.match(name):
        raise CombiregError(f"--method {text!r}: NAME must be letters, digits and _.+- (it names a folder)")
    method = MethodSpec(name, spec)
    for position, item in enumerate(spec.split(",")):
        if not item.strip():
            raise CombiregError(f"--method {text!r}: empty item in SPEC")
        key, value = _split_item(item)
        if key is None:
            if position > 0:
                raise CombiregError(f"--method {text!r}: unknown item {item.strip()!r} (known keys: "
                                    f"{', '.join(k + ':' for k in SPEC_KEYS)})")
            key = "params"
        if not value:
            raise CombiregError(f"--method {text!r}: '{key}:' needs a value")
        SPEC_KEYS[key](method, value)
    if method.params is not None and not method.params.is_file():
        raise CombiregError(f"method {name!r}: parameter file {method.params}: no such file")
    if method.drn is not None and method.init is not None:
        raise CombiregError(f"method {name!r}: give 'drn:' or 'init:', not both")
    if method.baseline is not None:
        if method.init is not None or method.drn is not None or method.exclude_lesion:
            raise CombiregError(f"method {name!r}: a baseline takes no 'init:', 'drn:' or 'mask:'")
        if method.params is not None:
            # validate up front
            if method.baseline == "elastix":
                from .adapters.elastix import read_parameter_maps

                read_parameter_maps(method.params)
            elif method.baseline == "syn":
                from .adapters.syn import read_syn_settings

                read_syn_settings(method.params)
            else:
                raise CombiregError(f"method {name!r}: baseline {method.baseline!r} takes no parameter file")
    else:
        method.settings = load_settings(method.params)
    return method
