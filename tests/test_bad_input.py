"""README's "### Bad input" table, row by row: one line on stderr, exit code 2, nothing written.

The table is read from README.md; every row's first cell names a scenario below, and every
scenario must have its row (a new row without a test, or a test without a row, fails).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from combireg import Geometry, io
from combireg.cli.main import main
from tests.conftest import ROOT, known_displacement, oblique_direction


def readme_rows() -> dict[str, str]:
    """``{case: expected text}`` from the Bad input table of README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Bad input", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*`(.+)`\s*\|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


ROWS = readme_rows()


@pytest.fixture
def inputs(tmp_path):
    """Small files that trip each check (images on an anisotropic grid, a field on an oblique one)."""
    g = Geometry((12, 10, 8), spacing=(2.0, 2.0, 2.5))
    rng = np.random.default_rng(0)

    def image(name, array, geometry=g):
        io.write_image(tmp_path / name, array, geometry)
        return str(tmp_path / name)

    other = g.shrink((2, 2, 2))
    oblique = Geometry((10, 9, 8), origin=(3.0, -4.0, 5.0), spacing=(1.5, 1.2, 2.0),
                       direction=tuple(oblique_direction().ravel()))
    io.write_displacement(tmp_path / "field.nii.gz", known_displacement(oblique), oblique)
    far = Geometry(oblique.size, (900.0, 900.0, 900.0), oblique.spacing, oblique.direction)
    d = {"ok": image("ok.nii.gz", rng.random(g.shape)), "ok2": image("ok2.nii.gz", rng.random(g.shape)),
         "other_grid": image("other.nii.gz", rng.random(other.shape), other),
         "constant": image("const.nii.gz", np.full(g.shape, 3.0)),
         "nan": image("nan.nii.gz", np.where(rng.random(g.shape) > 0.99, np.nan, 1.0)),
         "field": str(tmp_path / "field.nii.gz"), "oblique": image("oblique.nii.gz", np.ones(oblique.shape), oblique),
         "far": image("far.nii.gz", np.ones(far.shape), far)}
    import itk

    itk.imwrite(itk.image_from_array(np.ones((9, 9), np.float32)), str(tmp_path / "flat.nii.gz"))
    d["flat"] = str(tmp_path / "flat.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x00garbage")
    d["garbage"] = str(tmp_path / "garbage.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    d["png"] = str(tmp_path / "scan.png")
    (tmp_path / "bad.txt").write_text("(Metric \"MSE\")\n(LearningRat 0.1)\n")
    d["bad_params"] = str(tmp_path / "bad.txt")
    point = oblique.index_to_world(np.array([[2.0, 3.0, 4.0]]))[0]
    (tmp_path / "lm.fcsv").write_text("# CoordinateSystem = LPS\np1,%f,%f,%f,0,0,0,1,1,1,0,A,,\n" % tuple(point))
    d["fcsv"] = str(tmp_path / "lm.fcsv")
    (tmp_path / "index.txt").write_text("index\n1\n2 3 4\n")
    d["index"] = str(tmp_path / "index.txt")
    return d


def _run(tmp_path, d, src=None, tgt=None, *extra):
    return ["run", src or d["ok"], tgt or d["ok2"], "-o", str(tmp_path / "result" / "out"), "-q", *extra]


def _apply(tmp_path, field, input_, output_name="out.nii.gz", *extra):
    return ["apply", field, input_, "-o", str(tmp_path / "result" / output_name), *extra]


#: case -> (tmp_path, inputs) -> command line; the output goes under tmp_path/result (made empty).
SCENARIOS = {
    "missing": lambda t, d: _run(t, d, str(t / "nope.nii.gz")),
    "unreadable": lambda t, d: _run(t, d, d["garbage"]),
    "format": lambda t, d: _run(t, d, d["png"]),
    "not-3d": lambda t, d: _run(t, d, None, d["flat"]),
    "channels": lambda t, d: _run(t, d, f"{d['ok']},{d['ok2']}"),
    "grids": lambda t, d: _run(t, d, f"{d['ok2']},{d['ok']}", f"{d['ok']},{d['other_grid']}"),
    "nan": lambda t, d: _run(t, d, d["nan"]),
    "constant": lambda t, d: _run(t, d, None, d["constant"]),
    "params": lambda t, d: _run(t, d, None, None, "-p", d["bad_params"]),
    "not-empty": lambda t, d: _run(t, d),
    "not-writable": lambda t, d: ["run", d["ok"], d["ok2"], "-o", "/proc/combireg-test-out", "-q"],
    "memory": lambda t, d: _run(t, d, None, None, "--max-memory", "0.0001"),
    "outputs": lambda t, d: _run(t, d, None, None, "--outputs", "field,warp"),
    "apply-field": lambda t, d: _apply(t, d["ok"], d["oblique"]),
    "apply-overlap": lambda t, d: _apply(t, d["field"], d["far"]),
    "apply-format": lambda t, d: _apply(t, d["field"], d["png"]),
    "apply-kind": lambda t, d: _apply(t, d["field"], d["fcsv"], "out.csv"),
    "apply-labels": lambda t, d: _apply(t, d["field"], d["oblique"], "out.nii.gz", "--labels", "--interpolation",
                                        "linear"),
    "apply-index": lambda t, d: _apply(t, d["field"], d["index"], "out.txt"),
    "apply-exists": lambda t, d: _apply(t, d["field"], d["oblique"]),
}


def test_every_row_has_a_test_and_every_test_a_row():
    assert len(ROWS) >= 19
    assert sorted(ROWS) == sorted(SCENARIOS)


@pytest.mark.parametrize("case", sorted(ROWS))
def test_bad_input_row(tmp_path, inputs, case):
    result = tmp_path / "result"
    result.mkdir()
    keep = None
    if case == "not-empty":
        (result / "out").mkdir()
        keep = result / "out" / "keep.txt"
    elif case == "apply-exists":
        keep = result / "out.nii.gz"
    if keep is not None:
        keep.write_text("precious")
    args = SCENARIOS[case](tmp_path, inputs)
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("combireg: error: ") and ROWS[case] in lines[0], res.output
    written = sorted(str(p.relative_to(result)) for p in result.rglob("*"))
    expected = [] if keep is None else sorted({str(keep.relative_to(result)), *(
        [str(keep.parent.relative_to(result))] if keep.parent != result else [])})
    assert written == expected, written
    if keep is not None:
        assert keep.read_text() == "precious"
    assert not Path("/proc/combireg-test-out").exists()
