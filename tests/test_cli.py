"""`combireg run` end to end on data_samples/ (every bad input of README: tests/test_bad_input.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import io
from combireg.cli.main import main
from tests.conftest import ROOT

CASE = ROOT / "data_samples" / "case0000"
SRC = f"{CASE}/source_t1.nii.gz,{CASE}/source_t2.nii.gz"
TGT = f"{CASE}/target_t1.nii.gz,{CASE}/target_t2.nii.gz"

FAST_PARAMS = """// a tiny run for tests
(NumberOfResolutions 2)
(ImagePyramidSchedule 4 4 4 2 2 2)
(MaximumNumberOfIterations 40 10)
(LearningRate 0.01)
"""


@pytest.fixture
def fast_params(tmp_path):
    path = tmp_path / "fast.txt"
    path.write_text(FAST_PARAMS)
    return str(path)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_end_to_end_on_data_samples(tmp_path, fast_params):
    out = tmp_path / "out"
    res = invoke("run", SRC, TGT, "-o", out, "-p", fast_params, "-q")
    assert res.exit_code == 0, res.output
    assert f"results in {out}" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["field.nii.gz", "field_inverse.nii.gz", "params.txt", "report.json",
                     "warped_0.nii.gz", "warped_1.nii.gz"]
    field, geometry = io.read_displacement(out / "field.nii.gz")
    target = io.read_image(CASE / "target_t1.nii.gz")
    source = io.read_image(CASE / "source_t1.nii.gz")
    assert geometry.same_grid(target.geometry)
    _, inv_geometry = io.read_displacement(out / "field_inverse.nii.gz")
    assert inv_geometry.same_grid(source.geometry)
    report = json.loads((out / "report.json").read_text())
    assert [lvl["iterations"] for lvl in report["levels"]] == [40, 10]
    assert report["jacobian"]["percent_nonpositive"] < 0.1
    # the registration moved things (rigid misalignment + mass effect) and improved the match
    assert report["displacement_mm"]["mean"] > 1.0
    warped = io.read_image(out / "warped_0.nii.gz").numpy()[0]
    t = target.numpy()[0]
    s_resampled = io.read_image(CASE / "source_t1.nii.gz").numpy()[0]
    assert np.mean((warped - t) ** 2) < 0.7 * np.mean((s_resampled - t) ** 2)
    # rerun into the same directory needs --overwrite
    again = invoke("run", SRC, TGT, "-o", out, "-p", fast_params, "-q")
    assert again.exit_code == 2 and "not empty" in again.output


def test_run_says_when_it_takes_the_cross_sequence_similarity(tmp_path):
    # The sample case's T1 source against its T2 target: the defaults detect the sequence change,
    # print a line, record it, and write the settings used, which rerun as written.
    out = tmp_path / "out"
    res = invoke("run", f"{CASE}/source_t1.nii.gz", f"{CASE}/target_t2.nii.gz", "-o", out, "-q",
                 "--target-landmarks", CASE / "target_landmarks.fcsv",
                 "--source-landmarks", CASE / "source_landmarks.fcsv")
    assert res.exit_code == 0, res.output
    assert "look like different sequences" in res.output and "cross-sequence similarity" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences"]["different"] and report["sequences"]["score"] > report["sequences"]["threshold"]
    written = (out / "params.txt").read_text()
    assert '(Metric "MSE" "NCC" "NGF")' in written and '(SequenceChangeDetection "true")' in written
    statistics = report["tre"]["statistics"]
    assert statistics["mean"] < 0.5 * statistics["initial_mean"]
    same = invoke("run", SRC, TGT, "-o", tmp_path / "same", "-q", "-p", ROOT / "params" / "default.txt")
    assert same.exit_code == 0 and "different sequences" not in same.output


def test_params_file_of_a_run_reproduces_it(tmp_path, fast_params):
    a = invoke("run", SRC, TGT, "-o", tmp_path / "a", "-p", fast_params, "-q")
    b = invoke("run", SRC, TGT, "-o", tmp_path / "b", "-p", tmp_path / "a" / "params.txt", "-q")
    assert a.exit_code == 0 and b.exit_code == 0
    fa, _ = io.read_displacement(tmp_path / "a" / "field.nii.gz")
    fb, _ = io.read_displacement(tmp_path / "b" / "field.nii.gz")
    np.testing.assert_array_equal(fa, fb)


def test_run_outputs_writes_exactly_the_kinds_asked_for(tmp_path, fast_params):
    """--outputs: the kinds named (and params.txt, report.json), the same field as a full run;
    the kinds left out are not computed (Result holds None)."""
    full = tmp_path / "full"
    assert invoke("run", SRC, TGT, "-o", full, "-p", fast_params, "-q").exit_code == 0
    assert json.loads((full / "report.json").read_text())["outputs"] == ["field", "inverse", "warped"]
    expected = {"field": ["field.nii.gz"], "inverse": ["field_inverse.nii.gz"],
                "warped": ["warped_0.nii.gz", "warped_1.nii.gz"]}
    for asked in ("field", "warped,inverse", "inverse", "all"):
        out = tmp_path / asked.replace(",", "_")
        res = invoke("run", SRC, TGT, "-o", out, "-p", fast_params, "-q", "--outputs", asked)
        assert res.exit_code == 0, res.output
        kinds = ["field", "inverse", "warped"] if asked == "all" else [k for k in expected if k in asked.split(",")]
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(["params.txt", "report.json"] + [n for k in kinds for n in expected[k]])
        report = json.loads((out / "report.json").read_text())
        assert report["outputs"] == kinds and report["jacobian"] == json.loads((full / "report.json").read_text())["jacobian"]
        for name in names:
            if name.endswith(".nii.gz"):  # what is written equals the full run's file
                read = io.read_displacement if name.startswith("field") else io.read_array
                np.testing.assert_array_equal(read(out / name)[0], read(full / name)[0])

    from combireg import register

    result = register(SRC, TGT, fast_params, outputs="field")
    assert result.inverse_displacement_lps_mm is None and result.warped is None
    assert result.report["outputs"] == ["field"]
    saved = result.save(tmp_path / "api")
    assert sorted(p.name for p in saved.iterdir()) == ["field.nii.gz", "params.txt", "report.json"]


def _write(path, array, geometry):
    io.write_image(path, array, geometry)
    return str(path)


@pytest.fixture
def bad_inputs(tmp_path):
    """Two small images on one anisotropic grid (README's bad-input rows: tests/test_bad_input.py)."""
    from combireg import Geometry

    g = Geometry((12, 10, 8), spacing=(2.0, 2.0, 2.5))
    rng = np.random.default_rng(0)
    return {"ok": _write(tmp_path / "ok.nii.gz", rng.random(g.shape), g),
            "ok2": _write(tmp_path / "ok2.nii.gz", rng.random(g.shape), g)}


def test_interrupt_leaves_nothing(tmp_path, bad_inputs, monkeypatch):
    import combireg.io as cio

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cio, "write_image", boom)
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["run", bad_inputs["ok"], bad_inputs["ok2"], "-o", str(out), "-q", "-p",
                                    str(ROOT / "params" / "paper_io.txt")])
    assert res.exit_code == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_params_commands():
    res = invoke("params", "check", ROOT / "params" / "default.txt")
    assert res.exit_code == 0 and "OK" in res.output
    res = invoke("params", "defaults")
    assert res.exit_code == 0 and "(Metric \"MSE\" \"NCC\")" in res.output


def test_run_with_masks_and_bad_masks(tmp_path, fast_params):
    from combireg import Geometry

    target = io.read_image(CASE / "target_t1.nii.gz")
    source = io.read_image(CASE / "source_t1.nii.gz")
    brain_t = _write(tmp_path / "brain_t.nii.gz", (target.numpy()[0] > 0).astype(np.uint8), target.geometry)
    brain_s = _write(tmp_path / "brain_s.nii.gz", (source.numpy()[0] > 0).astype(np.uint8), source.geometry)
    out = tmp_path / "out"
    res = invoke("run", SRC, TGT, "-o", out, "-p", fast_params, "-q", "--target-mask", brain_t, "--source-mask", brain_s)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["preprocessing"]["target_mask"] and report["preprocessing"]["source_mask"]

    g = target.geometry
    shifted = Geometry(g.size, tuple(np.add(g.origin, 5.0)), g.spacing, g.direction)
    other_grid = _write(tmp_path / "other.nii.gz", np.ones(g.shape, np.uint8), shifted)
    empty = _write(tmp_path / "empty.nii.gz", np.zeros(g.shape, np.uint8), g)
    for option, mask, message in [("--target-mask", other_grid, "grid"), ("--target-mask", empty, "empty"),
                                  ("--source-mask", tmp_path / "missing.nii.gz", "missing.nii.gz")]:
        bad_out = tmp_path / f"bad{option}{Path(str(mask)).name}"
        res = CliRunner().invoke(main, ["run", SRC, TGT, "-o", str(bad_out), "-p", fast_params, "-q", option, str(mask)])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and message in res.output
        assert not bad_out.exists()


def test_run_with_a_drn_init_end_to_end(tmp_path, fast_params):
    from combireg.network import DrnModel, RegistrationUNet, save_model

    model = tmp_path / "tiny.pt"
    save_model(DrnModel(RegistrationUNet(channels=2, features=(4, 8)), internal_shape=(12, 14, 12)), model)
    out = tmp_path / "out"
    res = invoke("run", SRC, TGT, "-o", out, "-p", fast_params, "-q", "--init", model)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["init"]["kind"] == "drn" and report["init"]["seconds"] > 0
    # DRN alone: zero iterations give the network's own field (an untrained net: about the identity)
    alone = tmp_path / "alone.txt"
    alone.write_text("(NumberOfResolutions 1)\n(ImagePyramidSchedule 2 2 2)\n(MaximumNumberOfIterations 0)\n"
                     "(PreAlignment \"none\")\n")  # the network's field alone, no rigid step before it
    res = invoke("run", SRC, TGT, "-o", tmp_path / "alone", "-p", alone, "-q", "--init", model)
    assert res.exit_code == 0, res.output
    field, _ = io.read_displacement(tmp_path / "alone" / "field.nii.gz")
    assert np.abs(field).max() < 2.0
    # bad model files and channel mismatch: one line, exit 2, nothing written
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    for src, tgt, init, message in [(SRC, TGT, garbage, "garbage.pt"),
                                    (f"{CASE}/source_t1.nii.gz", f"{CASE}/target_t1.nii.gz", model, "channel")]:
        bad_out = tmp_path / "bad"
        res = CliRunner().invoke(main, ["run", src, tgt, "-o", str(bad_out), "-p", fast_params, "-q", "--init", str(init)])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and message in res.output
        assert not bad_out.exists()


def _console(*args):
    """The console script's entry in a fresh interpreter (it ends the process itself)."""
    import subprocess
    import sys

    code = "import sys; from combireg.cli.main import console_main; sys.argv = ['combireg'] + sys.argv[1:]; console_main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_console_script_exit_codes_and_flushed_output(tmp_path, fast_params):
    # The fast exit (os._exit after the atexit handlers) must keep exit codes and every line.
    version = _console("--version")
    assert version.returncode == 0 and version.stdout.startswith("combireg, version")
    bad = _console("run", tmp_path / "missing.nii.gz", TGT, "-o", tmp_path / "out")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"combireg: error: {tmp_path / 'missing.nii.gz'}: no such file"]
    assert not (tmp_path / "out").exists()
    usage = _console("run")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
    out = tmp_path / "run"
    done = _console("run", SRC, TGT, "-p", fast_params, "-o", out, "-q", "--outputs", "field")
    assert done.returncode == 0, done.stderr
    assert "results in" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["field.nii.gz", "params.txt", "report.json"]
    assert json.loads((out / "report.json").read_text())["outputs"] == ["field"]


def test_console_exit_waits_for_a_running_thread(monkeypatch):
    # With a non-daemon thread alive the interpreter's own exit (which joins it) is kept.
    import threading

    from combireg.cli import main as main_module

    monkeypatch.setattr(main_module, "_keep_freed_memory", lambda: None)  # not for pytest's own process
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert main_module._other_threads()
        monkeypatch.setattr("sys.argv", ["combireg", "--version"])
        with pytest.raises(SystemExit) as exit_info:
            main_module.console_main()
        assert exit_info.value.code == 0
    finally:
        release.set()
        worker.join()
    assert not main_module._other_threads()
