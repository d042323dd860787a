"""``combireg compare``: combireg and the classical baselines on one pair, side by side.

Every method gets the same inputs, writes the same outputs (the contract of ``combireg run``)
and is scored the same way, by :func:`combireg.evaluate.run_cell`: TRE from its saved forward
field, robustness, registration wall time, peak resident memory during the method, and % of
folded voxels (non-positive Jacobian).

Outputs in ``DIR``
    ``<method>/``
        The method's outputs (``field.nii.gz``, ``field_inverse.nii.gz``, ``warped_<k>.nii.gz``,
        ``params.txt``, ``report.json``) plus its per-landmark ``tre.csv`` / ``tre.json``.
    ``compare.md``, ``compare.json``
        The table (Markdown) and the same numbers with the inputs (JSON).
    ``qc.png``
        Target and each method's warped source (first channel) through three orthogonal slices
        at the largest initial source/target disagreement (the lesion, in pre/post-operative
        pairs), with a target/warped checkerboard beside each.

The folder appears whole or not at all; a method that fails is reported as failed in the
table and the others go on.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import CombiregError

__all__ = ["compare_pair", "Comparison", "METHODS", "DEFAULT_METHODS", "TABLE_NAME", "JSON_NAME", "QC_NAME"]

log = logging.getLogger(__name__)

#: Methods ``compare`` can run: combireg (a parameter file, default preset) and the baselines.
METHODS = ("combireg", "elastix", "syn", "ants")
#: What runs unless asked otherwise (ants only where the optional antspyx is installed).
DEFAULT_METHODS = ("combireg", "elastix", "syn")
TABLE_NAME = "compare.md"
JSON_NAME = "compare.json"
QC_NAME = "qc.png"
_CASE_ID = "pair"


@dataclass
class Comparison:
    """What :func:`compare_pair` produced: one results row per method (see
    :data:`combireg.summary.RESULT_COLUMNS`), the Markdown table and where everything was written."""

    outdir: Path
    rows: list
    table: str
    failed: list = field(default_factory=list)


def _method_specs(methods: Sequence[str], params: str | os.PathLike | None,
                  baseline_params: dict):
    from .methods import MethodSpec, parse_method
    from .params import load_settings

    specs = []
    for name in methods:
        key = name.strip().lower()
        if key not in METHODS:
            raise CombiregError(f"unknown method {name!r} (available: {', '.join(METHODS)})")
        if key in [s.name for s in specs]:
            raise CombiregError(f"method {key!r} given twice")
        if key == "combireg":
            settings = load_settings(params)
            spec = f"params:{params}" if params is not None else "params:<defaults>"
            specs.append(MethodSpec("combireg", spec, params=None if params is None else Path(params),
                                    settings=settings))
        elif baseline_params.get(key) is not None:
            specs.append(parse_method(f"{key}=baseline:{key},params:{baseline_params[key]}"))
        else:
            specs.append(parse_method(f"{key}=baseline:{key}"))  # checks antspyx up front
    if not specs:
        raise CombiregError("give at least one method")
    return specs


def compare_pair(source: str | Sequence[str], target: str | Sequence[str], target_landmarks: str | os.PathLike,
                 source_landmarks: str | os.PathLike, outdir: str | os.PathLike, *,
                 methods: Sequence[str] = DEFAULT_METHODS, params: str | os.PathLike | None = None,
                 elastix_params: str | os.PathLike | None = None, syn_params: str | os.PathLike | None = None,
                 landmark_space: str | None = None, device: str = "cpu", overwrite: bool = False,
                 progress: Callable[[dict], None] | None = None) -> Comparison:
    """Register one pair with combireg and the baselines and compare them.

    Parameters
    ----------
    source, target : path, comma-separated paths or list of paths
        The pair (same number of channels on both sides).
    target_landmarks, source_landmarks : path
        Corresponding landmarks (any format :func:`combireg.landmarks.read_landmarks` reads).
    outdir : path
        Output folder (must be empty unless ``overwrite``).
    methods : sequence of str
        From :data:`METHODS`; default :data:`DEFAULT_METHODS`.
    params : path, optional
        combireg's parameter file (default: the built-in defaults = ``params/default.txt``).
    elastix_params : path, optional
        elastix parameter file of the elastix baseline, one map or several (default: the rigid ->
        affine -> B-spline chain of :func:`combireg.adapters.elastix.register_elastix`).
    syn_params : path, optional
        Settings file of the SyN baseline (default: :class:`combireg.adapters.syn.SynSettings`).
    landmark_space : {"lps", "ras", "index"}, optional
    device : str
        combireg's torch device.
    overwrite : bool
    progress : callable, optional
        Called with ``{"event": "start"|"done", "method", "index", "total", "status"}``.

    Returns
    -------
    Comparison

    Raises
    ------
    CombiregError
        Bad input (files, landmarks, methods, output folder), before any registration runs.
    """
    from .cases import Case
    from .evaluate import run_cell
    from .landmarks import compute_tre, parse_space, read_landmarks
    from .outputs import atomic_output_dir, prepare_output_dir
    from .summary import failed_row
    from . import io

    landmark_space = parse_space(landmark_space)
    specs = _method_specs(methods, params, {"elastix": elastix_params, "syn": syn_params})
    outdir = prepare_output_dir(outdir, overwrite=overwrite)

    def paths(value) -> tuple:
        items = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p) for p in value]
        return tuple(Path(p) for p in items if p)

    case = Case(_CASE_ID, paths(source), paths(target), Path(target_landmarks), Path(source_landmarks))
    missing = case.missing_files()
    if missing:
        raise CombiregError(f"{missing[0]}: no such file")
    # Everything a method needs is checked before the first one starts.
    target_img = io.read_channels([str(p) for p in case.target], role="target")
    source_img = io.read_channels([str(p) for p in case.source], role="source")
    if source_img.num_channels != target_img.num_channels:
        raise CombiregError(f"source has {source_img.num_channels} channel(s) but target has "
                            f"{target_img.num_channels}; give the same count on both sides")
    target_lm = read_landmarks(case.target_landmarks, space=landmark_space, reference=case.target[0])
    source_lm = read_landmarks(case.source_landmarks, space=landmark_space, reference=case.source[0])
    initial = compute_tre(None, target_img.geometry, target_lm, source_lm)

    rows, failed = [], []
    with atomic_output_dir(outdir, overwrite=overwrite) as tmp:
        for index, spec in enumerate(specs, start=1):
            event = {"method": spec.name, "index": index, "total": len(specs)}
            if progress:
                progress({**event, "event": "start", "status": "running"})
            start = time.perf_counter()
            try:
                row = run_cell(case, spec, tmp, device=device, landmark_space=landmark_space,
                               cell_dir=tmp / spec.name)
            except CombiregError as exc:
                log.warning("%s failed: %s", spec.name, exc)
                row = failed_row(case, spec, str(exc), time.perf_counter() - start)
                failed.append((spec.name, row["error"]))
            rows.append(row)
            if progress:
                progress({**event, "event": "done", "status": row["status"]})
        table = table_markdown(rows, initial.statistics)
        (tmp / TABLE_NAME).write_text(_document(table, case, params, initial.statistics))
        (tmp / JSON_NAME).write_text(json.dumps(_json_payload(rows, case, params, initial.statistics), indent=2) + "\n")
        write_qc_picture(tmp / QC_NAME, source_img, target_img, tmp, [r for r in rows if r["status"] == "ok"])
    return Comparison(outdir, rows, table, failed)


# ------------------------------------------------------------------------------ table
def _num(value, digits: int = 2) -> str:
    if value in ("", None) or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return f"{float(value):.{digits}f}"


def table_markdown(rows: Sequence[dict], initial: dict) -> str:
    """The comparison table: TRE before/after, robustness, time, memory, folding."""
    head = ("| Method | TRE before mean / median (mm) | TRE after mean ± std (mm) | TRE after median (mm) | "
            "TRE after max (mm) | Robustness | Time (s) | Peak memory (MB) | Folding (%) |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    before = f"{_num(initial['initial_mean'])} / {_num(initial['initial_median'])}"
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {before} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r['method']} | {before} | {_num(r['tre_mean'])} ± {_num(r['tre_std'])} | "
                     f"{_num(r['tre_median'])} | {_num(r['tre_max'])} | {_num(r['robustness'], 3)} | "
                     f"{_num(r['time_s'], 1)} | {_num(r['peak_memory_mb'], 0)} | {_num(r['folding_percent'], 3)} |")
    return head + "\n".join(lines) + "\n"


def _document(table: str, case, params, initial: dict) -> str:
    from .version import __version__

    return (f"# combireg compare\n\ncombireg {__version__}. Source: {', '.join(map(str, case.source))}; target: "
            f"{', '.join(map(str, case.target))}; landmarks: {case.target_landmarks} (target), "
            f"{case.source_landmarks} (source), n = {initial['n']}. combireg parameters: "
            f"{params if params is not None else 'built-in defaults (params/default.txt)'}.\n\n"
            "TRE_i = |x_i + u(x_i) - s_i| (mm), target landmark x_i mapped through each method's forward field. "
            "Robustness: fraction of landmarks whose error went down. Time: registration wall time; "
            "memory: peak resident memory during the method; folding: % of voxels with Jacobian <= 0.\n\n"
            + table + f"\nQC picture: `{QC_NAME}`.\n")


def _json_payload(rows, case, params, initial) -> dict:
    from .version import __version__

    return {
        "combireg_version": __version__,
        "source": [str(p) for p in case.source], "target": [str(p) for p in case.target],
        "target_landmarks": str(case.target_landmarks), "source_landmarks": str(case.source_landmarks),
        "combireg_params": None if params is None else str(params),
        "initial": {k: initial[k] for k in initial if k.startswith("initial_") or k == "n"},
        "methods": [{k: v for k, v in r.items() if k not in ("case", "spec")} for r in rows],
    }


# ------------------------------------------------------------------------------ QC picture
def _focus_index(source_in_target: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) of the largest smoothed initial disagreement (normalised intensities)."""
    from scipy.ndimage import gaussian_filter

    def norm(a):
        lo, hi = np.percentile(a, (1, 99))
        return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)

    # Wide smoothing favours a blob (lesion, cavity) over the thin rims a misalignment leaves at
    # edges; the central box keeps the picture away from the skull and the field-of-view border.
    diff = gaussian_filter(np.abs(norm(source_in_target) - norm(target)), sigma=5.0)
    central = np.zeros(diff.shape, dtype=bool)
    central[tuple(slice(int(0.2 * n), max(int(0.8 * n), int(0.2 * n) + 1)) for n in diff.shape)] = True
    diff = np.where(central, diff, 0.0)
    if not np.isfinite(diff).all() or diff.max() <= 0:
        return tuple(int(n // 2) for n in target.shape)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))


def _slices(volume: np.ndarray, focus) -> list[np.ndarray]:
    z, y, x = focus
    # Array axes are (z, y, x); show each plane with its first array axis up.
    return [volume[z], volume[:, y], volume[:, :, x]]


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // max(a.shape[0], 1)) % 2
    cols = (np.arange(a.shape[1]) * tiles // max(a.shape[1], 1)) % 2
    board = (rows[:, None] ^ cols[None, :]).astype(bool)
    return np.where(board, a, b)


def write_qc_picture(path: Path, source, target, outdir: Path, rows: Sequence[dict]) -> None:
    """PNG: per row (target, initial, each method) three orthogonal slices, image and checkerboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import io
    from .outputs import warped_name
    from .warp import resample_image

    target0 = target.numpy()[0]
    initial = resample_image(source.channel(0), target.geometry).numpy()[0]
    focus = _focus_index(initial, target0)
    lo, hi = np.percentile(target0, (0.5, 99.5))
    panels = [("target", target0), ("initial (source)", initial)]
    for r in rows:
        warped = io.read_image(outdir / r["outdir"] / warped_name(0)).numpy()[0]
        panels.append((r["method"], warped))
    fig, axes = plt.subplots(len(panels), 6, figsize=(13, 2.2 * len(panels)), squeeze=False)
    target_slices = _slices(target0, focus)
    for row_axes, (label, volume) in zip(axes, panels):
        for k, (image, reference) in enumerate(zip(_slices(volume, focus), target_slices)):
            row_axes[2 * k].imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            shown = reference if label == "target" else _checkerboard(reference, image)
            row_axes[2 * k + 1].imshow(shown, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        row_axes[0].set_ylabel(label, fontsize=9)
    for k, plane in enumerate(("axial", "coronal", "sagittal")):
        axes[0][2 * k].set_title(plane, fontsize=9)
        axes[0][2 * k + 1].set_title(f"{plane}: checkerboard with target", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"slices through voxel (x, y, z) = {focus[::-1]} of the target (largest initial difference)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
