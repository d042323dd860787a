#!/usr/bin/env python
"""Speed/accuracy benchmark of ``combireg run`` against elastix measured in the same run.

For every case of a manifest and every method, one fresh subprocess registers the pair and
writes its forward field (``field.nii.gz``: target grid, LPS mm, target x -> source x + u(x));
its wall time and peak RSS (``os.wait4`` rusage of that child) are recorded. The parent then
computes the landmark TRE and the share of folded voxels from the written field.

Methods
-------
combireg[<preset>]
    ``combireg run SRC TGT -o DIR -p PRESET --overwrite -q`` (the console script), or, when it
    is not installed, ``combireg.register(...).save(DIR)`` in a ``python`` subprocess.
elastix_bspline
    itk-elastix with ``GetDefaultParameterMap('bspline')``, all channels through elastix's
    multi-image registration (one Mattes MI metric per channel pair with weight 1/C, plus the
    default bending-energy penalty; see :func:`_elastix_map`), then
    ``transformix_deformation_field`` and writing the field. ``--elastix-affine`` adds
    ``elastix_affine_bspline`` (default affine map first); ``--elastix-t1`` adds
    ``elastix_bspline_t1`` (the unchanged default map on the first channel only).
    elastix runs with ``ITK_GLOBAL_DEFAULT_THREADER=Pool``: on the 2-core benchmark machine it
    was 11-15 % faster than ITK's default TBB (1 mm pair: 114.7 vs 129.3 s multi-image,
    93.1 vs 109.7 s T1 only, both under the same background load).

Timings need a quiet machine: every row records the CPU share other processes used while it
ran (``bg %``) and the 1-minute load average; ``--max-load`` waits for the load to drop before
each method.

Manifest: CSV with header ``id,source,target,target_landmarks,source_landmarks``; ``source`` and
``target`` are comma-joined channel paths; all paths relative to the manifest's folder;
landmarks are Slicer .fcsv files matched by label.

Example::

    python benchmarks/bench_core.py --manifest bench_data/manifest.csv \\
        --params params/default.txt --json out/bench_core.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIELD_NAME = "field.nii.gz"
WORKER_REPORT = "bench_worker.json"


# ------------------------------------------------------------------------------- manifest
def read_manifest(path: Path, cases: str | None) -> list[dict]:
    """Cases of a manifest, paths made absolute.

    Parameters
    ----------
    path : Path
        The manifest CSV.
    cases : str or None
        ``None`` (all), a count ``"3"`` (the first three), or comma-separated ids.
    """
    root = path.resolve().parent

    def paths(value: str) -> list[str]:
        return [str(root / p.strip()) for p in value.split(",") if p.strip()]

    with open(path, newline="") as fh:
        rows = [dict(r) for r in csv.DictReader(fh)]
    for r in rows:
        r["source"], r["target"] = paths(r["source"]), paths(r["target"])
        r["target_landmarks"] = str(root / r["target_landmarks"].strip())
        r["source_landmarks"] = str(root / r["source_landmarks"].strip())
    if cases is None:
        return rows
    if cases.strip().isdigit():
        return rows[: int(cases)]
    wanted = [c.strip() for c in cases.split(",") if c.strip()]
    by_id = {r["id"]: r for r in rows}
    missing = [c for c in wanted if c not in by_id]
    if missing:
        raise SystemExit(f"bench_core: case(s) not in {path}: {', '.join(missing)}")
    return [by_id[c] for c in wanted]


# ------------------------------------------------------------------------------- workers
def _elastix_map(po, name: str, channels: int, pairs: int = 0) -> dict:
    """elastix's default parameter map ``name``, extended to ``channels`` image pairs.

    With one channel the map is returned unchanged. With C > 1 the image metric (Mattes MI) is
    repeated once per channel pair with weight ``w / C`` (the summed image term keeps the
    default's scale against the bending-energy penalty); penalty terms follow. This elastix
    build requires the number of image pairs, pyramids, interpolators and samplers to equal
    the number of metrics *including* penalties (ITKElastix issue #293), so every component is
    repeated once per metric and :func:`elastix_worker` feeds the first channel pair again for
    each penalty term (a penalty only uses its pair's domain, not its intensities). A map with
    fewer metrics than ``pairs`` (the affine map before the B-spline one) is padded with
    unused (``Metric<i>Use "false"``, weight 0) image metrics.
    """
    pm = {k: list(v) for k, v in po.GetDefaultParameterMap(name).items()}
    if channels == 1:
        return pm
    metrics = pm["Metric"]
    weights = [float(pm.get(f"Metric{i}Weight", ["1.0"])[0]) for i in range(len(metrics))]
    for i in range(len(metrics)):
        pm.pop(f"Metric{i}Weight", None)
    new_metrics = [metrics[0]] * channels + metrics[1:]
    new_weights = [weights[0] / channels] * channels + weights[1:]
    unused = max(0, pairs - len(new_metrics))
    new_metrics += [metrics[0]] * unused
    new_weights += [0.0] * unused
    pm["Registration"] = ["MultiMetricMultiResolutionRegistration"]
    pm["Metric"] = new_metrics
    for i, w in enumerate(new_weights):
        pm[f"Metric{i}Weight"] = [repr(w)]
        if i >= len(new_metrics) - unused:
            pm[f"Metric{i}Use"] = ["false"]
    for key in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler"):
        pm[key] = pm[key][:1] * len(new_metrics)
    return pm


def elastix_worker(spec: dict) -> dict:
    """Run elastix (+ transformix field + write) in this process; returns timings (s)."""
    import itk

    from combireg import io

    t0 = time.perf_counter()
    channels = len(spec["target"]) if spec["multichannel"] else 1
    fixed = [itk.imread(p, itk.F) for p in spec["target"][:channels]]
    moving = [itk.imread(p, itk.F) for p in spec["source"][:channels]]
    t_read = time.perf_counter()
    po = itk.ParameterObject.New()
    names = (["affine"] if spec["affine"] else []) + ["bspline"]
    pairs = max(len(_elastix_map(po, n, len(fixed))["Metric"]) for n in names) if len(fixed) > 1 else 1
    for name in names:
        po.AddParameterMap(_elastix_map(po, name, len(fixed), pairs))
    # One image pair per metric (see _elastix_map): the first pair again for the rest.
    reg = itk.ElastixRegistrationMethod[type(fixed[0]), type(moving[0])].New()
    for k in range(pairs):
        reg.AddFixedImage(fixed[k] if k < len(fixed) else fixed[0])
        reg.AddMovingImage(moving[k] if k < len(moving) else moving[0])
    reg.SetParameterObject(po)
    reg.SetLogToConsole(bool(spec.get("verbose")))
    reg.Update()
    t_reg = time.perf_counter()
    field = itk.transformix_deformation_field(moving[0], reg.GetTransformParameterObject())
    u = np.asarray(itk.array_view_from_image(field), dtype=np.float32)
    geometry = io.geometry_from_itk(field)
    t_field = time.perf_counter()
    io.write_displacement(Path(spec["out"]) / FIELD_NAME, u, geometry)
    t_end = time.perf_counter()
    return {"read_s": t_read - t0, "register_s": t_reg - t_read, "field_s": t_field - t_reg,
            "write_s": t_end - t_field, "core_s": t_end - t_read,
            "channels_used": len(fixed), "parameter_maps": po.GetNumberOfParameterMaps(),
            "threader": os.environ.get("ITK_GLOBAL_DEFAULT_THREADER", "(ITK default)")}


def combireg_worker(spec: dict) -> dict:
    """``combireg.register(...).save(...)`` in this process; returns timings (s)."""
    import combireg

    t0 = time.perf_counter()
    result = combireg.register(spec["source"], spec["target"], params=spec["params"])
    t_reg = time.perf_counter()
    result.save(spec["out"], overwrite=True)
    t_end = time.perf_counter()
    return {"register_s": t_reg - t0, "save_s": t_end - t_reg, "core_s": t_end - t0}


def worker_main(spec_json: str) -> None:
    """Entry point of a worker subprocess: run one method, write its report beside the field."""
    spec = json.loads(spec_json)
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    report = (elastix_worker if spec["kind"] == "elastix" else combireg_worker)(spec)
    (Path(spec["out"]) / WORKER_REPORT).write_text(json.dumps(report, indent=1))


# ------------------------------------------------------------------------------- running
def busy_cpu_seconds() -> float:
    """CPU seconds all processes of this machine have used since boot (``/proc/stat``), or NaN."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:7]) - idle) / os.sysconf("SC_CLK_TCK")  # user..softirq; no steal, no guest


def run_child(argv: list[str], env: dict, cwd: Path, log_path: Path) -> dict:
    """Run ``argv`` to completion: wall and CPU seconds, peak RSS (MB) and exit code of that child,
    and ``background_percent``: the CPU the rest of the machine used meanwhile, in % of all cores
    (contention that inflates the wall time; near 0 on a quiet machine)."""
    with open(log_path, "w") as log:
        busy0, self0 = busy_cpu_seconds(), time.process_time()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy = busy_cpu_seconds() - busy0 - (time.process_time() - self0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: KiB
            "background_percent": max(0.0, 100.0 * (busy - cpu) / (wall * (os.cpu_count() or 1))),
            "exit_code": proc.returncode}


def wait_for_idle(max_load: float | None, timeout_s: float = 900.0) -> float:
    """Sleep until the 1-minute load average is <= ``max_load`` (or ``timeout_s``); seconds waited.

    Why: on a shared 2-core machine another job's threads inflate both methods' wall times
    (OpenMP threads spin-waiting on a busy core suffer most), so timings need a quiet machine.
    """
    start = time.perf_counter()
    while max_load is not None and os.getloadavg()[0] > max_load and time.perf_counter() - start < timeout_s:
        time.sleep(5)
    return time.perf_counter() - start


def combireg_cli() -> str | None:
    """Path of the installed ``combireg`` console script, or None."""
    beside = Path(sys.executable).parent / "combireg"
    return str(beside) if beside.is_file() else shutil.which("combireg")


def cli_works(path: str | None) -> bool:
    """Whether ``path run --help`` runs (the console script may be installed but broken)."""
    if path is None:
        return False
    done = subprocess.run([path, "run", "--help"], capture_output=True, cwd=REPO)
    return done.returncode == 0


def method_command(method: dict, case: dict, out: Path, runner: str) -> list[str]:
    """The argv that runs ``method`` on ``case`` writing into ``out``."""
    if method["kind"] == "combireg" and runner == "cli":
        argv = [combireg_cli(), "run", ",".join(case["source"]), ",".join(case["target"]),
                "-o", str(out), "--overwrite", "-q"]
        return argv + (["-p", method["params"]] if method["params"] else [])
    spec = {**method, "source": case["source"], "target": case["target"], "out": str(out)}
    return [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(spec)]


def evaluate(field_path: Path, case: dict) -> dict:
    """TRE statistics (mm) and % non-positive Jacobian of a written forward field."""
    from combireg import io
    from combireg.landmarks import map_points, read_fcsv, tre_statistics
    from combireg.warp import jacobian_determinant

    u, geometry = io.read_displacement(field_path)
    tgt, src = read_fcsv(case["target_landmarks"]), read_fcsv(case["source_landmarks"])
    src_by_label = dict(zip(src.labels, src.points_lps_mm))
    labels = [lb for lb in tgt.labels if lb in src_by_label]
    x = np.array([p for lb, p in zip(tgt.labels, tgt.points_lps_mm) if lb in src_by_label])
    s = np.array([src_by_label[lb] for lb in labels])
    mapped = map_points(u, geometry, x, labels)
    stats = tre_statistics(np.linalg.norm(mapped - s, axis=1), np.linalg.norm(x - s, axis=1))
    jac = jacobian_determinant(u, geometry)
    stats["percent_folding"] = float(100.0 * np.count_nonzero(jac <= 0) / jac.size)
    return stats


def run_case(case: dict, methods: list[dict], workdir: Path, runner: str, threader: str | None,
             max_load: float | None = None) -> list[dict]:
    """Every method on one case, one fresh subprocess each; returns one row per method."""
    rows = []
    for method in methods:
        out = workdir / case["id"] / method["name"].replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if method["kind"] == "elastix" and threader:
            env["ITK_GLOBAL_DEFAULT_THREADER"] = threader
        argv = method_command(method, case, out, runner)
        waited = wait_for_idle(max_load)
        load_before = os.getloadavg()[0]
        # cwd = out: transformix always writes deformationField.<ResultImageFormat> into the cwd.
        child = run_child(argv, env, out, out.parent / f"{out.name}.log")
        wall, rss, code = child["wall_s"], child["peak_rss_mb"], child["exit_code"]
        row = {"case": case["id"], "method": method["name"], **child, "waited_for_idle_s": waited,
               "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
               "command": shlex.join(argv[:3]) + (" ..." if len(argv) > 3 else "")}
        if code != 0:
            tail = (out.parent / f"{out.name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            row["error"] = " | ".join(tail)
            print(f"  {case['id']} {method['name']}: FAILED (exit {code}): {row['error']}", flush=True)
            rows.append(row)
            continue
        report_path = out / WORKER_REPORT
        if report_path.is_file():
            row["worker"] = json.loads(report_path.read_text())
            row["core_s"] = row["worker"]["core_s"]
        elif (out / "report.json").is_file():  # CLI run: combireg's own timing (register only)
            row["core_s"] = json.loads((out / "report.json").read_text())["wall_time_s"]
        try:
            row["tre"] = evaluate(out / FIELD_NAME, case)
        except Exception as exc:  # noqa: BLE001 - a bad output must not end the whole benchmark
            row["error"] = f"evaluation failed: {exc}"
            print(f"  {case['id']} {method['name']}: {row['error']}", flush=True)
            rows.append(row)
            continue
        print(f"  {case['id']} {method['name']}: {wall:.1f} s, {rss:.0f} MB, TRE {row['tre']['mean']:.2f} mm "
              f"(other processes used {row['background_percent']:.0f} % of the CPUs meanwhile)", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- output
def format_table(rows: list[dict], methods: list[dict]) -> str:
    """Per-row table, per-method means and combireg/elastix wall-time ratios."""
    head = (f"{'case':<16} {'method':<32} {'wall s':>7} {'core s':>7} {'cpu s':>7} {'RSS MB':>7} {'TRE mean':>8} "
            f"{'median':>7} {'p95':>7} {'init':>6} {'%fold':>7} {'bg %':>5}")
    lines = [head, "-" * len(head)]

    def line(case, method, r):
        if "tre" not in r:
            return f"{case:<16} {method:<32} FAILED: {r.get('error', '')[:80]}"
        t = r["tre"]
        core = f"{r['core_s']:7.1f}" if r.get("core_s") is not None else f"{'-':>7}"
        return (f"{case:<16} {method:<32} {r['wall_s']:7.1f} {core} {r['cpu_s']:7.1f} {r['peak_rss_mb']:7.0f} {t['mean']:8.2f} "
                f"{t['median']:7.2f} {t['p95']:7.2f} {t['initial_mean']:6.2f} {t['percent_folding']:7.3f} "
                f"{r.get('background_percent', float('nan')):5.0f}")

    for r in rows:
        lines.append(line(r["case"], r["method"], r))
    lines.append("-" * len(head))
    summary = method_means(rows, methods)
    for name, m in summary.items():
        lines.append(line(f"mean (n={m['n']})", name, m) if m["n"] else f"{'mean':<16} {name:<32} no successful case")
    lines.append("bg %: CPU used by other processes while the method ran, % of all cores (timings are "
                 "trustworthy near 0; see --max-load)")
    ratios = wall_ratios(rows, methods)
    if ratios:
        lines.append("")
        lines.append("wall-time ratios, same run (target: combireg / elastix_bspline <= 0.5):")
        for name, per_case in ratios.items():
            cells = ", ".join(f"{c} {v:.2f}" for c, v in per_case["cases"].items())
            lines.append(f"  {name}: {cells}; overall (sum/sum) {per_case['overall']:.2f}")
    return "\n".join(lines)


def method_means(rows: list[dict], methods: list[dict]) -> dict:
    """Means over successful cases of every number in the table, per method."""
    out = {}
    for method in methods:
        ok = [r for r in rows if r["method"] == method["name"] and "tre" in r]
        m = {"n": len(ok)}
        if ok:
            m["wall_s"] = float(np.mean([r["wall_s"] for r in ok]))
            m["peak_rss_mb"] = float(np.mean([r["peak_rss_mb"] for r in ok]))
            m["cpu_s"] = float(np.mean([r["cpu_s"] for r in ok]))
            m["background_percent"] = float(np.mean([r["background_percent"] for r in ok]))
            cores = [r.get("core_s") for r in ok]
            m["core_s"] = float(np.mean(cores)) if None not in cores else None
            m["tre"] = {k: float(np.mean([r["tre"][k] for r in ok]))
                        for k in ("mean", "median", "p95", "initial_mean", "percent_folding")}
        out[method["name"]] = m
    return out


def wall_ratios(rows: list[dict], methods: list[dict]) -> dict:
    """combireg wall / elastix wall for every (combireg, elastix) method pair, per case and
    overall (sum over the cases both finished)."""
    def walls(name):
        return {r["case"]: r["wall_s"] for r in rows if r["method"] == name and "tre" in r}

    out = {}
    for anchor in (m["name"] for m in methods if m["kind"] == "elastix"):
        ref = walls(anchor)
        for name in (m["name"] for m in methods if m["kind"] == "combireg"):
            mine = walls(name)
            common = [c for c in mine if c in ref]
            if common:
                out[f"{name} / {anchor}"] = {
                    "cases": {c: mine[c] / ref[c] for c in common},
                    "overall": sum(mine[c] for c in common) / sum(ref[c] for c in common)}
    return out


def machine_info() -> dict:
    """CPU count, torch threads and library versions of this machine."""
    import itk
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        from importlib.metadata import version

        elastix_version = version("itk-elastix")
    except Exception:  # noqa: BLE001 - only informative
        elastix_version = "unknown"
    return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": model,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "itk": itk.Version.GetITKVersion(), "itk_elastix": elastix_version,
            "numpy": np.__version__, "platform": platform.platform()}


# ------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=REPO / "bench_data" / "manifest.csv",
                   help="manifest CSV (default: bench_data/manifest.csv)")
    p.add_argument("--cases", default=None, help="a count (first N cases) or comma-separated case ids")
    p.add_argument("--params", action="append", default=None, metavar="FILE",
                   help="combireg preset; repeat to benchmark several (default: params/default.txt, "
                        "or the built-in defaults if it is missing)")
    p.add_argument("--elastix-affine", action="store_true",
                   help="also run elastix default affine + default B-spline (elastix_affine_bspline)")
    p.add_argument("--no-elastix", action="store_true", help="skip the elastix anchor")
    p.add_argument("--no-combireg", action="store_true", help="run the elastix methods only")
    p.add_argument("--elastix-t1", action="store_true",
                   help="also run the unchanged default B-spline map on the first channel only "
                        "(elastix_bspline_t1)")
    p.add_argument("--elastix-threader", default="Pool", choices=["Pool", "Platform", "TBB", "default"],
                   help="ITK_GLOBAL_DEFAULT_THREADER for elastix runs (default: Pool, the faster one here)")
    p.add_argument("--runner", choices=["auto", "cli", "api"], default="auto",
                   help="combireg via the console script or the Python API (auto: cli if installed)")
    p.add_argument("--max-load", type=float, default=None, metavar="L",
                   help="before each method wait (up to 15 min) until the 1-min load average is <= L")
    p.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the outputs of a temporary --workdir")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2])
        return 0
    args = parse_args(argv)
    print("command: " + shlex.join([sys.executable] + sys.argv), flush=True)
    cases = read_manifest(args.manifest, args.cases)
    runner = args.runner
    if runner == "auto":
        runner = "cli" if cli_works(combireg_cli()) else "api"
    if runner == "cli" and not combireg_cli():
        raise SystemExit("bench_core: --runner cli but no `combireg` console script is installed")
    presets = args.params or ([str(REPO / "params" / "default.txt")] if (REPO / "params" / "default.txt").is_file()
                              else [None])
    methods = [] if args.no_combireg else [
        {"kind": "combireg", "name": f"combireg[{Path(p).name if p else 'built-in defaults'}]",
         "params": str(Path(p).resolve()) if p else None} for p in presets]
    if not args.no_elastix:
        methods.append({"kind": "elastix", "name": "elastix_bspline", "affine": False, "multichannel": True})
        if args.elastix_affine:
            methods.append({"kind": "elastix", "name": "elastix_affine_bspline", "affine": True,
                            "multichannel": True})
        if args.elastix_t1:
            methods.append({"kind": "elastix", "name": "elastix_bspline_t1", "affine": False,
                            "multichannel": False})
    threader = None if args.elastix_threader == "default" else args.elastix_threader
    info = machine_info()
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']} "
          f"with {info['torch_threads']} threads, itk {info['itk']}, itk-elastix {info['itk_elastix']}")
    print(f"combireg runner: {runner}; elastix: all channels (multi-image) unless named _t1; "
          f"elastix threader: {args.elastix_threader}; cases: {len(cases)}", flush=True)

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = workdir = Path(tempfile.mkdtemp(prefix="bench_core-"))
    rows = []
    try:
        for case in cases:
            rows += run_case(case, methods, workdir, runner, threader, args.max_load)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif rows:
            print(f"outputs kept in {workdir}")
    print()
    print(format_table(rows, methods))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": shlex.join([sys.executable] + sys.argv), "manifest": str(args.manifest.resolve()),
            "runner": runner, "elastix_threader": args.elastix_threader, "machine": info,
            "methods": methods, "rows": rows, "means": method_means(rows, methods),
            "wall_ratio_vs_elastix_bspline": wall_ratios(rows, methods)}, indent=1) + "\n")
        print(f"numbers written to {args.json}")
    return 0 if all("tre" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
