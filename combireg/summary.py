"""The tables of an evaluation: results.csv, and the statistics and reports made from it.

``results.csv``
    One row per case x method (:data:`RESULT_COLUMNS`): status, TRE statistics (mm; blank
    for a case without landmarks), label overlap (mean Dice over the labels present in both
    label maps, mean HD95 in mm, before and after; blank for a case without label maps),
    registration time, peak resident memory during the cell, % folding (non-positive
    Jacobian). A row is appended as soon as its cell finishes, so an interrupted run
    resumes: cells already ``ok`` with the same SPEC are skipped, failed cells rerun.
``summary.md``
    Per method, over its successful cases with landmarks: mean ± std (across cases) of the
    per-case mean TRE and the median of the per-case median TRE, also pooled over all
    landmarks; over its cases with label maps: mean ± std and median of the per-case mean
    Dice, and mean ± std of the per-case mean HD95; the paired t-tests; failed cells.
``ttests.csv``
    Paired t-tests (``scipy.stats.ttest_rel``), one row per metric (``tre``: per-case mean
    TRE; ``dice``: per-case mean Dice) present in the results and compared pair A:B, over
    the cases where both have it: mean difference A - B, its 95% confidence interval (t
    distribution), t and p.
``tre_boxplot.png``, ``dice_boxplot.png``
    Box plots of the per-case mean TRE and mean Dice per method (and of the initial values),
    each where there are such values.

:mod:`combireg.evaluate` runs the cells and appends their rows; ``combireg compare`` reports
its methods with the same rows.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .cases import Case
from .errors import CombiregError
from .methods import MethodSpec
from .version import __version__

__all__ = [
    "RESULTS_NAME",
    "SUMMARY_NAME",
    "TTESTS_NAME",
    "BOXPLOT_NAME",
    "DICE_BOXPLOT_NAME",
    "CELL_TRE_CSV",
    "CELL_DICE_CSV",
    "METRICS",
    "RESULT_COLUMNS",
    "NEAR_LESION_MM",
    "failed_row",
    "append_row",
    "read_results",
    "rewrite_results",
    "parse_comparisons",
    "paired_t_test",
    "method_summary",
    "dice_summary",
    "summary_markdown",
    "write_reports",
]

log = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.md"
TTESTS_NAME = "ttests.csv"
BOXPLOT_NAME = "tre_boxplot.png"
DICE_BOXPLOT_NAME = "dice_boxplot.png"
#: Each cell's per-landmark errors, beside its outputs (read back for the pooled statistics).
CELL_TRE_CSV = "tre.csv"
#: Each cell's per-label Dice and HD95, beside its outputs.
CELL_DICE_CSV = "dice.csv"
#: The per-case numbers the paired t-tests compare: metric -> results.csv column.
METRICS = {"tre": "tre_mean", "dice": "dice_mean"}

#: Columns of results.csv, in order.
RESULT_COLUMNS = (
    "case", "method", "status", "error", "spec", "n_landmarks",
    "tre_mean", "tre_std", "tre_median", "tre_p95", "tre_max",
    "initial_mean", "initial_std", "initial_median", "initial_p95", "initial_max", "robustness",
    "time_s", "cell_time_s", "peak_memory_mb", "folding_percent", "jacobian_min", "outdir",
    "n_near_lesion", "tre_near_lesion_mean", "initial_near_lesion_mean",
    "n_labels", "dice_mean", "initial_dice_mean", "hd95_mean", "initial_hd95_mean",
)
#: Landmarks at most this far (mm) from the manifest's lesion mask count as "near the lesion".
NEAR_LESION_MM = 20.0


# ====================================================================================== results.csv
def failed_row(case: Case, method: MethodSpec, message: str, seconds: float) -> dict:
    """The results row of a cell that failed with ``message`` after ``seconds``."""
    row = {c: "" for c in RESULT_COLUMNS}
    row.update(case=case.id, method=method.name, status="failed", error=" ".join(message.split()),
               spec=method.spec, cell_time_s=round(seconds, 3))
    return row


def _format(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def append_row(path: Path, row: dict) -> None:
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


def rewrite_results(path: Path, rows: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows.values():
            writer.writerow({k: _format(row.get(k, "")) for k in RESULT_COLUMNS})
    os.replace(tmp, path)


# ====================================================================================== statistics
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


def _ok_rows(rows: dict, ids: Sequence[str], method: str, column: str) -> list[dict]:
    """The successful rows of one method that have a number in ``column``, in case order."""
    found = [rows.get((cid, method)) for cid in ids]
    return [r for r in found if r and r.get("status") == "ok" and _is_number(r.get(column))]


def _initial_rows(rows: dict, ids: Sequence[str], methods: Sequence[MethodSpec], column: str) -> list[dict]:
    """Per case, the first method's successful row with ``column``: the identity's numbers."""
    chosen = {}
    for m in methods:
        for r in _ok_rows(rows, ids, m.name, column):
            chosen.setdefault(r["case"], r)
    return [chosen[c] for c in ids if c in chosen]


def _costs(ok: list[dict]) -> dict:
    """Mean time, peak memory and folding of some rows."""
    out = {}
    for key in ("time_s", "peak_memory_mb", "folding_percent"):
        vals = np.array([r[key] for r in ok if isinstance(r.get(key), float)])
        out[key] = float(vals.mean()) if vals.size else math.nan
    return out


def method_summary(outdir: Path, rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec]) -> list[dict]:
    """One TRE summary dict per method (and a first one for the initial TRE), over successful
    cases with landmarks; empty when no case has any."""
    ids = [c.id for c in cases]
    if not any(_ok_rows(rows, ids, m.name, "tre_mean") for m in methods):
        return []
    out = []
    entries = [("initial (identity)", _initial_rows(rows, ids, methods, "tre_mean"), "initial")]
    entries += [(m.name, _ok_rows(rows, ids, m.name, "tre_mean"), "tre") for m in methods]
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
            robustness = np.array([r["robustness"] for r in ok if isinstance(r.get("robustness"), float)])
            summary["robustness"] = float(robustness.mean()) if robustness.size else math.nan
            summary.update(_costs(ok))
        out.append(summary)
    return out


def dice_summary(rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec]) -> list[dict]:
    """One label-overlap summary dict per method (and a first one for the identity), over
    successful cases with label maps; empty when no case has any.

    Keys: ``method``, ``cases_ok``, ``cases``, ``dice_mean``, ``dice_std``, ``dice_median``
    (across cases, of each case's mean Dice), ``hd95_mean``, ``hd95_std`` (of each case's mean
    HD95, mm), ``per_case_dice``, and for methods the mean time, peak memory and folding.
    """
    ids = [c.id for c in cases]
    if not any(_ok_rows(rows, ids, m.name, "dice_mean") for m in methods):
        return []
    entries = [("initial (identity)", _initial_rows(rows, ids, methods, "initial_dice_mean"), "initial_")]
    entries += [(m.name, _ok_rows(rows, ids, m.name, "dice_mean"), "") for m in methods]
    out = []
    for name, ok, prefix in entries:
        dice = np.array([r[f"{prefix}dice_mean"] for r in ok], dtype=np.float64)
        hd95 = np.array([r[f"{prefix}hd95_mean"] for r in ok if _is_number(r.get(f"{prefix}hd95_mean"))])
        mean, std = _mean_std(dice)
        hmean, hstd = _mean_std(hd95)
        summary = {"method": name, "cases_ok": len(ok), "cases": len(ids), "dice_mean": mean, "dice_std": std,
                   "dice_median": float(np.median(dice)) if dice.size else math.nan,
                   "hd95_mean": hmean, "hd95_std": hstd, "per_case_dice": dice.tolist()}
        if not prefix:
            summary.update(_costs(ok))
        out.append(summary)
    return out


def _comparisons(rows: dict, cases: Sequence[Case], pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """Paired t-tests per metric present in the rows (:data:`METRICS`) and per pair."""
    tests = []
    ids = [c.id for c in cases]
    for metric, column in METRICS.items():
        if not any(_is_number(r.get(column)) and r.get("status") == "ok" for r in rows.values()):
            continue
        for a, b in pairs:
            have_a = {r["case"] for r in _ok_rows(rows, ids, a, column)}
            both = [c for c in ids if c in have_a and c in {r["case"] for r in _ok_rows(rows, ids, b, column)}]
            res = paired_t_test([rows[(c, a)][column] for c in both], [rows[(c, b)][column] for c in both])
            tests.append({"metric": metric, "a": a, "b": b, **res})
    return tests


# ====================================================================================== reports
def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def _tre_section(summaries: list[dict], with_lesion: bool) -> list[str]:
    lines = [
        "## TRE per method",
        "",
        "| Method | Cases | TRE mean ± std (mm) | TRE median (mm) | All landmarks mean ± std (mm) "
        "| All landmarks median (mm) | Robustness | Time (s) | Peak memory (MB) | Folding (%) |"
        + (f" TRE within {NEAR_LESION_MM:g} mm of the lesion (mm) | Landmarks near the lesion |" if with_lesion else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_lesion else ""),
    ]
    for s in summaries:
        extra = [_fmt(s.get("robustness", math.nan), 3), *_cost_cells(s)] if "robustness" in s else [""] * 4
        lines.append(f"| {s['method']} | {s['cases_ok']}/{s['cases']} | {_pm(s['case_mean'], s['case_std'])} | "
                     f"{_fmt(s['case_median'])} | {_pm(s['landmark_mean'], s['landmark_std'])} | "
                     f"{_fmt(s['landmark_median'])} | " + " | ".join(extra) + " |"
                     + (f" {_fmt(s['near_lesion_mean'])} | {s['near_lesion_n']} |" if with_lesion else ""))
    return lines


def _cost_cells(s: dict) -> list[str]:
    return [_fmt(s.get("time_s", math.nan), 1), _fmt(s.get("peak_memory_mb", math.nan), 0),
            _fmt(s.get("folding_percent", math.nan), 3)]


def _dice_section(summaries: list[dict], with_costs: bool) -> list[str]:
    lines = ["## Dice per method", "",
             "| Method | Cases | Dice mean ± std | Dice median | HD95 mean ± std (mm) |"
             + (" Time (s) | Peak memory (MB) | Folding (%) |" if with_costs else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if with_costs else "")]
    for s in summaries:
        costs = (" " + " | ".join(_cost_cells(s) if "time_s" in s else [""] * 3) + " |") if with_costs else ""
        lines.append(f"| {s['method']} | {s['cases_ok']}/{s['cases']} | {_pm(s['dice_mean'], s['dice_std'], 3)} | "
                     f"{_fmt(s['dice_median'], 3)} | {_pm(s['hd95_mean'], s['hd95_std'])} |" + costs)
    return lines


def summary_markdown(dataset: Path, summaries: list[dict], dice_summaries: list[dict], tests: list[dict], rows: dict,
                     cases: Sequence[Case], methods: Sequence[MethodSpec]) -> str:
    """The text of summary.md (TRE and Dice sections where the cases have landmarks and labels)."""
    with_lesion = any(c.lesion is not None for c in cases)
    lines = ["# combireg evaluate", "",
             f"Dataset `{dataset}`: {len(cases)} case(s), {len(methods)} method(s); combireg {__version__}.", ""]
    if summaries:
        lines += [
            "TRE_i = |x_i + u(x_i) - s_i| in mm (target landmark x_i mapped through the forward field, "
            "source landmark s_i). *Per case*: mean ± std over cases of each case's mean TRE, and the "
            "median over cases of each case's median TRE. *All landmarks*: pooled over the cases. "
            "Robustness: fraction of landmarks whose error went down (BraTS-Reg), mean over cases. "
            "Time: registration wall time; memory: peak resident memory during the case."
            + (f" Near the lesion: TRE pooled over the landmarks at most {NEAR_LESION_MM:g} mm from the manifest's "
               "lesion mask (distance from the target landmark to the nearest lesion voxel)." if with_lesion else ""),
            "", *_tre_section(summaries, with_lesion), ""]
    if dice_summaries:
        lines += [
            "Dice per label between the target's label map and the source's carried into target space (nearest "
            "neighbour), over the labels present in both label maps; a case's Dice is the mean over its labels, "
            "HD95 (mm) the mean over its labels of the 95th-percentile surface distance. Mean ± std and median over "
            "cases.", "", *_dice_section(dice_summaries, with_costs=not summaries), ""]
    if not summaries and not dice_summaries:
        lines += ["No successful case with landmarks or label maps: no TRE or Dice to report.", ""]
    lines += ["## Paired t-tests (per-case mean TRE in mm, per-case mean Dice)", ""]
    if tests:
        lines += ["| Metric | A | B | Cases | Mean A | Mean B | Mean difference A − B | 95% CI | t | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            ci = "n/a" if math.isnan(t["ci_low"]) else f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]"
            lines.append(f"| {'TRE' if t['metric'] == 'tre' else 'Dice'} | {t['a']} | {t['b']} | {t['n']} | "
                         f"{_fmt(t['mean_a'], 3)} | {_fmt(t['mean_b'], 3)} | {_fmt(t['mean_difference'], 3)} | {ci} | "
                         f"{_fmt(t['t'], 3)} | {_p(t['p_value'])} |")
    else:
        lines.append("No pairs to compare (one method)." if len(methods) < 2 else "No TRE or Dice to compare.")
    failed = [(c.id, m.name, rows[(c.id, m.name)].get("error", "")) for c in cases for m in methods
              if rows.get((c.id, m.name), {}).get("status") == "failed"]
    lines += ["", "## Failed cells", ""]
    lines += [f"- {cid} / {name}: {err}" for cid, name, err in failed] or ["None."]
    lines += ["", "## Methods", ""] + [f"- `{m.name}`: `{m.spec}`" for m in methods]
    return "\n".join(lines) + "\n"


def write_boxplot(path: Path, summaries: list[dict], key: str = "per_case_mean",
                  label: str = "per-case mean TRE (mm)", title: str = "TRE per method") -> bool:
    """Box plot of one per-case number per method; False (nothing written) when there is no data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = [(s["method"], s[key]) for s in summaries if s[key]]
    if not data:
        return False
    fig = Figure(figsize=(max(4.0, 1.3 * len(data) + 1.5), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([v for _, v in data], showmeans=True)
    ax.set_xticks(range(1, len(data) + 1), [n for n, _ in data], rotation=20, ha="right")
    rng = np.random.default_rng(0)
    for i, (_, values) in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.08, 0.08, len(values)), values, "o", ms=3, alpha=0.6, color="tab:blue")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_tests_csv(path: Path, tests: list[dict]) -> None:
    keys = ["metric", "a", "b", "n", "mean_a", "mean_b", "mean_difference", "ci_low", "ci_high", "t", "p_value"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for t in tests:
            writer.writerow({k: _format(t[k]) for k in keys})


def write_reports(outdir: Path, dataset: Path, rows: dict, cases: Sequence[Case], methods: Sequence[MethodSpec],
                  pairs: Sequence[tuple[str, str]]) -> tuple[list[dict], list[dict], list[dict]]:
    """summary.md, ttests.csv and the box plots from the results; returns (TRE summaries,
    Dice summaries, tests)."""
    summaries = method_summary(outdir, rows, cases, methods)
    dice = dice_summary(rows, cases, methods)
    tests = _comparisons(rows, cases, pairs)
    (outdir / SUMMARY_NAME).write_text(summary_markdown(dataset, summaries, dice, tests, rows, cases, methods))
    write_tests_csv(outdir / TTESTS_NAME, tests)
    if not (write_boxplot(outdir / BOXPLOT_NAME, summaries)
            | write_boxplot(outdir / DICE_BOXPLOT_NAME, dice, "per_case_dice", "per-case mean Dice", "Dice per method")):
        log.warning("no successful cases with landmarks or label maps: no box plot written")
    return summaries, dice, tests
