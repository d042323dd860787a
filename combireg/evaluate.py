"""The paper's evaluation protocol on a dataset (``combireg evaluate``).

Every method runs on every case of a dataset; each cell (case x method) is registered
in-process with :func:`combireg.api.register`, its outputs are saved to
``DIR/cases/<case>/<method>/`` (so ``combireg tre`` can be rerun on them) and its TRE (cases
with landmarks) and label overlap (cases with label maps) are computed from the saved forward
field.

Dataset
    Any layout of :mod:`combireg.cases`: a manifest CSV (``id,source,target`` and optional
    ``target_landmarks,source_landmarks``, ``target_labels,source_labels``,
    ``target_mask,source_mask`` and ``lesion`` columns), a BraTS-Reg folder or a Learn2Reg
    dataset JSON. With a lesion mask, the results also give the TRE over the landmarks within
    :data:`~combireg.summary.NEAR_LESION_MM` of it (distance from the target landmark to the
    nearest lesion voxel centre, 0 inside). With label maps, the source's is carried into
    target space by nearest neighbour (:func:`combireg.apply.warp_array`) and scored against
    the target's by :mod:`combireg.overlap` (Dice per label, HD95 in mm, before and after).
    A case's masks restrict combireg's similarity as ``run --target-mask/--source-mask``
    (the baselines do not take masks).

Method SPEC (``--method NAME=SPEC``)
    The grammar of :mod:`combireg.methods`: a parameter file, optionally with ``init:FIELD``
    or ``drn:MODEL`` and ``mask:exclude-lesion``, or ``baseline:elastix|syn|ants``.

Outputs in ``DIR``
    ``cases/<case>/<method>/``: each cell's outputs (those of ``combireg run``) with its
    ``tre.csv``/``tre.json`` and ``dice.csv`` where there are landmarks and labels;
    ``results.csv``, ``summary.md``, ``ttests.csv`` and the box plots as
    :mod:`combireg.summary` describes them. A row is appended to
    results.csv as soon as its cell finishes, so an interrupted run resumes: cells already
    ``ok`` with the same SPEC are skipped, failed cells rerun.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .cases import Case, load_case, read_cases
from .errors import CombiregError
from .executor import dask_executor
from .methods import MethodSpec, parse_method
from .outputs import prepare_resumable_dir
from .summary import (
    CELL_DICE_CSV,
    CELL_TRE_CSV,
    NEAR_LESION_MM,
    RESULTS_NAME,
    SUMMARY_NAME,
    append_row,
    failed_row,
    parse_comparisons,
    read_results,
    rewrite_results,
    write_reports,
)

__all__ = [
    "Evaluation",
    "run_cell",
    "run_evaluation",
    "lesion_distances",
    "label_scores",
]

log = logging.getLogger(__name__)

CASES_DIR = "cases"
CELL_TRE_JSON = "tre.json"


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
    ``outdir`` is that folder relative to ``outdir``. The TRE columns are empty for a case
    without landmarks, the Dice columns for a case without label maps.

    Raises
    ------
    CombiregError
        Missing files, bad landmarks or label maps, or a registration that fails.
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

        if case.target_mask is not None or case.source_mask is not None:
            log.info("%s / %s: the baselines take no masks; the case's masks are not used", case.id, method.name)
        result = run_baseline(method.baseline, source, target, parameter_file=method.params)
    else:
        target_mask = _lesion_exclusion(lesion, target) if method.exclude_lesion else None
        target_mask = _both_masks(target_mask, case.target_mask, target)
        result = register(source, target, method.settings, init=method.drn if init is None else str(init),
                          device=device, target_mask=target_mask, source_mask=case.source_mask)
    peak = _peak_memory_mb(result.report["peak_memory_mb"]) if reset else result.report["peak_memory_mb"]
    if target_lm is not None:
        result.report["tre"] = compute_tre(result.displacement_lps_mm, result.target_geometry,
                                           target_lm, source_lm).to_dict()
    overlap = None
    if case.has_labels:
        labels, overlap = label_scores(case, result.displacement_lps_mm, result.target_geometry)
        result.report["overlap"] = {"summary": overlap, "labels": labels}
    result.report["evaluate"] = {"case": case.id, "method": method.name, "spec": method.spec,
                                 "cell_peak_memory_mb": round(peak, 1)}
    cell = _cell_dir(Path(outdir), case, method) if cell_dir is None else Path(cell_dir)
    result.save(cell, overwrite=True)
    displacement, geometry = io.read_displacement(cell / FIELD_NAME)
    jac = jacobian_determinant(displacement, geometry)
    row = {
        "case": case.id, "method": method.name, "status": "ok", "error": "", "spec": method.spec,
        "time_s": result.report["wall_time_s"],
        "cell_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": round(peak, 1),
        "folding_percent": float(100.0 * np.count_nonzero(jac <= 0) / jac.size),
        "jacobian_min": float(jac.min()),
        "outdir": os.path.relpath(cell, outdir),
    }
    if target_lm is not None:
        tre = compute_tre(displacement, geometry, target_lm, source_lm)
        tre.write_csv(cell / CELL_TRE_CSV)
        tre.write_json(cell / CELL_TRE_JSON, field=str(cell / FIELD_NAME), case=case.id, method=method.name)
        stats = tre.statistics
        row.update({"n_landmarks": stats["n"],
                    **{f"tre_{k}": stats[k] for k in ("mean", "std", "median", "p95", "max")},
                    **{f"initial_{k}": stats[f"initial_{k}"] for k in ("mean", "std", "median", "p95", "max")},
                    "robustness": stats["robustness"], **_near_lesion(lesion, tre)})
    if overlap is not None:
        _write_rows(cell / CELL_DICE_CSV, result.report["overlap"]["labels"])
        row.update(overlap)
    return row


def label_scores(case: Case, displacement_lps_mm: np.ndarray, geometry) -> tuple[list[dict], dict]:
    """Dice and HD95 of a case's label maps through a forward field, per label and in summary.

    The source's label map is carried onto the target label map's grid by nearest neighbour
    through the field (:func:`combireg.apply.warp_array`; the field is interpolated there when
    the label map lies on another grid than the field) and, for the ``initial_`` numbers,
    without it (the identity). Labels: those present in both label maps.

    Returns
    -------
    rows : list of dict
        :func:`combireg.overlap.label_overlap`.
    summary : dict
        :func:`combireg.overlap.overlap_summary` (``n_labels``, ``dice_mean``, ``hd95_mean`` and
        their ``initial_`` values).
    """
    from . import io
    from .apply import warp_array
    from .overlap import label_overlap, labels_in_both, overlap_summary

    target_labels, target_geometry = io.read_array(case.target_labels)
    source_labels, source_geometry = io.read_array(case.source_labels)
    labels = labels_in_both(target_labels, source_labels)
    if not labels:
        log.warning("%s: the label maps %s and %s share no label", case.id, case.target_labels.name,
                    case.source_labels.name)
    warped = warp_array(source_labels, source_geometry, displacement_lps_mm, geometry, interpolation="nearest",
                        output_geometry=target_geometry, name=str(case.source_labels)).array
    identity = np.zeros(target_geometry.shape + (3,), np.float32)
    initial = warp_array(source_labels, source_geometry, identity, target_geometry, interpolation="nearest",
                         require_overlap=False).array
    rows = label_overlap(target_labels, warped, target_geometry, labels, initial=initial)
    return rows, overlap_summary(rows)


def _write_rows(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["label"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _both_masks(first, mask_path: Path | None, target):
    """A computed target mask and the case's mask file, combined (voxels inside both)."""
    if mask_path is None:
        return first
    from .image import Image
    from .preprocess import load_mask

    mask = load_mask(mask_path, target.geometry, role="target")
    return mask if first is None else Image(mask.data * first.data, mask.geometry)


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


# ====================================================================================== driver
@dataclass
class Evaluation:
    """What :func:`run_evaluation` did and produced."""

    outdir: Path
    rows: dict
    summaries: list
    tests: list
    dice_summaries: list = field(default_factory=list)
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


def run_evaluation(dataset: str | os.PathLike, methods: Sequence[str | MethodSpec], outdir: str | os.PathLike, *,
                   compare: Sequence[str] = (), device: str = "cpu", landmark_space: str | None = None,
                   overwrite: bool = False, progress: Callable[[dict], None] | None = None,
                   workers: int | None = 1, threads_per_worker: int | None = None,
                   scheduler: str | None = None, pairs: str | None = None) -> Evaluation:
    """Run every method on every case of ``dataset`` and write the reports into ``outdir``.

    Parameters
    ----------
    dataset : path
        A manifest CSV, a BraTS-Reg folder or a Learn2Reg dataset JSON (:func:`combireg.cases.read_cases`).
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
    pairs : str, optional
        Learn2Reg: which pairs (``val``, ``test``, ``training`` or a CSV file of pairs).

    Rows are written to results.csv by this process only, as the cells finish (in any order);
    the final rewrite puts them in dataset x method order.

    Raises
    ------
    CombiregError
        Bad dataset, methods, comparisons, output folder or an unreachable scheduler (before
        any cell runs). A failing cell is recorded as failed and the others go on.
    """
    from .landmarks import parse_space

    dataset = Path(dataset)
    outdir = Path(outdir).absolute()
    landmark_space = parse_space(landmark_space)
    cases = read_cases(dataset, pairs=pairs)
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if not specs:
        raise CombiregError("give at least one --method NAME=SPEC")
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CombiregError(f"method name(s) given twice: {', '.join(dup)}")
    comparisons = parse_comparisons(compare, specs)
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
        append_row(results, row)  # only here, in this process, whatever order cells finish in
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
                    row = failed_row(case, method, f"{type(exc).__name__}: {exc}", 0.0)
                record(index, case, method, row)
    rewrite_results(results, _in_cell_order(read_results(results), cases, specs))
    ev.rows = read_results(results)
    ev.summaries, ev.dice_summaries, ev.tests = write_reports(outdir, dataset, ev.rows, cases, specs, comparisons)
    return ev


def _in_cell_order(rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec]) -> dict:
    """The rows of this run's cells in dataset x method order, then any others as they were."""
    order = {(c.id, m.name): i for i, (c, m) in enumerate((c, m) for c in cases for m in methods)}
    return dict(sorted(rows.items(), key=lambda item: order.get(item[0], len(order))))


def _run_one(case: Case, method: MethodSpec, outdir: Path, device: str, landmark_space: str | None) -> dict:
    start = time.perf_counter()
    try:
        return run_cell(case, method, outdir, device=device, landmark_space=landmark_space)
    except CombiregError as exc:
        log.warning("%s / %s failed: %s", case.id, method.name, exc)
        return failed_row(case, method, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a bug or an unexpected library error: record it, keep going
        log.warning("%s / %s failed with %s: %s", case.id, method.name, type(exc).__name__, exc, exc_info=True)
        return failed_row(case, method, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)

