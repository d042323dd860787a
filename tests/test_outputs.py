import os
import stat

import pytest

from combireg.errors import CombiregError
from combireg.outputs import atomic_output_dir


def test_output_appears_whole_with_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "a" / "b", overwrite=False) as tmp:
            (tmp / "x.txt").write_text("1")
            assert not (tmp_path / "a" / "b").exists()  # nothing visible before the end
    finally:
        os.umask(old)
    out = tmp_path / "a" / "b"
    assert (out / "x.txt").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_failure_leaves_nothing_and_keeps_old_contents(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "new" / "out", overwrite=False) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the parent it created is gone too
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(keep, overwrite=True):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert (keep / "old.txt").read_text() == "old"
    with pytest.raises(CombiregError, match="not empty"):
        with atomic_output_dir(keep, overwrite=False):
            pass


def _small(geometry_seed=0):
    import numpy as np
    import torch

    from combireg import Geometry, Image

    g = Geometry((9, 8, 7), origin=(1.0, -2.0, 3.0), spacing=(1.5, 1.2, 2.0))
    rng = np.random.default_rng(geometry_seed)
    u = rng.normal(size=g.shape + (3,)).astype(np.float32)
    image = Image(torch.from_numpy(rng.random((2,) + g.shape, dtype=np.float32)), g)
    return g, u, image


def test_output_writer_writes_as_handed_over_and_appears_whole(tmp_path):
    """Files are written in the background while the block runs (in the hidden folder), params
    and report last, and the folder appears at the end with exactly the kinds asked for."""
    import json

    import numpy as np

    from combireg import io
    from combireg.outputs import OutputWriter

    g, u, image = _small()
    out = tmp_path / "out"
    with OutputWriter(out, outputs="field,warped") as writer:
        writer.field(u, g)
        writer.inverse(u, g)  # not asked for: ignored
        writer.warped(image)
        assert not out.exists()
        assert writer.finish("// params\n", {"a": np.float32(1.5)}) == out
        assert sorted(p.name for p in writer.folder.iterdir()) == [
            "field.nii.gz", "params.txt", "report.json", "warped_0.nii.gz", "warped_1.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == [
        "field.nii.gz", "params.txt", "report.json", "warped_0.nii.gz", "warped_1.nii.gz"]
    np.testing.assert_array_equal(io.read_displacement(out / "field.nii.gz")[0], u)
    np.testing.assert_array_equal(io.read_array(out / "warped_1.nii.gz")[0], image.numpy()[1])
    assert json.loads((out / "report.json").read_text()) == {"a": 1.5}


def test_output_writer_leaves_nothing_on_error_or_without_finish(tmp_path):
    from combireg.outputs import OutputWriter

    g, u, image = _small()
    with pytest.raises(KeyboardInterrupt):
        with OutputWriter(tmp_path / "a") as writer:
            writer.field(u, g)
            writer.warped(image)
            raise KeyboardInterrupt
    with pytest.raises(RuntimeError, match="without finish"):
        with OutputWriter(tmp_path / "b") as writer:
            writer.field(u, g)
    with pytest.raises(CombiregError, match="unknown output 'warp'"):
        OutputWriter(tmp_path / "c", outputs="warp")
    assert list(tmp_path.iterdir()) == []
