#!/usr/bin/env python
"""The varied benchmark (issue 12): every method on every variant, one fresh process per cell.

Each method is a ``combireg`` command line without its inputs: ``default="run"``,
``elastix="baseline elastix"``, ``syn="baseline syn"``, ``ncc="run -p params/ncc.txt"``. The
script runs ``combireg <words> SRC TGT -o DIR --overwrite`` for every case of the manifest
(made by ``scripts/make_varied_set.py``), records the child's wall time and peak RSS
(``os.wait4``), and scores the written ``field.nii.gz`` on the landmarks: mean, median and p95
TRE over all landmarks, the mean over the AFIDs and over the dense points (cortex, deep grey
matter, white matter) separately, and the share of folded voxels. All methods of a case run
back to back, so every table compares methods measured in the same run.

Results go to ``OUT/results.jsonl`` (one line per cell; a rerun skips finished cells unless
``--rerun``) and ``OUT/tables.md``: one table per variant (initial and every method: mean and
p95 TRE over the cases, wall time), then the per-case rows.

Example::

    python benchmarks/bench_varied.py bench_varied/manifest.csv -o bench_results/varied \\
        -m default=run -m elastix="baseline elastix" -m syn="baseline syn"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_core import combireg_cli, machine_info, read_manifest, run_child, wait_for_idle  # noqa: E402

GROUPS = ("afid", "cortex", "deepgm", "wm", "near")


def variant_of(case_id: str) -> str:
    """``v300_iso1`` -> ``iso1`` (cases of other manifests: the whole id)."""
    head, _, tail = case_id.partition("_")
    return tail if head.startswith("v") and tail else case_id


def score(field_path: Path, case: dict) -> dict:
    """TRE statistics of a written forward field, overall and per landmark group, and folding."""
    from combireg import io
    from combireg.landmarks import map_points, match_landmarks, read_landmarks
    from combireg.warp import jacobian_determinant

    u, geometry = io.read_displacement(field_path)
    target, source = read_landmarks(case["target_landmarks"]), read_landmarks(case["source_landmarks"])
    x, s, labels = match_landmarks(target, source)
    errors = np.linalg.norm(map_points(u, geometry, x, labels) - s, axis=1)
    initial = np.linalg.norm(x - s, axis=1)
    out = {"n": int(len(errors)), "mean": float(errors.mean()), "median": float(np.median(errors)),
           "p95": float(np.percentile(errors, 95)), "max": float(errors.max()),
           "initial_mean": float(initial.mean()), "initial_p95": float(np.percentile(initial, 95)),
           "worse_than_initial": bool(errors.mean() > initial.mean())}
    group = np.array([lab.split("_")[0] for lab in labels])
    for name in GROUPS:
        chosen = group == name
        if chosen.any():
            out[f"mean_{name}"] = float(errors[chosen].mean())
    dense = np.isin(group, GROUPS[1:])
    if dense.any():
        out["mean_dense"] = float(errors[dense].mean())
        out["initial_mean_dense"] = float(initial[dense].mean())
    jac = jacobian_determinant(u, geometry)
    interior = jac[1:-1, 1:-1, 1:-1] if min(jac.shape) > 2 else jac
    out["percent_folding"] = float(100.0 * np.count_nonzero(interior <= 0) / interior.size)
    out["jacobian_min"] = float(interior.min())
    return out


def run_cell(case: dict, name: str, words: list[str], outdir: Path, max_load: float | None,
             keep_outputs: bool = False) -> dict:
    """One method on one case in a fresh process; the row of results.jsonl."""
    out = outdir / "cells" / case["id"] / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [combireg_cli(), *words, ",".join(case["source"]), ",".join(case["target"]), "-o", str(out),
            "--overwrite"]
    waited = wait_for_idle(max_load)
    child = run_child(argv, {**os.environ, "ITK_GLOBAL_DEFAULT_THREADER": "Pool"}, REPO,
                      out.parent / f"{name}.log")
    row = {"case": case["id"], "variant": variant_of(case["id"]), "method": name, "words": shlex.join(words),
           **child, "waited_for_idle_s": waited}
    if child["exit_code"] != 0:
        tail = (out.parent / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        row["error"] = " | ".join(tail)
        return row
    report = json.loads((out / "report.json").read_text())
    row["report_wall_s"] = report.get("wall_time_s")
    row["warnings"] = report.get("quality", {}).get("warnings", [])
    row["tre"] = score(out / "field.nii.gz", case)
    if not keep_outputs:
        for path in out.glob("*.nii.gz"):
            if path.name != "field.nii.gz":
                path.unlink()
    return row


def load_rows(path: Path) -> dict:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["case"], row["method"])] = row
    return rows


def _cell(values: list[float], digits: int = 2) -> str:
    return f"{np.mean(values):.{digits}f}" if values else "-"


def tables(rows: dict, cases: list[dict], methods: list[str]) -> str:
    """One table per variant, an overall table, then per-case rows (Markdown)."""
    variants = list(dict.fromkeys(variant_of(c["id"]) for c in cases))
    lines = []
    head = ("| variant | method | cases | TRE mean | TRE p95 | dense mean | AFIDs mean | worst case mean | "
            "worse than initial | wall s | peak MB | % folded |")
    sep = "|" + "---|" * head.count("|")
    sep = sep[: -len("---|")]
    for variant in variants + ["all"]:
        lines += [f"### {variant}", "", head, sep]
        ids = [c["id"] for c in cases if variant == "all" or variant_of(c["id"]) == variant]
        initial = [rows[(i, m)]["tre"] for i in ids for m in methods[:1] if (i, m) in rows and "tre" in rows[(i, m)]]
        if initial:
            lines.append(f"| {variant} | initial | {len(initial)} | {_cell([t['initial_mean'] for t in initial])} | "
                         f"{_cell([t['initial_p95'] for t in initial])} | "
                         f"{_cell([t['initial_mean_dense'] for t in initial if 'initial_mean_dense' in t])} | | "
                         f"{max(t['initial_mean'] for t in initial):.2f} | | | | |")
        for m in methods:
            done = [rows[(i, m)] for i in ids if (i, m) in rows]
            ok = [r for r in done if "tre" in r]
            failed = len(done) - len(ok)
            if not done:
                continue
            tre = [r["tre"] for r in ok]
            lines.append(
                f"| {variant} | {m} | {len(ok)}{f' ({failed} failed)' if failed else ''} | "
                f"{_cell([t['mean'] for t in tre])} | {_cell([t['p95'] for t in tre])} | "
                f"{_cell([t['mean_dense'] for t in tre if 'mean_dense' in t])} | "
                f"{_cell([t['mean_afid'] for t in tre if 'mean_afid' in t])} | "
                f"{max((t['mean'] for t in tre), default=float('nan')):.2f} | "
                f"{sum(t['worse_than_initial'] for t in tre)} | {_cell([r['wall_s'] for r in ok], 1)} | "
                f"{_cell([r['peak_rss_mb'] for r in ok], 0)} | {_cell([t['percent_folding'] for t in tre], 3)} |")
        lines.append("")
    lines += ["### per case", "", "| case | method | TRE mean | p95 | initial | wall s | % folded | warnings |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for m in methods:
            r = rows.get((c["id"], m))
            if r is None:
                continue
            if "tre" not in r:
                lines.append(f"| {c['id']} | {m} | FAILED: {r.get('error', '')[:80]} | | | | | |")
                continue
            t = r["tre"]
            lines.append(f"| {c['id']} | {m} | {t['mean']:.2f} | {t['p95']:.2f} | {t['initial_mean']:.2f} | "
                         f"{r['wall_s']:.1f} | {t['percent_folding']:.3f} | {len(r.get('warnings', []))} |")
    return "\n".join(lines) + "\n"


def parse_methods(items: list[str]) -> dict[str, list[str]]:
    methods = {}
    for item in items:
        name, sep, words = item.partition("=")
        if not sep or not name or not words.strip():
            raise SystemExit(f"-m {item!r}: expected NAME=COMBIREG_WORDS, e.g. default=run")
        methods[name] = shlex.split(words)
    return methods


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("-m", "--method", action="append", required=True, help="NAME=COMBIREG_WORDS")
    parser.add_argument("--cases", help="comma-separated ids, or a count (the first N)")
    parser.add_argument("--variants", help="comma-separated variants to run (default: all)")
    parser.add_argument("--rerun", action="store_true", help="run finished cells again")
    parser.add_argument("--max-load", type=float, default=None, help="wait for this 1-minute load first")
    parser.add_argument("--keep-outputs", action="store_true", help="keep warped images and inverse fields")
    parser.add_argument("--tables-only", action="store_true", help="write the tables of the results so far, run nothing")
    args = parser.parse_args(argv)
    if combireg_cli() is None:
        raise SystemExit("the combireg console script is not installed (pip install -e .)")
    methods = parse_methods(args.method)
    cases = read_manifest(args.manifest, args.cases)
    if args.variants:
        wanted = set(args.variants.split(","))
        cases = [c for c in cases if variant_of(c["id"]) in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = load_rows(results)
    (args.out / "machine.json").write_text(json.dumps({**machine_info(), "argv": sys.argv}, indent=1))
    start = time.perf_counter()
    for case in cases:
        for name, words in methods.items():
            key = (case["id"], name)
            if args.tables_only or (key in rows and not args.rerun and rows[key].get("words") == shlex.join(words)
                                    and "tre" in rows[key]):
                continue
            row = run_cell(case, name, words, args.out, args.max_load, args.keep_outputs)
            rows[key] = row
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            t = row.get("tre")
            print(f"{case['id']:<16} {name:<14} " + (f"TRE {t['mean']:.2f} (p95 {t['p95']:.2f}, initial "
                                                      f"{t['initial_mean']:.2f}) {row['wall_s']:.1f} s "
                                                      f"{row['peak_rss_mb']:.0f} MB" if t else
                                                      f"FAILED: {row.get('error', '')}"), flush=True)
    text = tables(rows, cases, list(methods))
    (args.out / "tables.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
