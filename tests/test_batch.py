"""combireg.batch and `combireg batch`: many cases on a real dask.distributed cluster.

The cluster fixture starts a LocalCluster of two worker processes x one thread on the
loopback interface, shared by the tests of this module (its workers import torch and ITK
once); one test starts its own through ``--workers`` (the default path of the command).
"""
import json
import os
import socket
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import Geometry
from combireg.batch import SUMMARY_NAME, case_complete, run_batch
from combireg.cli.main import main
from combireg.errors import CombiregError
from combireg.executor import dask_executor, plan_workers
from combireg.summary import read_results
from tests.conftest import image_from_world_function, oblique_direction, smooth_pattern

CONTRACT = {"field.nii.gz", "field_inverse.nii.gz", "warped_0.nii.gz", "params.txt", "report.json"}
TINY = '(NumberOfResolutions 1)\n(ImagePyramidSchedule 2 2 2)\n(MaximumNumberOfIterations 5)\n(Metric "MSE")\n'
SHIFTS = {"c0": (2.0, 0.0, 0.0), "c1": (0.0, -1.5, 1.0), "c2": (1.0, 1.0, -1.0)}
HEADER = "id,source,target,target_landmarks,source_landmarks\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _fcsv(path, points):
    lines = ["# Markups fiducial file version = 4.6", "# CoordinateSystem = LPS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"p{i},{x:.6f},{y:.6f},{z:.6f},0,0,0,1,1,1,0,L{i},," for i, (x, y, z) in enumerate(points, start=1)]
    path.write_text("\n".join(lines) + "\n")


def _make_case(folder, case_id, shift):
    """A tiny pair whose true forward field is the constant ``shift`` (LPS mm), with landmarks."""
    from combireg import io

    geometry = Geometry((20, 18, 16), origin=(-15.0, -12.0, 10.0), spacing=(2.0, 1.8, 2.2),
                        direction=tuple(oblique_direction().ravel()))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    d = np.broadcast_to(np.asarray(shift, dtype=np.float32), geometry.world_grid().shape)
    func = lambda p: smooth_pattern(p, centre)  # noqa: E731
    case = folder / case_id
    case.mkdir()
    io.write_image(case / "target.nii.gz", image_from_world_function(geometry, func, d))  # T(x) = S(x + d)
    io.write_image(case / "source.nii.gz", image_from_world_function(geometry, func))
    index = np.array([[6, 6, 5], [12, 9, 8], [9, 12, 10]], dtype=np.float64)  # (x, y, z) voxel indices
    target_points = geometry.index_to_world(index)
    _fcsv(case / "target.fcsv", target_points)
    _fcsv(case / "source.fcsv", target_points + np.asarray(shift))
    return f"{case_id},{case_id}/source.nii.gz,{case_id}/target.nii.gz,{case_id}/target.fcsv,{case_id}/source.fcsv\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_data")
    rows = "".join(_make_case(folder, cid, shift) for cid, shift in SHIFTS.items())
    (folder / "manifest.csv").write_text(HEADER + rows)
    (folder / "tiny.txt").write_text(TINY)
    (folder / "other.txt").write_text(TINY.replace("5)", "6)"))
    return folder


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=0,
                      scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def finished(data, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_out") / "out"
    res = invoke("batch", data / "manifest.csv", "-o", out, "-p", data / "tiny.txt", "--scheduler", cluster,
                 "--threads-per-worker", 1, "--device", "cpu", "-q")
    return out, res


def _mtimes(out):
    return {cid: (out / cid / "report.json").stat().st_mtime_ns for cid in SHIFTS}


# ------------------------------------------------------------------------------ end to end
def test_batch_registers_every_case_with_the_run_contract(finished):
    out, res = finished
    assert res.exit_code == 0, res.output
    assert "batch: 3 done, 0 skipped, 0 failed" in res.output
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["status"] == "finished" and summary["counts"]["done"] == 3 and summary["failures"] == []
    for cid, shift in SHIFTS.items():
        folder = out / cid
        assert {p.name for p in folder.iterdir()} == CONTRACT  # exactly the files of `combireg run`
        assert case_complete(folder, 1)
        report = json.loads((folder / "report.json").read_text())
        assert report["device"] == "cpu" and report["threads"] == 1 and report["batch"]["case"] == cid
        tre = report["tre"]["statistics"]
        assert tre["initial_mean"] == pytest.approx(np.linalg.norm(shift), rel=1e-4)
        assert tre["mean"] < tre["initial_mean"]  # 5 iterations already move towards the shift
        assert summary["cases"][cid]["status"] == "done"
        assert summary["cases"][cid]["tre_mean"] == pytest.approx(tre["mean"])
        assert "(NumberOfThreads 1)" in (folder / "params.txt").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_rerun_skips_finished_cases_and_redoes_an_incomplete_one(finished, data, cluster):
    out, _ = finished
    before = _mtimes(out)
    res = invoke("batch", data / "manifest.csv", "-o", out, "-p", data / "tiny.txt", "--scheduler", cluster, "-q")
    assert res.exit_code == 0, res.output
    assert "batch: 0 done, 3 skipped, 0 failed" in res.output and "no cluster needed" in res.output
    assert _mtimes(out) == before  # nothing registered again
    # an incomplete folder (its report.json cut short) is not finished: only it runs again
    (out / "c1" / "report.json").write_text('{"target": {"chan')
    assert not case_complete(out / "c1", 1)
    res = invoke("batch", data / "manifest.csv", "-o", out, "-p", data / "tiny.txt", "--scheduler", cluster, "-q")
    assert res.exit_code == 0, res.output
    assert "batch: 1 done, 2 skipped, 0 failed" in res.output
    after = _mtimes(out)
    assert after["c0"] == before["c0"] and after["c2"] == before["c2"] and after["c1"] != before["c1"]
    assert case_complete(out / "c1", 1)
    # other parameters than the finished cases': refused before anything runs
    res = CliRunner().invoke(main, ["batch", str(data / "manifest.csv"), "-o", str(out), "-p",
                                    str(data / "other.txt"), "--scheduler", cluster])
    assert res.exit_code == 2 and "other parameters" in res.output and "MaximumNumberOfIterations" in res.output
    assert _mtimes(out) == after


def test_a_corrupt_case_fails_alone_on_a_local_cluster(data, tmp_path):
    """The command's own LocalCluster (--workers 2): one garbage image fails, the rest finish."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "target.nii.gz").write_bytes(b"not an image\n" * 50)  # garbage
    rows = [HEADER.strip()]
    for cid in ("c0", "c2"):
        rows.append(f"{cid},{data}/{cid}/source.nii.gz,{data}/{cid}/target.nii.gz,{data}/{cid}/target.fcsv,"
                    f"{data}/{cid}/source.fcsv")
    rows.append(f"bad,{data}/c1/source.nii.gz,bad/target.nii.gz,{data}/c1/target.fcsv,{data}/c1/source.fcsv")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    env_before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = CliRunner().invoke(main, ["batch", str(tmp_path / "manifest.csv"), "-o", str(out), "-p",
                                    str(data / "tiny.txt"), "--workers", "2", "--threads-per-worker", "1", "-q"])
    assert res.exit_code == 1, res.output  # some case failed
    assert "batch: 2 done, 0 skipped, 1 failed" in res.output and "(2 worker(s) x 1 thread(s))" in res.output
    assert "failed: bad:" in res.output
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [f["case"] for f in summary["failures"]] == ["bad"]
    assert "target.nii.gz" in summary["failures"][0]["error"] and "cannot read image header" in summary["failures"][0]["error"]
    assert summary["cases"]["bad"]["status"] == "failed"
    assert not (out / "bad").exists()
    for cid in ("c0", "c2"):
        assert summary["cases"][cid]["status"] == "done" and case_complete(out / cid, 1)
    # the worker processes' thread variables did not leak into this process
    assert {k: os.environ.get(k) for k in env_before} == env_before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_within_seconds_and_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    res = CliRunner().invoke(main, ["batch", str(data / "manifest.csv"), "-o", str(out), "-p",
                                    str(data / "tiny.txt"), "--scheduler", f"tcp://127.0.0.1:{_free_port()}"])
    assert time.perf_counter() - start < 8.0
    assert res.exit_code == 2
    assert res.output.startswith("combireg: error: cannot reach the dask scheduler at tcp://127.0.0.1:")
    assert res.output.count("\n") == 1
    assert not out.exists()


def test_a_listening_port_that_is_no_scheduler_times_out(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.perf_counter()
        with pytest.raises(CombiregError, match="cannot reach the dask scheduler"):
            with dask_executor(scheduler=f"tcp://127.0.0.1:{server.getsockname()[1]}", connect_timeout=1.0):
                pass
        assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "nonsense"], "missing port number"),
    (["--scheduler", "udp://127.0.0.1:9"], "--scheduler 'udp://127.0.0.1:9'"),
    (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "give one or the other"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--init", "missing.nii.gz"], "no such file"),
    (["-p", "MISSING"], "no such file"),
])
def test_batch_errors_are_one_line_and_write_nothing(data, tmp_path, args, message):
    out = tmp_path / "out"
    args = [str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    res = CliRunner().invoke(main, ["batch", str(data / "manifest.csv"), "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1
    assert not out.exists()


def test_batch_refuses_a_foreign_non_empty_folder(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    res = CliRunner().invoke(main, ["batch", str(data / "manifest.csv"), "-o", str(out)])
    assert res.exit_code == 2 and f"holds no {SUMMARY_NAME}" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


# ------------------------------------------------------------------------------ evaluate on the executor
def test_evaluate_runs_its_cells_on_the_cluster(data, cluster, tmp_path):
    """Cells finish in any order; rows are written by this process, in cell order at the end."""
    from combireg.evaluate import run_evaluation

    mse = data / "tiny.txt"
    ev = run_evaluation(data / "manifest.csv", [f"a={mse}", f"b={mse},init:{{case}}-missing.nii.gz"], tmp_path / "ev",
                        scheduler=cluster, threads_per_worker=1)
    assert ev.ran == 6 and ev.skipped == 0
    with open(tmp_path / "ev" / "results.csv") as fh:
        order = [tuple(line.split(",")[:3]) for line in fh.read().splitlines()[1:]]
    assert order == [(c, m, "ok" if m == "a" else "failed") for c in SHIFTS for m in ("a", "b")]
    rows = read_results(tmp_path / "ev" / "results.csv")
    for cid, shift in SHIFTS.items():
        assert rows[(cid, "a")]["initial_mean"] == pytest.approx(np.linalg.norm(shift), rel=1e-4)
        assert f"initial field {cid}-missing.nii.gz: no such file" in rows[(cid, "b")]["error"]
    again = run_evaluation(data / "manifest.csv", [f"a={mse}"], tmp_path / "ev", scheduler=cluster)
    assert again.ran == 0 and again.skipped == 3


# ------------------------------------------------------------------------------ units
def test_case_complete_needs_every_contract_file_and_a_readable_report(tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    names = ["field.nii.gz", "field_inverse.nii.gz", "params.txt", "warped_0.nii.gz", "warped_1.nii.gz"]
    for name in names:
        (folder / name).write_bytes(b"x")
    assert not case_complete(folder, 2)  # no report.json
    (folder / "report.json").write_text(json.dumps({"target": {"channels": 2}}))
    assert case_complete(folder, 2)
    assert not case_complete(folder, 3)  # warped_2 missing and the report says 2 channels
    (folder / "warped_1.nii.gz").write_bytes(b"")
    assert not case_complete(folder, 2)  # an empty file
    (folder / "warped_1.nii.gz").write_bytes(b"x")
    (folder / "report.json").write_text("{not json")
    assert not case_complete(folder, 2)
    assert not case_complete(tmp_path / "nowhere", 1)


def test_plan_workers():
    gib = 2 ** 30
    assert plan_workers(16) == (16, 1)
    assert plan_workers(16, available_bytes=10 * gib, per_task_bytes=3 * gib) == (3, 5)  # memory-bound
    assert plan_workers(16, threads=4) == (4, 4)
    assert plan_workers(16, threads=4, available_bytes=10 * gib, per_task_bytes=4 * gib) == (2, 4)
    assert plan_workers(16, workers=3) == (3, 5)
    assert plan_workers(16, tasks=2) == (2, 8)  # no more workers than cases
    assert plan_workers(16, workers=4, threads=2, tasks=3) == (3, 2)
    assert plan_workers(2, available_bytes=1 * gib, per_task_bytes=4 * gib) == (1, 2)  # at least one
    assert plan_workers(1, threads=4) == (1, 4)


def test_run_batch_from_python_with_nothing_to_do(finished, data):
    """A finished batch reruns without a cluster (no scheduler is contacted)."""
    out, _ = finished
    summary = run_batch(data / "manifest.csv", out, params=data / "tiny.txt", scheduler="tcp://127.0.0.1:1")
    assert (summary.done, summary.skipped, summary.failed, summary.workers) == (0, 3, [], 0)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_worker_tasks_keep_large_allocations(cluster):
    """dask starts workers with MALLOC_TRIM_THRESHOLD_, which made every large tensor an
    mmap/munmap pair (2.2x slower registrations): every task resets glibc's thresholds first."""
    from distributed import Client

    from combireg.executor import call_with_thread_limit, keep_large_allocations

    assert keep_large_allocations() is True
    with Client(cluster) as client:
        assert client.submit(call_with_thread_limit, 1, keep_large_allocations, pure=False).result() is True


# ------------------------------------------------------------------------------ cohorts without ground truth
def test_a_cohort_without_landmarks_runs_and_resumes_on_a_local_cluster(data, tmp_path):
    """`combireg batch` on an id,source,target manifest, as a user runs it: its own LocalCluster,
    a progress bar and one summary line on the terminal, dask's log lines in DIR/dask.log; the
    rerun skips the finished cases."""
    import subprocess

    rows = "".join(f"{cid},{data}/{cid}/source.nii.gz,{data}/{cid}/target.nii.gz\n" for cid in ("c0", "c1"))
    (tmp_path / "cohort.csv").write_text("id,source,target\n" + rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "combireg.cli.main", "batch", str(tmp_path / "cohort.csv"), "-o", str(out),
               "-p", str(data / "tiny.txt"), "--workers", "1", "--threads-per-worker", "1", "--device", "cpu"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith("batch: 2 done, 0 skipped, 0 failed in ")
    assert "distributed" not in first.stderr and "INFO" not in first.stderr  # dask is quiet on the terminal
    dask_log = (out / "dask.log").read_text()
    assert "distributed.scheduler" in dask_log and dask_log.count("\n") >= 10
    for cid in ("c0", "c1"):
        assert case_complete(out / cid, 1)
        report = json.loads((out / cid / "report.json").read_text())
        assert "tre" not in report  # no ground truth: no TRE, nothing fails
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("batch: 0 done, 2 skipped, 0 failed") and "no cluster needed" in again.stdout


def test_landmarks_outside_the_grid_never_sink_a_batch_case(data, cluster, tmp_path):
    """A landmark just outside the target grid: the case is done, its TRE counts the point
    (edge values), and the warning is in batch_summary.json, not on the worker's terminal."""
    from combireg.landmarks import read_landmarks, write_landmarks

    geometry = Geometry((20, 18, 16), origin=(-15.0, -12.0, 10.0), spacing=(2.0, 1.8, 2.2),
                        direction=tuple(oblique_direction().ravel()))
    lm = read_landmarks(data / "c0" / "target.fcsv")
    lm.points_lps_mm[0] = geometry.index_to_world(np.array([[-0.6, 5.0, 5.0]]))[0]
    write_landmarks(tmp_path / "target.fcsv", lm)
    (tmp_path / "m.csv").write_text(HEADER + f"edge,{data}/c0/source.nii.gz,{data}/c0/target.nii.gz,"
                                             f"{tmp_path}/target.fcsv,{data}/c0/source.fcsv\n")
    summary = run_batch(tmp_path / "m.csv", tmp_path / "out", params=data / "tiny.txt", scheduler=cluster,
                        threads_per_worker=1)
    assert summary.done == 1 and summary.failed == [] and summary.warnings >= 1
    record = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["cases"]["edge"]
    assert record["status"] == "done" and record["tre_n_outside_grid"] == 1
    assert any("1 of 3 target landmark(s) lie outside" in w for w in record["warnings"])
    assert "warning(s) in batch_summary.json" in summary.line()


def test_batch_registers_a_brats_reg_folder(cluster, tmp_path):
    from tests.datasets import make_brats_reg

    make_brats_reg(tmp_path / "brats", {"BraTSReg_007": (2.0, 0.0, -1.0)})
    (tmp_path / "tiny.txt").write_text(TINY)
    summary = run_batch(tmp_path / "brats", tmp_path / "out", params=tmp_path / "tiny.txt", scheduler=cluster,
                        threads_per_worker=1)
    assert summary.done == 1
    report = json.loads((tmp_path / "out" / "BraTSReg_007" / "report.json").read_text())
    assert report["target"]["channels"] == 4 and case_complete(tmp_path / "out" / "BraTSReg_007", 4)
    assert report["tre"]["statistics"]["initial_mean"] == pytest.approx(np.sqrt(5.0), abs=1e-3)
