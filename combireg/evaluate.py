"""The paper's evaluation protocol on a dataset (``combireg evaluate``).

Every method runs on every case of a manifest; each cell (case x method) is registered
in-process with :func:`combireg.api.register`, its outputs are saved to
``DIR/cases/<case>/<method>/`` (so ``combireg tre`` can be rerun on them) and its TRE is
computed from the saved forward field.

Manifest
    The CSV of :mod:`combireg.cases` (``id,source,target,target_landmarks,source_landmarks``
    and an optional ``lesion`` column): with a lesion mask, the results also give the TRE over
    the landmarks within :data:`NEAR_LESION_MM` of it (distance from the target landmark to the
    nearest lesion voxel centre, 0 inside).

Method SPEC (``--method NAME=SPEC``)
    ``SPEC`` is a comma-separated list of ``KEY:VALUE`` items::

        params:FILE      elastix-syntax parameter file (default: the built-in defaults)
        init:FIELD       initial forward field; "{case}" in FIELD is replaced by the case id,
                         e.g. init:out/cases/{case}/affine/field.nii.gz
        baseline:elastix elastix B-spline (itk-elastix); with params:FILE an elastix parameter
                         file (default: params/elastix_bspline.txt's map); no init
        baseline:syn     ITK's SyN with neighbourhood cross-correlation; with params:FILE a SyN
                         settings file (the params.txt a ``baseline syn`` run writes)
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

Outputs in ``DIR``
    ``results.csv``
        One row per case x method (:data:`RESULT_COLUMNS`): status, TRE statistics (mm),
        registration time, peak resident memory during the cell, % folding (non-positive
        Jacobian). A row is appended as soon as its cell finishes, so an interrupted run
        resumes: cells already ``ok`` with the same SPEC are skipped, failed cells rerun.
    ``summary.md``
        Per method, over its successful cases: mean ± std (across cases) of the per-case
        mean TRE and the median of the per-case median TRE, also pooled over all landmarks;
        the paired t-tests; failed cells.
    ``ttests.csv``
        Paired t-tests (``scipy.stats.ttest_rel``) on per-case mean TRE for each compared
        pair A:B over the cases both finished: mean difference A - B, its 95% confidence
        interval (t distribution), t and p.
    ``tre_boxplot.png``
        Box plot of the per-case mean TRE per method (and of the initial TRE).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .adapters import BASELINES  # the names ``baseline:NAME`` can take
from .cases import NAME_PATTERN, Case, load_case, read_manifest
from .errors import CombiregError
from .executor import dask_executor
from .outputs import prepare_resumable_dir

__all__ = [
    "RESULT_COLUMNS",
    "SPEC_KEYS",
    "MethodSpec",
    "Evaluation",
    "parse_method",
    "parse_comparisons",
    "run_cell",
    "run_evaluation",
    "read_results",
    "paired_t_test",
    "method_summary",
    "write_reports",
]

log = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.md"
TTESTS_NAME = "ttests.csv"
BOXPLOT_NAME = "tre_boxplot.png"
CASES_DIR = "cases"
CELL_TRE_CSV = "tre.csv"
CELL_TRE_JSON = "tre.json"

#: Columns of results.csv, in order.
RESULT_COLUMNS = (
    "case", "method", "status", "error", "spec", "n_landmarks",
    "tre_mean", "tre_std", "tre_median", "tre_p95", "tre_max",
    "initial_mean", "initial_std", "initial_median", "initial_p95", "initial_max", "robustness",
    "time_s", "cell_time_s", "peak_memory_mb", "folding_percent", "jacobian_min", "outdir",
    "n_near_lesion", "tre_near_lesion_mean", "initial_near_lesion_mean",
)
#: Landmarks at most this far (mm) from the manifest's lesion mask count as "near the lesion".
NEAR_LESION_MM = 20.0


# ====================================================================================== methods
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
                from .adapters.elastix import read_parameter_map

                read_parameter_map(method.params)
            elif method.baseline == "syn":
                from .adapters.syn import read_syn_settings

                read_syn_settings(method.params)
            else:
                raise CombiregError(f"method {name!r}: baseline {method.baseline!r} takes no parameter file")
    else:
        method.settings = load_settings(method.params)
    return method


def parse_comparisons(pairs: Sequence[str], methods: Sequence[MethodSpec]) -> list[tuple[str, str]]:
    """``A:B`` strings to method-name pairs; default: every other method against the first."""
    names = [m.name for m in methods]
    if not pairs:
        return [(names[0], other) for other in names[1:]]
    out = []
    for text in pairs:
        a, sep, b = text.partition(":")
        a, b = a.strip(), b.strip()
        if not sep or not a or not b:
            raise CombiregError(f"--compare {text!r}: expected A:B with two method names")
        for n in (a, b):
            if n not in names:
                raise CombiregError(f"--compare {text!r}: unknown method {n!r} (methods: {', '.join(names)})")
        if a == b:
            raise CombiregError(f"--compare {text!r}: compare two different methods")
        out.append((a, b))
    return out


# ====================================================================================== memory
def _reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_memory_mb(fallback: float) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float(fallback)


# ====================================================================================== cells
def _cell_dir(outdir: Path, case: Case, method: MethodSpec) -> Path:
    return outdir / CASES_DIR / case.id / method.name


def run_cell(case: Case, method: MethodSpec, outdir: str | os.PathLike, *, device: str = "cpu",
             landmark_space: str | None = None, cell_dir: str | os.PathLike | None = None) -> dict:
    """Register one case with one method, save its outputs and return its results row.

    The outputs go to ``cell_dir`` (default ``outdir/cases/<case>/<method>``); the row's
    ``outdir`` is that folder relative to ``outdir``.

    Raises
    ------
    CombiregError
        Missing files, bad landmarks, or a registration that fails.
    """
    from . import io
    from .api import register
    from .outputs import FIELD_NAME
    from .landmarks import compute_tre
    from .warp import jacobian_determinant

    start = time.perf_counter()
    init = method.init_for(case.id)
    if init is not None and not init.is_file():
        raise CombiregError(f"initial field {init}: no such file")
    source, target, target_lm, source_lm = load_case(case, landmark_space)
    lesion = io.read_image(case.lesion) if case.lesion is not None else None
    reset = _reset_peak_memory()
    if method.baseline is not None:
        from .adapters import run_baseline

        result = run_baseline(method.baseline, source, target, parameter_file=method.params)
    else:
        result = register(source, target, method.settings, init=method.drn if init is None else str(init),
                          device=device, target_mask=_lesion_exclusion(lesion, target) if method.exclude_lesion else None)
    peak = _peak_memory_mb(result.report["peak_memory_mb"]) if reset else result.report["peak_memory_mb"]
    result.report["tre"] = compute_tre(result.displacement_lps_mm, result.target_geometry,
                                       target_lm, source_lm).to_dict()
    result.report["evaluate"] = {"case": case.id, "method": method.name, "spec": method.spec,
                                 "cell_peak_memory_mb": round(peak, 1)}
    cell = _cell_dir(Path(outdir), case, method) if cell_dir is None else Path(cell_dir)
    result.save(cell, overwrite=True)
    displacement, geometry = io.read_displacement(cell / FIELD_NAME)
    tre = compute_tre(displacement, geometry, target_lm, source_lm)
    tre.write_csv(cell / CELL_TRE_CSV)
    tre.write_json(cell / CELL_TRE_JSON, field=str(cell / FIELD_NAME), case=case.id, method=method.name)
    jac = jacobian_determinant(displacement, geometry)
    stats = tre.statistics
    return {
        "case": case.id, "method": method.name, "status": "ok", "error": "", "spec": method.spec,
        "n_landmarks": stats["n"],
        **{f"tre_{k}": stats[k] for k in ("mean", "std", "median", "p95", "max")},
        **{f"initial_{k}": stats[f"initial_{k}"] for k in ("mean", "std", "median", "p95", "max")},
        "robustness": stats["robustness"],
        "time_s": result.report["wall_time_s"],
        "cell_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": round(peak, 1),
        "folding_percent": float(100.0 * np.count_nonzero(jac <= 0) / jac.size),
        "jacobian_min": float(jac.min()),
        "outdir": os.path.relpath(cell, outdir),
        **_near_lesion(lesion, tre),
    }


def lesion_distances(points_lps_mm: np.ndarray, lesion) -> np.ndarray:
    """Distance (mm) from each point to the nearest lesion voxel centre of a mask; 0 inside.

    Parameters
    ----------
    points_lps_mm : ndarray, (N, 3)
    lesion : Image
        Single-channel mask on any grid; voxels > 0.5 are lesion.

    Returns
    -------
    ndarray, (N,)
        Exact Euclidean distances (mm, via the world coordinates of the nearest lesion voxel
        found by a distance transform on the mask's grid); a point outside the mask's grid is
        measured from the nearest grid voxel's nearest lesion voxel.

    Raises
    ------
    CombiregError
        An empty mask.
    """
    from scipy import ndimage

    geometry = lesion.geometry
    mask = lesion.numpy()[0] > 0.5
    if not mask.any():
        raise CombiregError("the lesion mask is empty")
    # Why indices rather than distances: the transform runs in voxel units of an anisotropic,
    # possibly oblique grid; the nearest voxel's world point gives the distance in mm exactly.
    _, nearest = ndimage.distance_transform_edt(~mask, sampling=tuple(reversed(geometry.spacing)),
                                                return_indices=True)
    index = np.rint(geometry.world_to_index(np.asarray(points_lps_mm, dtype=np.float64))).astype(int)
    index = np.clip(index, 0, np.asarray(geometry.size) - 1)
    z, y, x = index[:, 2], index[:, 1], index[:, 0]
    nearest_zyx = np.stack([nearest[k][z, y, x] for k in range(3)], axis=1)
    nearest_world = geometry.index_to_world(nearest_zyx[:, ::-1].astype(np.float64))
    distance = np.linalg.norm(nearest_world - points_lps_mm, axis=1)
    return np.where(mask[z, y, x], 0.0, distance)


def _lesion_exclusion(lesion, target):
    """The complement of the case's lesion mask on the target grid (a target mask for register)."""
    import torch

    from .image import Image
    from .warp import resample_image

    if lesion is None:
        raise CombiregError("mask:exclude-lesion needs a lesion column in the manifest")
    lesion = resample_image(lesion, target.geometry, mode="nearest")
    return Image((lesion.data[:1] <= 0.5).to(torch.float32), target.geometry)


def _near_lesion(lesion, tre) -> dict:
    """The near-lesion columns of a results row (empty without a lesion mask)."""
    if lesion is None:
        return {}
    near = lesion_distances(tre.target_points, lesion) <= NEAR_LESION_MM
    count = int(near.sum())
    return {"n_near_lesion": count,
            "tre_near_lesion_mean": float(tre.errors_mm[near].mean()) if count else "",
            "initial_near_lesion_mean": float(tre.initial_errors_mm[near].mean()) if count else ""}


def _failed_row(case: Case, method: MethodSpec, message: str, seconds: float) -> dict:
    row = {c: "" for c in RESULT_COLUMNS}
    row.update(case=case.id, method=method.name, status="failed", error=" ".join(message.split()),
               spec=method.spec, cell_time_s=round(seconds, 3))
    return row


# ====================================================================================== results.csv
def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: _format(row.get(k, "")) for k in RESULT_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


def read_results(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """The rows of a results.csv, the last one per (case, method), numbers as floats."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = dict(raw)
            for key in RESULT_COLUMNS:
                value = row.get(key)
                if key not in ("case", "method", "status", "error", "spec", "outdir") and value not in (None, ""):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        pass
            rows[(row.get("case", ""), row.get("method", ""))] = row
    return rows


def _rewrite_results(path: Path, rows: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows.values():
            writer.writerow({k: _format(row.get(k, "")) for k in RESULT_COLUMNS})
    os.replace(tmp, path)


# ====================================================================================== statistics
def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired t-test of ``a`` vs ``b`` (scipy.stats.ttest_rel) with the mean difference a - b
    and its confidence interval from the t distribution. NaN where undefined (n < 2)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    n = int(d.size)
    out = {"n": n, "mean_a": float(a.mean()) if n else math.nan, "mean_b": float(b.mean()) if n else math.nan,
           "mean_difference": float(d.mean()) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "p_value": math.nan}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    out["ci_low"], out["ci_high"] = out["mean_difference"] - half, out["mean_difference"] + half
    if sd > 0:
        res = stats.ttest_rel(a, b)
        out["t"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pooled_errors(outdir: Path, rows: list[dict], column: str) -> np.ndarray:
    """Per-landmark errors of the given cells, read back from their tre.csv."""
    values = []
    for row in rows:
        path = outdir / str(row.get("outdir", "")) / CELL_TRE_CSV
        if not path.is_file():
            return np.array([])
        with open(path, newline="") as fh:
            values += [float(r[column]) for r in csv.DictReader(fh)]
    return np.asarray(values)


def method_summary(outdir: Path, rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec]) -> list[dict]:
    """One summary dict per method (and a first one for the initial TRE), over successful cases."""
    ids = [c.id for c in cases]
    out = []
    initial_rows = {}
    for m in methods:
        for cid in ids:
            r = rows.get((cid, m.name))
            if r and r.get("status") == "ok":
                initial_rows.setdefault(cid, r)
    entries = [("initial (identity)", [initial_rows[c] for c in ids if c in initial_rows], "initial")]
    entries += [(m.name, [rows[(c, m.name)] for c in ids if rows.get((c, m.name), {}).get("status") == "ok"], "tre")
                for m in methods]
    for name, ok, prefix in entries:
        per_case_mean = np.array([r[f"{prefix}_mean"] for r in ok], dtype=np.float64)
        per_case_median = np.array([r[f"{prefix}_median"] for r in ok], dtype=np.float64)
        pooled = _pooled_errors(outdir, ok, "initial_error_mm" if prefix == "initial" else "error_mm")
        mean, std = _mean_std(per_case_mean)
        pmean, pstd = (float(pooled.mean()), float(pooled.std())) if pooled.size else (math.nan, math.nan)
        summary = {
            "method": name, "cases_ok": len(ok), "cases": len(ids),
            "case_mean": mean, "case_std": std,
            "case_median": float(np.median(per_case_median)) if ok else math.nan,
            "landmark_mean": pmean, "landmark_std": pstd,
            "landmark_median": float(np.median(pooled)) if pooled.size else math.nan,
            "per_case_mean": per_case_mean.tolist(),
        }
        near = [(float(r["n_near_lesion"]), float(r[f"{prefix}_near_lesion_mean"])) for r in ok
                if _is_number(r.get("n_near_lesion")) and _is_number(r.get(f"{prefix}_near_lesion_mean"))]
        count = sum(n for n, _ in near)
        summary["near_lesion_n"] = int(count)
        # pooled over the cases' near landmarks: sum of n * mean over sum of n
        summary["near_lesion_mean"] = sum(n * m for n, m in near) / count if count else math.nan
        if prefix == "tre":
            for key in ("robustness", "time_s", "peak_memory_mb", "folding_percent"):
                vals = np.array([r[key] for r in ok if isinstance(r.get(key), float)])
                summary[key] = float(vals.mean()) if vals.size else math.nan
        out.append(summary)
    return out


def _comparisons(rows: dict, cases: Sequence[Case], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    tests = []
    for a, b in pairs:
        both = [c.id for c in cases
                if rows.get((c.id, a), {}).get("status") == "ok" and rows.get((c.id, b), {}).get("status") == "ok"]
        res = paired_t_test([rows[(c, a)]["tre_mean"] for c in both], [rows[(c, b)]["tre_mean"] for c in both])
        tests.append({"a": a, "b": b, **res})
    return tests


# ====================================================================================== reports
def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def summary_markdown(manifest: Path, summaries: list[dict], tests: list[dict], rows: dict,
                     cases: Sequence[Case], methods: Sequence[MethodSpec]) -> str:
    """The text of summary.md."""
    from .version import __version__

    with_lesion = any(c.lesion is not None for c in cases)
    lines = [
        "# combireg evaluate",
        "",
        f"Manifest `{manifest}`: {len(cases)} case(s), {len(methods)} method(s); combireg {__version__}.",
        "",
        "TRE_i = |x_i + u(x_i) - s_i| in mm (target landmark x_i mapped through the forward field, "
        "source landmark s_i). *Per case*: mean ± std over cases of each case's mean TRE, and the "
        "median over cases of each case's median TRE. *All landmarks*: pooled over the cases. "
        "Robustness: fraction of landmarks whose error went down (BraTS-Reg), mean over cases. "
        "Time: registration wall time; memory: peak resident memory during the case."
        + (f" Near the lesion: TRE pooled over the landmarks at most {NEAR_LESION_MM:g} mm from the manifest's "
           "lesion mask (distance from the target landmark to the nearest lesion voxel)." if with_lesion else ""),
        "",
        "## TRE per method",
        "",
        "| Method | Cases | TRE mean ± std (mm) | TRE median (mm) | All landmarks mean ± std (mm) "
        "| All landmarks median (mm) | Robustness | Time (s) | Peak memory (MB) | Folding (%) |"
        + (f" TRE within {NEAR_LESION_MM:g} mm of the lesion (mm) | Landmarks near the lesion |" if with_lesion else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_lesion else ""),
    ]
    for s in summaries:
        extra = [_fmt(s.get("robustness", math.nan), 3), _fmt(s.get("time_s", math.nan), 1),
                 _fmt(s.get("peak_memory_mb", math.nan), 0), _fmt(s.get("folding_percent", math.nan), 3)]
        if "robustness" not in s:
            extra = ["", "", "", ""]
        lines.append(f"| {s['method']} | {s['cases_ok']}/{s['cases']} | {_pm(s['case_mean'], s['case_std'])} | "
                     f"{_fmt(s['case_median'])} | {_pm(s['landmark_mean'], s['landmark_std'])} | "
                     f"{_fmt(s['landmark_median'])} | " + " | ".join(extra) + " |"
                     + (f" {_fmt(s['near_lesion_mean'])} | {s['near_lesion_n']} |" if with_lesion else ""))
    lines += ["", "## Paired t-tests (per-case mean TRE)", ""]
    if tests:
        lines += ["| A | B | Cases | Mean A (mm) | Mean B (mm) | Mean difference A − B (mm) | 95% CI (mm) | t | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            ci = "n/a" if math.isnan(t["ci_low"]) else f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]"
            lines.append(f"| {t['a']} | {t['b']} | {t['n']} | {_fmt(t['mean_a'], 3)} | {_fmt(t['mean_b'], 3)} | "
                         f"{_fmt(t['mean_difference'], 3)} | {ci} | {_fmt(t['t'], 3)} | {_p(t['p_value'])} |")
    else:
        lines.append("No pairs to compare (one method).")
    failed = [(c.id, m.name, rows[(c.id, m.name)].get("error", "")) for c in cases for m in methods
              if rows.get((c.id, m.name), {}).get("status") == "failed"]
    lines += ["", "## Failed cells", ""]
    lines += [f"- {cid} / {name}: {err}" for cid, name, err in failed] or ["None."]
    lines += ["", "## Methods", ""] + [f"- `{m.name}`: `{m.spec}`" for m in methods]
    return "\n".join(lines) + "\n"


def write_boxplot(path: Path, summaries: list[dict]) -> bool:
    """Box plot of per-case mean TRE per method; False (nothing written) when there is no data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = [(s["method"], s["per_case_mean"]) for s in summaries if s["per_case_mean"]]
    if not data:
        log.warning("no successful cases: no box plot written")
        return False
    fig = Figure(figsize=(max(4.0, 1.3 * len(data) + 1.5), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([v for _, v in data], showmeans=True)
    ax.set_xticks(range(1, len(data) + 1), [n for n, _ in data], rotation=20, ha="right")
    rng = np.random.default_rng(0)
    for i, (_, values) in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.08, 0.08, len(values)), values, "o", ms=3, alpha=0.6, color="tab:blue")
    ax.set_ylabel("per-case mean TRE (mm)")
    ax.set_title("TRE per method")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_tests_csv(path: Path, tests: list[dict]) -> None:
    keys = ["a", "b", "n", "mean_a", "mean_b", "mean_difference", "ci_low", "ci_high", "t", "p_value"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for t in tests:
            writer.writerow({k: _format(t[k]) for k in keys})


def write_reports(outdir: Path, manifest: Path, rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec],
                  pairs: Sequence[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """summary.md, ttests.csv and the box plot from the results; returns (summaries, tests)."""
    summaries = method_summary(outdir, rows, cases, methods)
    tests = _comparisons(rows, cases, pairs)
    (outdir / SUMMARY_NAME).write_text(summary_markdown(manifest, summaries, tests, rows, cases, methods))
    write_tests_csv(outdir / TTESTS_NAME, tests)
    write_boxplot(outdir / BOXPLOT_NAME, summaries)
    return summaries, tests


# ====================================================================================== driver
@dataclass
class Evaluation:
    """What :func:`run_evaluation` did and produced."""

    outdir: Path
    rows: dict
    summaries: list
    tests: list
    ran: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)

    @property
    def summary_path(self) -> Path:
        return self.outdir / SUMMARY_NAME


def _check_resumable(previous: dict, methods: Sequence[MethodSpec], outdir: Path) -> None:
    specs = {m.name: m.spec for m in methods}
    for (_, name), row in previous.items():
        if row.get("status") == "ok" and name in specs and row.get("spec") != specs[name]:
            raise CombiregError(f"{outdir / RESULTS_NAME}: method {name!r} finished earlier as {row.get('spec')!r}, "
                                f"now given as {specs[name]!r}; use another name or --overwrite")


def run_evaluation(manifest: str | os.PathLike, methods: Sequence[str | MethodSpec], outdir: str | os.PathLike, *,
                   compare: Sequence[str] = (), device: str = "cpu", landmark_space: str | None = None,
                   overwrite: bool = False, progress: Callable[[dict], None] | None = None,
                   workers: int | None = 1, threads_per_worker: int | None = None,
                   scheduler: str | None = None) -> Evaluation:
    """Run every method on every case of ``manifest`` and write the reports into ``outdir``.

    Parameters
    ----------
    manifest : path
    methods : ``NAME=SPEC`` strings or MethodSpec, at least one, unique names
    outdir : path
        Created if needed; a folder holding a results.csv is resumed.
    compare : ``A:B`` strings
        Paired t-tests; default: every method against the first.
    device : str
    landmark_space : {"lps", "ras", "index"}, optional
        Space of landmark files that do not declare theirs.
    overwrite : bool
        Start afresh: forget the previous results.csv (cell folders are replaced as they rerun).
    progress : callable, optional
        Called with ``{"event": "start"|"done", "case", "method", "status", "index", "total"}``
        (no ``"start"`` events when cells run in parallel).
    workers : int or None
        1 (default): the cells run one after another in this process, as always; use this for
        timed benchmarks, so that the cells do not compete for cores and memory. More (or
        None: as many as the cores allow) run the cells on a local dask cluster of that many
        worker processes (:func:`combireg.executor.dask_executor`).
    threads_per_worker : int, optional
        torch/ITK threads of each parallel cell (default: the cores divided among the workers).
    scheduler : str, optional
        Run the cells on the existing dask cluster at this address instead.

    Rows are written to results.csv by this process only, as the cells finish (in any order);
    the final rewrite puts them in manifest x method order.

    Raises
    ------
    CombiregError
        Bad manifest, methods, comparisons, output folder or an unreachable scheduler (before
        any cell runs). A failing cell is recorded as failed and the others go on.
    """
    from .landmarks import parse_space

    manifest = Path(manifest)
    outdir = Path(outdir).absolute()
    landmark_space = parse_space(landmark_space)
    cases = read_manifest(manifest)
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if not specs:
        raise CombiregError("give at least one --method NAME=SPEC")
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CombiregError(f"method name(s) given twice: {', '.join(dup)}")
    pairs = parse_comparisons(compare, specs)
    prepare_resumable_dir(outdir, RESULTS_NAME, overwrite=overwrite)
    results = outdir / RESULTS_NAME
    previous = {} if overwrite else read_results(results)
    _check_resumable(previous, specs, outdir)
    rows = dict(previous)
    ev = Evaluation(outdir, rows, [], [])
    total = len(cases) * len(specs)
    cells = [(index, case, method)
             for index, (case, method) in enumerate(((c, m) for c in cases for m in specs), start=1)]
    pending = []
    for index, case, method in cells:
        done = rows.get((case.id, method.name))
        if done and done.get("status") == "ok" and done.get("spec") == method.spec:
            ev.skipped += 1
            if progress:
                progress({"case": case.id, "method": method.name, "index": index, "total": total,
                          "event": "done", "status": "skipped"})
        else:
            pending.append((index, case, method))

    def record(index: int, case: Case, method: MethodSpec, row: dict) -> None:
        _append_row(results, row)  # only here, in this process, whatever order cells finish in
        rows[(case.id, method.name)] = row
        ev.ran += 1
        if row["status"] != "ok":
            ev.failed.append((case.id, method.name, row["error"]))
        if progress:
            progress({"case": case.id, "method": method.name, "index": index, "total": total,
                      "event": "done", "status": row["status"]})

    parallel = scheduler is not None or workers is None or int(workers) > 1
    with contextlib.ExitStack() as stack:
        executor = None
        if parallel and pending:
            # Connected (or started) before anything is written: an unreachable scheduler leaves no trace.
            executor = stack.enter_context(dask_executor(None if scheduler else workers, threads_per_worker,
                                                         scheduler, tasks=len(pending)))
        outdir.mkdir(parents=True, exist_ok=True)
        if overwrite and results.exists():
            results.unlink()
        if executor is None:
            for index, case, method in pending:
                if progress:
                    progress({"case": case.id, "method": method.name, "index": index, "total": total,
                              "event": "start", "status": "running"})
                record(index, case, method, _run_one(case, method, outdir, device, landmark_space))
        else:
            futures = {executor.submit(_run_one, case, method, outdir, device, landmark_space,
                                       name=f"{case.id}-{method.name}"): (index, case, method)
                       for index, case, method in pending}
            for future in executor.as_completed(futures):
                index, case, method = futures[future]
                try:
                    row = future.result()
                except Exception as exc:  # the worker died (KilledWorker) or the task was cancelled
                    row = _failed_row(case, method, f"{type(exc).__name__}: {exc}", 0.0)
                record(index, case, method, row)
    _rewrite_results(results, _in_cell_order(read_results(results), cases, specs))
    ev.rows = read_results(results)
    ev.summaries, ev.tests = write_reports(outdir, manifest, ev.rows, cases, specs, pairs)
    return ev


def _in_cell_order(rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec]) -> dict:
    """The rows of this run's cells in manifest x method order, then any others as they were."""
    order = {(c.id, m.name): i for i, (c, m) in enumerate((c, m) for c in cases for m in methods)}
    return dict(sorted(rows.items(), key=lambda item: order.get(item[0], len(order))))


def _run_one(case: Case, method: MethodSpec, outdir: Path, device: str, landmark_space: str | None) -> dict:
    start = time.perf_counter()
    try:
        return run_cell(case, method, outdir, device=device, landmark_space=landmark_space)
    except CombiregError as exc:
        log.warning("%s / %s failed: %s", case.id, method.name, exc)
        return _failed_row(case, method, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a bug or an unexpected library error: record it, keep going
        log.warning("%s / %s failed with %s: %s", case.id, method.name, type(exc).__name__, exc, exc_info=True)
        return _failed_row(case, method, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)

